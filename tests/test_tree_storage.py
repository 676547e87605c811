"""Conversations as trees in the store (SPEC §12), against SQLite and the real PostgreSQL server.

Branches and their contexts, the head and its moves, rollback that loses
nothing, deleting a subtree, turn ids; the upgrade of a database the previous
release wrote (linear conversations become chains); and ``import-json`` and
``export`` through the command line on both backends. Each PostgreSQL run
gets a schema of its own, dropped afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
import trio
from helpers.database import (
    LINEAR_POSTGRES_VERSION,
    LINEAR_SQLITE_VERSION,
    LINEAR_USAGE,
    LinearConversation,
    linear_turn_values,
    write_linear_sqlite,
)
from helpers.database import sample_turn as turn
from helpers.postgres import pg_url, write_linear_postgres
from helpers.servers import clean_env, run_cli

from easybackend.chat.context import turn_cost
from easybackend.settings import load_settings
from easybackend.storage import (
    ROOT,
    ConversationRef,
    NewTurn,
    Storage,
    TurnPosition,
    TurnRecord,
    open_url,
    schema,
)
from easybackend.storage import postgres as pg_store
from easybackend.storage import sqlite as sqlite_store

SETTINGS = load_settings({"OPENAI_API_KEY": "unused"}, environ={}, env_file=None)
REF = ConversationRef("alice", "tree")
URL_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
UNLIMITED = 10**9


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.sqlite3'}"
    return pg_url(request.getfixturevalue("pg_schema"))


@pytest.fixture
async def store(store_url) -> AsyncIterator[Storage]:
    opened = await open_url(store_url, SETTINGS)
    yield opened
    await opened.close()


async def add(
    store: Storage, parent: TurnPosition | None, prompt: str, ref: ConversationRef = REF
) -> TurnPosition:
    return await store.append_turn(ref, turn(prompt), parent)


async def path_prompts(store: Storage, last: TurnPosition, ref: ConversationRef = REF) -> list[str]:
    return [t.prompt for t in await store.newest_turns(ref, last, UNLIMITED, turn_cost)]


async def head_of(store: Storage, ref: ConversationRef = REF) -> TurnPosition | None:
    return (await store.conversation_head(ref)).parent


# -- branches and their contexts ----------------------------------------------------------------


async def test_a_branch_context_excludes_the_other_branch(store):
    a1 = await add(store, None, "a1")
    a2 = await add(store, a1, "a2")
    a3 = await add(store, a2, "a3")
    b2 = await add(store, a1, "b2")  # an edit of a2: a child of a2's parent
    b3 = await add(store, b2, "b3")
    assert (b2.depth, b3.depth) == (2, 3)
    assert await head_of(store) == b3  # every new turn becomes the head
    assert await path_prompts(store, b3) == ["a1", "b2", "b3"]
    assert await path_prompts(store, a3) == ["a1", "a2", "a3"]

    # what an ask naming a parent, a regenerate and "root" continue from
    assert (await store.conversation_head(REF, a3.turn_id)).parent == a3
    assert (await store.conversation_head(REF, sibling_of=b2.turn_id)).parent == a1
    regenerate_first = await store.conversation_head(REF, sibling_of=a1.turn_id)
    assert regenerate_first is not None and regenerate_first.parent is None
    assert (await store.conversation_head(REF, ROOT)).parent is None

    a4 = await add(store, a3, "a4")  # an ask with parent_id a3
    assert (a4.seq, a4.depth) == (6, 4) and await head_of(store) == a4
    assert await path_prompts(store, a4) == ["a1", "a2", "a3", "a4"]
    assert await path_prompts(store, b3) == ["a1", "b2", "b3"]  # the other branch is unchanged
    root = await add(store, None, "second first turn")
    assert await path_prompts(store, root) == ["second first turn"]


async def test_a_context_read_follows_only_the_path_and_stops_at_the_first_turn_that_does_not_fit(
    store,
):
    """The cost callback sees the turns of the path, newest first, up to the first that does not
    fit: never a turn of a side branch, never one beyond the cut. Every third turn of the path
    has three side siblings, each with a child of its own, created in between."""
    path: list[TurnPosition] = []
    side: list[TurnPosition] = []
    parent = None
    for depth in range(1, 31):
        if depth % 3 == 0:
            for k in range(3):
                sibling = await add(store, parent, f"side {depth}.{k}")
                side += [sibling, await add(store, sibling, f"below side {depth}.{k}")]
        parent = await add(store, parent, f"path {depth}")
        path.append(parent)
    await store.set_head(REF, side[-1].turn_id)  # the read follows the turn named, not the head
    assert len((await store.get_conversation(REF)).turns) == 30 + 60

    costed: list[int] = []

    def cost(stored) -> int:
        costed.append(stored.seq)
        return turn_cost(stored)

    turns = await store.newest_turns(REF, path[-1], UNLIMITED, cost)
    assert [t.prompt for t in turns] == [f"path {depth}" for depth in range(1, 31)]
    assert costed == [p.seq for p in reversed(path)]

    per_turn = turn_cost(turns[0])  # every turn costs the same
    costed.clear()
    turns = await store.newest_turns(REF, path[-1], 5 * per_turn + per_turn // 2, cost)
    assert [t.seq for t in turns] == [p.seq for p in path[-5:]]
    assert costed == [p.seq for p in reversed(path[-6:])]  # five that fit, the one that did not
    side_seqs = {p.seq for p in side}
    assert not side_seqs & set(costed)

    costed.clear()
    middle = path[14]  # a deep turn in the middle, with branches above and below it
    turns = await store.newest_turns(REF, middle, 2 * per_turn, cost)
    assert [t.prompt for t in turns] == ["path 14", "path 15"]
    assert costed == [path[14].seq, path[13].seq, path[12].seq]


# -- the head -----------------------------------------------------------------------------------


async def test_set_head_switches_branch_and_root_starts_a_new_first_turn(store):
    a1 = await add(store, None, "a1")
    await add(store, a1, "a2")
    a3 = await add(store, await head_of(store), "a3")
    assert await store.set_head(REF, a1.turn_id)
    assert await head_of(store) == a1
    summary = (await store.get_conversation(REF)).summary
    assert (summary.head_id, summary.head_depth, summary.turn_count) == (a1.turn_id, 1, 3)

    b2 = await add(store, await head_of(store), "b2")  # the next ask continues from the head
    assert (b2.seq, b2.depth) == (4, 2)
    assert await path_prompts(store, b2) == ["a1", "b2"]

    assert await store.set_head(REF, ROOT)
    assert await head_of(store) is None
    detail = await store.get_conversation(REF)
    assert detail.head_seq is None
    assert (detail.summary.head_id, detail.summary.head_depth) == (None, 0)
    again = await add(store, await head_of(store), "a new first turn")
    assert (again.seq, again.depth) == (5, 1)

    assert not await store.set_head(REF, "no-such-turn")
    assert await head_of(store) == again  # a refused switch leaves the head alone
    assert not await store.set_head(ConversationRef("alice", "unknown"), ROOT)
    assert not await store.set_head(ConversationRef("alice", "unknown"), a3.turn_id)
    assert await store.set_head(REF, a3.turn_id) and await head_of(store) == a3


async def test_rollback_moves_the_head_up_its_path_and_every_turn_stays_retrievable(store):
    chain = [await add(store, None, "a1")]
    for i in range(2, 6):
        chain.append(await add(store, chain[-1], f"a{i}"))
    before = await store.get_conversation(REF)
    assert await store.rollback(REF, 2) == (2, 3, chain[2])
    assert await head_of(store) == chain[2]
    for position in chain[3:]:  # left behind, not lost
        found = await store.find_turn(REF, position.turn_id)
        assert found is not None and found.position == position
    after = await store.get_conversation(REF)
    assert after.turns == before.turns and after.head_seq == chain[2].seq
    assert after.summary.turn_count == 5 and after.summary.head_depth == 3
    assert (after.summary.prompt_tokens, after.summary.completion_tokens) == (15, 20)
    assert await store.set_head(REF, chain[4].turn_id)  # and the branch can be taken up again
    assert await path_prompts(store, chain[4]) == ["a1", "a2", "a3", "a4", "a5"]

    # a rollback walks the head's own path, whatever the seqs
    b2 = await add(store, chain[0], "b2")
    b3 = await add(store, b2, "b3")
    assert await store.rollback(REF, 1) == (1, 2, b2)
    assert await store.set_head(REF, b3.turn_id)
    assert await store.rollback(REF, 2) == (2, 1, chain[0])
    assert await store.rollback(REF, 5) == (1, 0, None)
    assert await store.rollback(REF, 1) == (0, 0, None)
    assert len((await store.get_conversation(REF)).turns) == 7


# -- deleting a subtree -------------------------------------------------------------------------


async def test_delete_turn_removes_the_subtree_only_and_seqs_are_never_reused(store):
    a1 = await add(store, None, "a1")
    a2 = await add(store, a1, "a2")
    a3 = await add(store, a2, "a3")
    a4 = await add(store, a3, "a4")
    c2 = await add(store, a1, "c2")
    c3 = await add(store, c2, "c3")
    d4 = await add(store, a3, "d4")
    assert await store.set_head(REF, a4.turn_id)
    totals = (await store.get_conversation(REF)).summary
    assert (totals.prompt_tokens, totals.completion_tokens) == (7 * 3, 7 * 4)

    assert await store.delete_turn(REF, a3.turn_id) == (3, a2)  # a3, a4, d4; the head was a4
    detail = await store.get_conversation(REF)
    assert [t.prompt for t in detail.turns] == ["a1", "a2", "c2", "c3"]
    assert detail.head_seq == a2.seq and detail.summary.turn_count == 4
    summary = detail.summary
    assert (summary.prompt_tokens, summary.completion_tokens) == (7 * 3, 7 * 4)  # usage stays
    for gone in (a3, a4, d4):
        assert await store.find_turn(REF, gone.turn_id) is None
        assert await store.conversation_head(REF, gone.turn_id) is None

    assert await store.delete_turn(REF, c3.turn_id) == (1, a2)  # the head was elsewhere: stays
    newest = await add(store, await head_of(store), "after the deletes")
    assert (newest.seq, newest.depth) == (8, 3)  # 8: seqs 4..7 are not handed out again
    assert await store.delete_turn(REF, newest.turn_id) == (1, a2)  # the newest turn, the head
    again = await add(store, await head_of(store), "and again")
    assert again.seq == 9  # not 8 again
    [exported] = [c async for c in store.export_all()]
    assert exported.last_seq == 9 and exported.head_seq == 9

    assert await store.delete_turn(REF, a1.turn_id) == (4, None)  # a1, a2, c2, "and again"
    detail = await store.get_conversation(REF)
    assert detail.turns == [] and detail.head_seq is None
    assert (detail.summary.turn_count, detail.summary.prompt_tokens) == (0, 9 * 3)
    first = await add(store, await head_of(store), "a fresh start")
    assert (first.seq, first.depth) == (10, 1)
    assert await store.delete_turn(REF, "no-such-turn") is None
    assert await store.delete_turn(ConversationRef("alice", "unknown"), first.turn_id) is None
    assert await store.find_turn(REF, first.turn_id) is not None


# -- turn ids -----------------------------------------------------------------------------------


async def test_turn_ids_are_unique_across_conversations_and_owners_short_and_url_safe(store):
    ids: list[str] = []
    for owner in ("", "alice", "bob"):
        for name in ("c1", "c2", "c3"):
            ref = ConversationRef(owner, name)
            first = await add(store, None, "one", ref)
            second = await add(store, first, "two", ref)
            ids += [first.turn_id, second.turn_id, (await add(store, first, "branch", ref)).turn_id]
    imported = ConversationRef("carol", "imported")
    await store.import_turns(imported, "imported.json", [turn("x"), turn("y")])
    ids += [t.turn_id for t in (await store.get_conversation(imported)).turns]
    assert len(ids) == 3 * 3 * 3 + 2 == len(set(ids))
    assert all(URL_SAFE_ID.fullmatch(turn_id) and turn_id != ROOT for turn_id in ids), ids


async def test_an_unknown_parent_or_sibling_reads_as_none(store):
    first = await add(store, None, "first")
    assert await store.conversation_head(REF, "no-such-turn") is None
    assert await store.conversation_head(REF, sibling_of="no-such-turn") is None
    assert (await store.conversation_head(REF, first.turn_id)).parent == first
    unknown = ConversationRef("alice", "unknown")
    assert await store.conversation_head(unknown, first.turn_id) is None
    assert await store.conversation_head(unknown, sibling_of=first.turn_id) is None
    for parent_id in (None, ROOT):  # naming no turn: a conversation yet to be created
        fresh = await store.conversation_head(unknown, parent_id)
        assert (fresh.system_prompt, fresh.system_tokens, fresh.parent) == (None, None, None)
    assert await store.find_turn(REF, "no-such-turn") is None


async def test_a_turn_of_another_conversation_or_owner_is_not_found(store):
    mine = await add(store, None, "mine")
    await add(store, mine, "mine too")
    others = [ConversationRef("alice", "other"), ConversationRef("bob", REF.conversation_id)]
    for other in others:
        await add(store, None, "theirs", other)
    for other in others:
        assert await store.find_turn(other, mine.turn_id) is None
        assert await store.conversation_head(other, mine.turn_id) is None
        assert await store.conversation_head(other, sibling_of=mine.turn_id) is None
        assert not await store.set_head(other, mine.turn_id)
        assert await store.delete_turn(other, mine.turn_id) is None
        assert [t.prompt for t in (await store.get_conversation(other)).turns] == ["theirs"]
    detail = await store.get_conversation(REF)
    assert [t.prompt for t in detail.turns] == ["mine", "mine too"] and detail.head_seq == 2


# -- a database the previous release wrote ------------------------------------------------------

LINEAR = [
    LinearConversation("", "plain", ("p1", "p2", "p3", "p4", "p5"), "Answer in haiku.", 4),
    LinearConversation("alice", "rolled", ("r1", "r2", "r3", "r4", "r5", "r6"), rolled_back=2),
    LinearConversation("alice", "plain", ("ålice 1 🙂", "ålice 2")),
    LinearConversation("", "imported", ("i1", "i2"), legacy_source="imported.json"),
    LinearConversation("bob", "empty", (), "Only a system prompt.", 5),
]


def linear_database(url: str, tmp_path: Path) -> str:
    """Write LINEAR as the previous release would have, at the store ``url`` names."""
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        write_linear_sqlite(path, LINEAR)
        (version,) = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()
        assert version == LINEAR_SQLITE_VERSION
    else:
        schema = re.search(r"search_path%3D(\w+)", url)[1]
        write_linear_postgres(schema, LINEAR)
    return url


def as_new_turn(record: TurnRecord) -> tuple[object, ...]:
    """The columns of a stored turn that the linear schema had too (NewTurn's, but the
    upstream and the piece lengths, which came later)."""
    later = {"upstream", "pieces"}
    names = [field.name for field in dataclasses.fields(NewTurn) if field.name not in later]
    return tuple(getattr(record, name) for name in names)


def schema_version(url: str) -> int:
    if url.startswith("sqlite:///"):
        db = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            return db.execute("PRAGMA user_version").fetchone()[0]
        finally:
            db.close()
    with psycopg.connect(url, connect_timeout=5) as connection:
        return connection.execute("SELECT version FROM easybackend_schema").fetchone()[0]


def newest_version(url: str) -> int:
    """The schema version this release migrates a store to: one per migration.

    The tree's is number 3 on SQLite, 2 on PostgreSQL (the version after the previous
    release's); later migrations may follow it.
    """
    if url.startswith("sqlite"):
        migrations, tree = sqlite_store.MIGRATIONS, schema.TREE.format(**schema.SQLITE_TYPES)
        assert migrations.index(tree) + 1 == 3 == LINEAR_SQLITE_VERSION + 1
    else:
        migrations, tree = pg_store.MIGRATIONS, schema.TREE.format(**schema.POSTGRES_TYPES)
        assert migrations.index(tree) + 1 == 2 == LINEAR_POSTGRES_VERSION + 1
    return len(migrations)


async def test_a_database_of_the_previous_schema_becomes_chains(store_url, tmp_path):
    linear_database(store_url, tmp_path)
    old_version = (
        LINEAR_SQLITE_VERSION if store_url.startswith("sqlite") else LINEAR_POSTGRES_VERSION
    )
    assert schema_version(store_url) == old_version
    store = await open_url(store_url, SETTINGS)
    try:
        assert schema_version(store_url) == newest_version(store_url)
        ids: list[str] = []
        for old in LINEAR:
            ref = ConversationRef(old.owner, old.conversation_id)
            detail = await store.get_conversation(ref)
            kept = old.kept()
            n = len(kept)
            # every conversation is a chain: parent = the turn before, depth = position
            assert [t.seq for t in detail.turns] == list(range(1, n + 1))
            assert [t.parent_seq for t in detail.turns] == [None, *range(1, n)][:n]
            assert [t.depth for t in detail.turns] == list(range(1, n + 1))
            assert detail.head_seq == (n or None)
            ids += [t.turn_id for t in detail.turns]
            # the rows themselves are unchanged
            assert [as_new_turn(t) for t in detail.turns] == [
                linear_turn_values(prompt, seq, 1_700_000_000.0)
                for seq, prompt in enumerate(kept, 1)
            ]
            summary = detail.summary
            assert (summary.system_prompt, summary.turn_count, summary.head_depth) == (
                old.system_prompt,
                n,
                n,
            )
            assert summary.head_id == (detail.turns[-1].turn_id if n else None)
            # usage of every answered turn, the rolled-back ones too, as before the upgrade
            answered = len(old.prompts)
            assert (summary.prompt_tokens, summary.completion_tokens) == (
                answered * LINEAR_USAGE[0],
                answered * LINEAR_USAGE[1],
            )
            # the context an ask reads is what it was: the whole (kept) conversation
            head = await store.conversation_head(ref)
            assert (head.system_prompt, head.system_tokens) == (
                old.system_prompt,
                old.system_tokens,
            )
            if n:
                assert head.parent == detail.turns[-1].position
                assert await path_prompts(store, head.parent, ref) == list(kept)
                cut = await store.newest_turns(
                    ref, head.parent, turn_cost(detail.turns[-1]) + 1, turn_cost
                )
                assert [t.prompt for t in cut] == [kept[-1]]
            else:
                assert head.parent is None
        assert len(ids) == len(set(ids)) == sum(len(c.kept()) for c in LINEAR)
        assert all(URL_SAFE_ID.fullmatch(turn_id) for turn_id in ids), ids
        exported = {c.ref: c.last_seq async for c in store.export_all()}
        assert exported == {  # the last seq given: the highest kept (the old rollback deleted)
            ConversationRef(old.owner, old.conversation_id): len(old.kept()) for old in LINEAR
        }

        # new asks append after the head; seqs continue after the old ones
        rolled = ConversationRef("alice", "rolled")
        new = await store.append_turn(rolled, turn("r5 again"), await head_of(store, rolled))
        assert (new.seq, new.depth) == (5, 5)
        assert await path_prompts(store, new, rolled) == ["r1", "r2", "r3", "r4", "r5 again"]
        empty = ConversationRef("bob", "empty")
        first = await store.append_turn(empty, turn("at last"), await head_of(store, empty))
        assert (first.seq, first.depth) == (1, 1)
        # import-json's bookkeeping came through: the imported file adds only what is new
        imported = ConversationRef("", "imported")
        assert await store.import_turns(imported, "imported.json", [turn("i1"), turn("i2")]) == 0
        entries = [turn("i1"), turn("i2"), turn("i3")]
        assert await store.import_turns(imported, "imported.json", entries) == 1
        assert await path_prompts(store, await head_of(store, imported), imported) == [
            "i1",
            "i2",
            "i3",
        ]
    finally:
        await store.close()

    again = await open_url(store_url, SETTINGS)  # upgraded once: a second open changes nothing
    try:
        assert schema_version(store_url) == newest_version(store_url)
        detail = await again.get_conversation(ConversationRef("", "plain"))
        assert [t.turn_id for t in detail.turns] == ids[:5]
    finally:
        await again.close()


async def test_instances_upgrading_a_database_of_the_previous_schema_together_agree(pg_schema):
    """Instances starting together on the previous release's PostgreSQL schema upgrade it once
    (under the migration lock): every one reads the same turn ids."""
    url = pg_url(pg_schema)
    write_linear_postgres(pg_schema, LINEAR)
    opened: list[Storage] = []

    async def open_one() -> None:
        opened.append(await open_url(url, SETTINGS))

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(open_one)
        seen = [
            [t.turn_id for t in (await store.get_conversation(ConversationRef("", "plain"))).turns]
            for store in opened
        ]
    finally:
        for store in opened:
            await store.close()
    assert len(seen) == 3 and seen[0] == seen[1] == seen[2] and len(set(seen[0])) == 5
    assert schema_version(url) == newest_version(url)


# -- import-json and export through the command line --------------------------------------------


def legacy_entry(prompt: str, answer: str) -> str:
    return f"User: {prompt}\n\n\nChatGPT: {answer}<|im_end|>\n"


async def command(tmp_path: Path, store_url: str, *args: str):
    result = await run_cli(
        tmp_path, clean_env(DATABASE_URL=store_url, CONVERSATIONS_DIR=str(tmp_path / "data")), args
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_import_json_chains_after_the_head_and_export_shows_the_tree(store_url, tmp_path):
    ref = ConversationRef("", "111222333")
    store = await open_url(store_url, SETTINGS)
    try:
        a1 = await add(store, None, "a1", ref)
        a2 = await add(store, a1, "a2", ref)
        b2 = await add(store, a1, "b2", ref)
        assert await store.set_head(ref, a2.turn_id)  # the head is not the newest turn
    finally:
        await store.close()
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    file = legacy / "111222333.json"
    entries = [legacy_entry("old one", "1"), legacy_entry("old two", "2")]
    file.write_text(json.dumps(entries), encoding="utf-8")
    code, out, err = await command(tmp_path, store_url, "import-json", str(legacy))
    assert (code, err) == (0, ""), err
    assert out.startswith("imported 2 turns into 1 conversations"), out

    store = await open_url(store_url, SETTINGS)
    try:
        detail = await store.get_conversation(ref)
        one, two = detail.turns[3:]
        assert (one.prompt, one.parent_seq, one.depth) == ("old one", a2.seq, 3)
        assert (two.prompt, two.parent_seq, two.depth) == ("old two", one.seq, 4)
        assert detail.head_seq == two.seq
        assert await store.set_head(ref, b2.turn_id)  # entries added later chain after the head
    finally:
        await store.close()
    file.write_text(json.dumps([*entries, legacy_entry("old three", "3")]), encoding="utf-8")
    code, out, err = await command(tmp_path, store_url, "import-json", str(legacy))
    assert code == 0 and out.startswith("imported 1 turns into 1 conversations"), (out, err)

    code, out, err = await command(tmp_path, store_url, "export", "111222333")
    assert (code, err) == (0, ""), err
    body = json.loads(out)
    store = await open_url(store_url, SETTINGS)
    try:
        detail = await store.get_conversation(ref)
    finally:
        await store.close()
    by_seq = {t.seq: t for t in detail.turns}
    three = detail.turns[-1]
    assert (three.prompt, three.parent_seq, three.depth) == ("old three", b2.seq, 3)
    # the tree: every turn, creation order, with its id and its parent's
    assert [(t["id"], t["parent_id"]) for t in body["tree"]] == [
        (t.turn_id, by_seq[t.parent_seq].turn_id if t.parent_seq else None) for t in detail.turns
    ]
    assert [t["messages"][0]["text"] for t in body["tree"]] == [
        "a1", "a2", "b2", "old one", "old two", "old three",
    ]  # fmt: skip
    # the history: the active path, root to head
    assert [t["messages"][0]["text"] for t in body["history"]] == ["a1", "b2", "old three"]
    assert [t["turn"] for t in body["history"]] == [1, 2, 3]
    assert body["head"] == three.turn_id and body["turns"] == 3 and body["stored_turns"] == 6
    assert body["history"][1]["siblings"] == [a2.turn_id, b2.turn_id]
    assert body["history"][0]["parent_id"] is None
