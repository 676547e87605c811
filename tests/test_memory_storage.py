"""The stores' side of memory beyond the window (storage/sql_memory.py), on SQLite and the real
PostgreSQL: a path's summary, what a deleted turn takes along, settings, and migrate-storage
carrying settings and summaries both ways."""

from __future__ import annotations

import time

from helpers.database import sample_turn
from helpers.postgres import pg_url

from easybackend.chat.context import turn_cost
from easybackend.settings import load_settings
from easybackend.storage import ConversationRef, Storage, TurnPosition, open_url
from easybackend.storage.base import ConversationSettings, MemorySummary
from easybackend.storage.migrate import copy_conversations
from easybackend.storage.sqlite import SQLiteStorage

SETTINGS = load_settings({"OPENAI_API_KEY": "unused"}, environ={}, env_file=None)
REF = ConversationRef("k", "mem")


async def chain(store: Storage, prompts: list[str], parent=None) -> list[TurnPosition]:
    positions = []
    for prompt in prompts:
        parent = await store.append_turn(REF, sample_turn(prompt, tokens=10), parent)
        positions.append(parent)
    return positions


def summary_at(end: TurnPosition, text: str) -> MemorySummary:
    return MemorySummary(text, 5, end, "m", time.time())


def no_summary_cost(tokens: int) -> int:
    return tokens + 10


async def test_an_ask_reads_the_newest_summary_of_its_own_path(store):
    a, b, c, d = await chain(store, ["a", "b", "c", "d"])
    (b2,) = await chain(store, ["b2"], a)  # a branch from a
    assert await store.store_summary(REF, summary_at(b, "up to b"), (3, 4))
    assert await store.store_summary(REF, summary_at(c, "up to c"), (0, 0))

    from_d = await store.memory_context(REF, d, 10**6, turn_cost, no_summary_cost)
    from_b2 = await store.memory_context(REF, b2, 10**6, turn_cost, no_summary_cost)
    at_c = await store.memory_context(REF, c, 10**6, turn_cost, no_summary_cost)
    one_turn = turn_cost((await store.newest_turns(REF, d, 10**6, turn_cost))[0])
    tight = await store.memory_context(REF, d, one_turn + 15, turn_cost, no_summary_cost)
    none_fits = await store.memory_context(REF, d, 14, turn_cost, no_summary_cost)

    assert from_d.summary.text == "up to c" and [t.prompt for t in from_d.turns] == ["d"]
    assert from_b2.summary is None and [t.prompt for t in from_b2.turns] == ["a", "b2"]
    assert at_c.summary.end == c and at_c.turns == []  # a summary covers the turn it ends at
    assert tight.summary.text == "up to c" and [t.prompt for t in tight.turns] == ["d"]
    assert none_fits.summary is None and none_fits.turns == []  # the summary costs 15: no room
    assert none_fits.dropped_turns == 1  # d (the turns after the summary's end left out)
    assert (await store.newest_summary(REF, b2)) is None
    assert (await store.newest_summary(REF, d)).text == "up to c"
    summary = await store.conversation_summary(REF)
    assert (summary.prompt_tokens, summary.completion_tokens) == (5 * 3 + 3, 5 * 4 + 4)


async def test_deleting_a_turn_deletes_the_summaries_in_its_subtree(store):
    a, b, c = await chain(store, ["a", "b", "c"])
    await store.store_summary(REF, summary_at(a, "up to a"), (0, 0))
    await store.store_summary(REF, summary_at(c, "up to c"), (0, 0))
    await store.delete_turn(REF, b.turn_id)
    assert (await store.newest_summary(REF, a)).text == "up to a"
    assert await store.store_summary(REF, summary_at(c, "c is gone"), (0, 0)) is False
    await store.delete_conversation(REF)
    assert await store.store_summary(REF, summary_at(a, "gone too"), (0, 0)) is False


async def test_settings_are_a_partial_update_of_the_conversation(store):
    written = await store.set_settings(REF, {"title": "T", "memory": "summarize"})
    changed = await store.set_settings(REF, {"temperature": 0.7, "title": None})
    head = await store.conversation_head(REF)
    assert written.settings == ConversationSettings(title="T", memory="summarize")
    assert changed.settings == ConversationSettings(temperature=0.7, memory="summarize")
    assert head.settings == changed.settings and head.updated_at == changed.updated_at
    assert await store.set_title(REF, "generated", (1, 2))
    assert not await store.set_title(REF, "another", (1, 2))  # a title is never replaced
    assert (await store.conversation_summary(REF)).settings.title == "generated"


async def test_migrate_storage_carries_settings_and_summaries_both_ways(store, tmp_path, pg_schema):
    a, b = await chain(store, ["a walrus", "b"])
    await store.set_settings(REF, {"title": "Walrus", "expires_in": 0.0, "model": "m2"})
    await store.store_summary(REF, summary_at(a, "the user likes walruses"), (0, 0))
    # SQLite -> PostgreSQL -> SQLite, or PostgreSQL -> SQLite -> SQLite
    if isinstance(store, SQLiteStorage):
        other_url = pg_url(pg_schema)
    else:
        other_url = f"sqlite:///{tmp_path / 'copy.sqlite3'}"
    other = await open_url(other_url, SETTINGS)
    try:
        await copy_conversations(store, other)
        copied = await other.conversation_summary(REF)
        summary = await other.newest_summary(REF, b)
        found = await other.search_conversations(
            "k", ["walrus"], 10, None, now=time.time(), ttl=None
        )
        back = await open_url(f"sqlite:///{tmp_path / 'back.sqlite3'}", SETTINGS)
        try:
            await copy_conversations(other, back)
            again = await back.newest_summary(REF, b)
        finally:
            await back.close()
    finally:
        await other.close()

    assert copied.settings == ConversationSettings(model="m2", title="Walrus", expires_in=0.0)
    assert summary.text == "the user likes walruses" and summary.end == a
    assert [c.conversation_id for c in found] == ["mem"]
    assert again == summary


async def test_the_search_index_follows_deletes_and_changes_and_indexes_in_batches(store):
    def found(terms: list[str]):
        return store.search_conversations("k", terms, 10, None, now=time.time(), ttl=None)

    a, b = await chain(store, ["alpha walrus", "beta narwhal"])
    # stored turns are indexed later, in batches (SQLite; PostgreSQL's index follows writes)
    first = await store.index_pending(None, 1)
    rest = await store.index_pending(None, 100)
    assert (first, rest) in ((1, 1), (0, 0))
    assert [c.conversation_id for c in await found(["narwhal"])] == ["mem"]
    await store.delete_turn(REF, b.turn_id)
    assert await found(["narwhal"]) == [] and len(await found(["walrus"])) == 1
    await store.set_turn_text(REF, a.turn_id, ("alpha seal", 2, "", 0))
    assert await found(["walrus"]) == [] and len(await found(["seal"])) == 1
    await store.delete_conversation(REF)
    assert await found(["seal"]) == []
    # a conversation made after (SQLite may give it the deleted one's pk) has none of its words
    await chain(store, ["gamma"])
    assert await found(["seal"]) == [] and len(await found(["gamma"])) == 1
