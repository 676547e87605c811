"""One storage test suite, run against SQLite and against the real PostgreSQL server.

Each PostgreSQL run gets a schema of its own, dropped afterwards. A conversation
is a tree (SPEC §12); the guarantees here are those of every conversation,
branched or not: numbering, context reads, owners, listing, rollback, imports,
concurrency, locks, reopening. The tree itself (branches, head, delete, ids) is
tests/test_tree_storage.py.
"""

from __future__ import annotations

import types

import pytest
import trio
from helpers.database import sample_turn as turn
from helpers.postgres import pg_url

from easybackend.chat.context import turn_cost
from easybackend.errors import StorageUnavailable
from easybackend.settings import load_settings
from easybackend.storage import ConversationRef, Storage, TurnPosition, open_url
from easybackend.storage.postgres import PostgresStorage
from easybackend.storage.sqlite import SQLiteStorage

SETTINGS = load_settings({"OPENAI_API_KEY": "unused"}, environ={}, env_file=None)
ALICE = ConversationRef("alice", "c1")


async def ask(store: Storage, ref: ConversationRef, prompt: str, **kwargs) -> TurnPosition:
    """Append a turn after the conversation's head, as an ask without parent_id does."""
    head = await store.conversation_head(ref)
    return await store.append_turn(ref, turn(prompt, **kwargs), head.parent)


def no_limit(system_prompt, system_tokens) -> int:
    return 10**9


async def load_context(store: Storage, ref: ConversationRef, history_budget, cost):
    """What the core reads for an ask: the head, then the newest turns of the path to it that
    fit the budget ``history_budget(system_prompt, system_tokens)`` gives for it."""
    head = await store.conversation_head(ref)
    budget = history_budget(head.system_prompt, head.system_tokens)
    turns = await store.newest_turns(ref, head.parent, budget, cost) if head.parent else []
    return types.SimpleNamespace(
        system_prompt=head.system_prompt,
        system_tokens=head.system_tokens,
        parent=head.parent,
        turns=turns,
    )


async def test_backend_types(store, request):
    expected = SQLiteStorage if "sqlite" in request.node.callspec.id else PostgresStorage
    assert isinstance(store, expected)


async def test_append_numbers_turns_and_context_returns_them_oldest_first(store):
    positions = [await ask(store, ALICE, f"p{i}") for i in range(1, 6)]
    assert [(p.seq, p.depth) for p in positions] == [(i, i) for i in range(1, 6)]
    assert len({p.turn_id for p in positions}) == 5
    context = await load_context(store, ALICE, no_limit, turn_cost)
    assert [t.seq for t in context.turns] == [1, 2, 3, 4, 5]
    assert [t.prompt for t in context.turns] == ["p1", "p2", "p3", "p4", "p5"]
    assert context.parent == positions[-1] and context.system_prompt is None
    detail = await store.get_conversation(ALICE)
    assert [t.parent_seq for t in detail.turns] == [None, 1, 2, 3, 4]
    assert detail.head_seq == 5 and detail.summary.turn_count == 5
    assert (detail.summary.head_id, detail.summary.head_depth) == (positions[-1].turn_id, 5)


async def test_context_keeps_only_the_newest_whole_turns_that_fit(store):
    for i in range(1, 11):
        await ask(store, ALICE, f"p{i}", tokens=10)
    per_turn = turn_cost((await load_context(store, ALICE, no_limit, turn_cost)).turns[0])
    seen: list[tuple[str | None, int | None]] = []

    def budget(system_prompt, system_tokens) -> int:
        seen.append((system_prompt, system_tokens))
        return 3 * per_turn + per_turn // 2

    context = await load_context(store, ALICE, budget, turn_cost)
    assert [t.prompt for t in context.turns] == ["p8", "p9", "p10"]
    assert context.parent.depth == 10
    assert seen == [(None, None)]


async def test_the_head_then_the_newest_turns_reading_stops_at_the_first_that_does_not_fit(
    store,
):
    for i in range(1, 11):
        last = await ask(store, ALICE, f"p{i}", tokens=10)
    await store.set_system_prompt(ALICE, "be brief", 2)
    head = await store.conversation_head(ALICE)
    assert (head.system_prompt, head.system_tokens, head.parent) == ("be brief", 2, last)
    costed: list[int] = []

    def cost(stored) -> int:
        costed.append(stored.seq)
        return turn_cost(stored)

    per_turn = turn_cost((await store.newest_turns(ALICE, last, 10**9, turn_cost))[0])
    turns = await store.newest_turns(ALICE, last, 3 * per_turn + per_turn // 2, cost)
    assert [t.seq for t in turns] == [8, 9, 10]
    assert costed == [10, 9, 8, 7]  # newest first, and nothing read past the turn that did not fit
    unknown = await store.conversation_head(ConversationRef("alice", "new"))
    assert (unknown.system_prompt, unknown.system_tokens, unknown.parent) == (None, None, None)


async def test_budget_callback_sees_the_system_prompt_and_can_refuse(store):
    await store.set_system_prompt(ALICE, "be brief", 2)

    def refuse(system_prompt, system_tokens) -> int:
        assert (system_prompt, system_tokens) == ("be brief", 2)
        raise ValueError("too long")

    with pytest.raises(ValueError, match="too long"):
        await load_context(store, ALICE, refuse, turn_cost)
    unknown = await load_context(store, ConversationRef("alice", "new"), no_limit, turn_cost)
    assert unknown.turns == [] and unknown.parent is None


async def test_owners_are_separate_namespaces(store):
    await ask(store, ALICE, "alice speaks")
    bob = ConversationRef("bob", "c1")
    await ask(store, bob, "bob speaks")
    assert [t.prompt for t in (await load_context(store, bob, no_limit, turn_cost)).turns] == [
        "bob speaks"
    ]
    assert [c.conversation_id for c in await store.list_conversations("bob", 10, None)] == ["c1"]
    assert await store.delete_conversation(bob)
    assert (await store.get_conversation(ALICE)).summary.turn_count == 1
    assert (await store.conversation_head(bob)).parent is None  # bob's c1 is gone, alice's is not


async def test_get_conversation_returns_everything(store):
    await store.set_system_prompt(ALICE, "persona", 1)
    position = await ask(store, ALICE, "hello", answer="hi there", at=1000.0)
    detail = await store.get_conversation(ALICE)
    summary = detail.summary
    assert (summary.conversation_id, summary.system_prompt, summary.turn_count) == (
        "c1",
        "persona",
        1,
    )
    assert (summary.prompt_tokens, summary.completion_tokens) == (3, 4)
    assert (summary.head_id, summary.head_depth) == (position.turn_id, 1)
    [record] = detail.turns
    assert (record.seq, record.prompt, record.answer, record.model, record.finish_reason) == (
        1, "hello", "hi there", "m", "stop",
    )  # fmt: skip
    assert (record.turn_id, record.parent_seq, record.depth) == (position.turn_id, None, 1)
    assert record.position == position and detail.head_seq == 1
    assert record.created_at == 1000.0
    assert await store.get_conversation(ConversationRef("alice", "none")) is None


async def test_list_pages_newest_first_with_cursors(store):
    for i in range(5):
        await ask(store, ConversationRef("alice", f"c{i}"), "x", at=100.0 + i)
    await ask(store, ConversationRef("alice", "c1"), "again", at=200.0)
    pages, cursor = [], None
    while True:
        page = await store.list_conversations("alice", 2, cursor)
        pages.append([(c.conversation_id, c.head_depth, c.turn_count) for c in page])
        if len(page) < 2:
            break
        cursor = page[-1].cursor
    assert pages == [[("c1", 2, 2), ("c4", 1, 1)], [("c3", 1, 1), ("c2", 1, 1)], [("c0", 1, 1)]]
    with pytest.raises(ValueError):
        await store.list_conversations("alice", 2, "not-a-cursor!")


async def test_rollback_moves_the_head_and_deletes_nothing(store):
    positions = [await ask(store, ALICE, f"p{i}") for i in range(4)]
    assert await store.rollback(ALICE, 3) == (3, 1, positions[0])
    context = await load_context(store, ALICE, no_limit, turn_cost)
    assert [t.prompt for t in context.turns] == ["p0"]  # the next ask no longer sees them
    new = await ask(store, ALICE, "new")
    # numbering continues after every turn ever stored; the new turn follows the kept one
    assert (new.seq, new.depth) == (5, 2)
    detail = await store.get_conversation(ALICE)
    assert [t.prompt for t in detail.turns] == ["p0", "p1", "p2", "p3", "new"]
    assert detail.summary.turn_count == 5 and detail.summary.head_depth == 2
    assert await store.rollback(ALICE, 10) == (2, 0, None)
    assert await store.rollback(ALICE, 1) == (0, 0, None)  # no head: nothing to move past
    assert await store.rollback(ConversationRef("alice", "none"), 1) is None
    assert len((await store.get_conversation(ALICE)).turns) == 5
    assert (await store.get_conversation(ALICE)).summary.prompt_tokens == 5 * 3
    assert await store.delete_conversation(ALICE)
    assert not await store.delete_conversation(ALICE)
    assert await store.get_conversation(ALICE) is None


async def test_system_prompt_set_creates_and_clears(store):
    ref = ConversationRef("alice", "persona")
    await store.set_system_prompt(ref, "pirate", 1)
    assert (await store.get_conversation(ref)).summary.system_prompt == "pirate"
    await store.set_system_prompt(ref, None, None)
    context = await load_context(store, ref, no_limit, turn_cost)
    assert context.system_prompt is None and context.system_tokens is None


async def test_import_is_idempotent_and_appends_only_new_entries(store):
    entries = [turn("a"), turn("b")]
    assert await store.import_turns(ALICE, "c1.json", entries) == 2
    assert await store.import_turns(ALICE, "c1.json", entries) == 0
    assert await store.import_turns(ALICE, "c1.json", [*entries, turn("c")]) == 1
    detail = await store.get_conversation(ALICE)
    assert [t.prompt for t in detail.turns] == ["a", "b", "c"]
    assert [(t.parent_seq, t.depth) for t in detail.turns] == [(None, 1), (1, 2), (2, 3)]
    assert detail.head_seq == 3  # each imported turn became the head
    await store.delete_conversation(ALICE)
    assert await store.import_turns(ALICE, "c1.json", entries) == 2  # deleting forgets the import


async def test_concurrent_appends_never_lose_or_duplicate(store):
    first = await ask(store, ALICE, "first")
    positions: list[TurnPosition] = []

    async def append(i: int) -> None:
        positions.append(await store.append_turn(ALICE, turn(f"p{i}"), first))

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(append, i)
    detail = await store.get_conversation(ALICE)
    assert [t.seq for t in detail.turns] == list(range(1, 22))
    assert sorted(t.prompt for t in detail.turns[1:]) == sorted(f"p{i}" for i in range(20))
    assert {t.parent_seq for t in detail.turns[1:]} == {1}  # twenty siblings of the first
    assert sorted(p.seq for p in positions) == list(range(2, 22))
    assert len({t.turn_id for t in detail.turns}) == 21
    assert detail.summary.turn_count == 21
    assert detail.head_seq == 21  # the head is the turn stored last


async def test_conversation_lock_is_exclusive_and_cancellable(store):
    order: list[str] = []

    first_inside = trio.Event()

    async def hold(name: str, seconds: float) -> None:
        async with store.conversation_lock(ALICE):
            order.append(f"{name} in")
            first_inside.set()
            await trio.sleep(seconds)
            order.append(f"{name} out")

    if isinstance(store, SQLiteStorage):
        return  # one process owns an SQLite file: the lock is the in-process one
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, "first", 0.2)
        await first_inside.wait()
        nursery.start_soon(hold, "second", 0)
    assert order == ["first in", "first out", "second in", "second out"]

    async with store.conversation_lock(ALICE):
        with trio.move_on_after(0.2) as waiting:  # a waiter can be cancelled and leaves no lock
            async with store.conversation_lock(ALICE):
                pass
        assert waiting.cancelled_caught
    with trio.fail_after(5):
        async with store.conversation_lock(ALICE):
            pass


async def test_ping_and_reopening_keeps_data(store, request, tmp_path):
    await store.ping()
    kept = await ask(store, ALICE, "kept")
    if isinstance(store, SQLiteStorage):
        url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    else:
        url = pg_url(request.getfixturevalue("pg_schema"))
    again = await open_url(
        url, SETTINGS
    )  # migrations are applied once; a second open changes nothing
    try:
        detail = await again.get_conversation(ALICE)
        assert [t.prompt for t in detail.turns] == ["kept"]
        assert (await again.conversation_head(ALICE)).parent == kept
    finally:
        await again.close()


async def test_two_instances_migrating_together_agree(pg_schema):
    opened: list[Storage] = []

    async def open_one() -> None:
        opened.append(await open_url(pg_url(pg_schema), SETTINGS))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(open_one)
    try:
        first = await ask(opened[0], ALICE, "x")
        assert (await opened[2].get_conversation(ALICE)).summary.turn_count == 1
        assert (await opened[1].conversation_head(ALICE)).parent == first
    finally:
        for store in opened:
            await store.close()


async def test_unreachable_postgres_is_storage_unavailable():
    with pytest.raises(StorageUnavailable) as failed, trio.fail_after(15):
        await PostgresStorage.open(
            "postgresql://postgres:pw-SECRET@127.0.0.1:1/test", pool_timeout=1
        )
    assert "pw-SECRET" not in str(failed.value)


async def test_more_concurrent_asks_than_pool_connections_wait_their_turn(start_server, pg_schema):
    """Each ask holds one connection (its conversation's lock); asks beyond the pool wait, none fails."""
    server = await start_server(DATABASE_URL=pg_url(pg_schema), PG_POOL_SIZE="2")
    statuses: list[int] = []

    async def ask_over_http(client, i: int) -> None:
        reply = await client.post(f"/ask/pool-{i}", json={"prompt": "[[fake:delay=0.02]] hi"})
        statuses.append(reply.status_code)

    async with server.client() as client:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(12):
                    nursery.start_soon(ask_over_http, client, i)
                while len(server.fake.requests) < 2:  # both slots taken by answers in progress
                    await trio.sleep(0.005)
                ready = await client.get("/readyz")  # spare connections keep readiness answering
        assert ready.status_code == 200
        page = (await client.get("/conversations", params={"limit": 50})).json()
    assert statuses == [200] * 12
    assert len(page["conversations"]) == 12
