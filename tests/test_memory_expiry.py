"""Conversations idle longer than their expiry are forgotten (SPEC §15), on SQLite and PostgreSQL.

Idleness is made, not waited for: a test moves a conversation's last activity
back in the database (helpers.memory.age), or moves the clock of expiry
(``Memory.now``) forward, so expiry is decided at once; the sweep runs every
SWEEP_INTERVAL (a few hundredths of a second here) and is waited for by
watching the database, or is run by the test itself.
"""

from __future__ import annotations

import time

import psycopg
import pytest
import trio
from helpers.database import db_rows, sample_turn
from helpers.http import error_code, parse_sse
from helpers.memory import age, conversation_ids, wait_gone
from helpers.postgres import pg_url
from helpers.waiting import wait_until

from easybackend.settings import load_settings
from easybackend.storage import ConversationRef, open_url

SETTINGS = load_settings({"OPENAI_API_KEY": "unused"}, environ={}, env_file=None)
HOUR = 3600.0


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request) -> dict[str, str]:
    """The server's database: the SQLite default, or a schema of the local PostgreSQL."""
    if request.param == "sqlite":
        return {}
    return {"DATABASE_URL": pg_url(request.getfixturevalue("pg_schema"))}


async def ask(client, conversation_id: str, prompt: str) -> dict:
    reply = await client.post(f"/ask/{conversation_id}", json={"prompt": prompt})
    assert reply.status_code == 200, reply.text
    return reply.json()


async def test_an_idle_conversation_is_gone_and_its_next_ask_starts_anew(start_server, backend):
    server = await start_server(CONVERSATION_TTL=str(HOUR), **backend)
    async with server.client() as client:
        first = await ask(client, "old", "one")
        await ask(client, "old", "two")
        await ask(client, "fresh", "hello")
        age(server.settings, "old", 2 * HOUR)
        read = await client.get("/conversations/old")
        summary = await client.get("/conversations/old/summary")
        listed = (await client.get("/conversations")).json()["conversations"]
        found = (await client.get("/conversations", params={"q": "one"})).json()["conversations"]
        # reads that name a turn by its id find none of it either, before the sweep
        by_turn = [
            await client.get(f"/conversations/old/turns/{first['turn_id']}"),
            await client.get(f"/conversations/old/turns/{first['turn_id']}/stream"),
            await client.get(f"/v1/conversations/old/items/msg_{first['turn_id']}_u"),
            await client.get(f"/v1/responses/resp_{first['turn_id']}"),
        ]
        head = await client.put("/conversations/old/head", json={"turn_id": first["turn_id"]})
        branch = await client.post(
            "/ask/old", json={"prompt": "from one", "parent_id": first["turn_id"]}
        )
        again = await ask(client, "old", "hello again")
        after = (await client.get("/conversations/old")).json()

    assert read.status_code == 404 and error_code(read) == "not_found"
    assert summary.status_code == 404
    assert [c["conversation_id"] for c in listed] == ["fresh"]
    assert found == []
    assert [reply.status_code for reply in by_turn] == [404] * 4, [r.text for r in by_turn]
    assert head.status_code == 404  # a change finds nothing: it was deleted first
    assert branch.status_code == 404  # none of its turns can be named
    # the next ask starts a new conversation under the same id: no history at all
    assert server.fake.requests[-1]["body"]["messages"] == [
        {"role": "user", "content": "hello again"}
    ]
    assert again["turn"] == 1 and after["stored_turns"] == 1


def last_activity(settings, conversation_id: str) -> float:
    """The conversation's stored last activity (epoch seconds), read from the database."""
    sql = "SELECT updated_at FROM conversations WHERE owner = '' AND conversation_id = "
    if settings.database.is_postgres:
        with psycopg.connect(settings.database_url, autocommit=True) as connection:
            rows = connection.execute(sql + "%s", (conversation_id,)).fetchall()
    else:
        rows = db_rows(settings.sqlite_path, sql + "?", (conversation_id,))
    assert len(rows) == 1, rows
    return float(rows[0][0])


async def test_expiry_follows_the_clock_of_memory_to_the_moment(start_server, backend):
    # The sweeper in the nursery is kept out of the way (an hour apart): the test sweeps.
    server = await start_server(SWEEP_INTERVAL=str(HOUR), **backend)
    memory = server.running.service.memory
    async with server.client() as client:
        first = await ask(client, "timed", "hello")
        changed = await client.put("/conversations/timed/settings", json={"expires_in": 60})
        assert changed.status_code == 200, changed.text
        await ask(client, "kept", "hello")  # no expiry of its own, and no server TTL
        deadline = last_activity(server.settings, "timed") + 60

        async def reads() -> list[int]:
            listed = (await client.get("/conversations")).json()["conversations"]
            return [
                (await client.get("/conversations/timed")).status_code,
                (await client.get(f"/conversations/timed/turns/{first['turn_id']}")).status_code,
                (
                    await client.get(f"/v1/conversations/timed/items/msg_{first['turn_id']}_u")
                ).status_code,
                200 if "timed" in [c["conversation_id"] for c in listed] else 404,
            ]

        memory.now = lambda: deadline - 0.01
        before = await reads()
        swept_before = await memory.sweep()
        memory.now = lambda: deadline + 0.01
        after = await reads()
        stored_until_swept = "timed" in conversation_ids(server.settings)
        swept_after = await memory.sweep()
        left = conversation_ids(server.settings)
        again = await ask(client, "timed", "hello again")  # a new conversation under the id

    assert before == [200, 200, 200, 200] and swept_before == 0
    assert after == [404, 404, 404, 404]
    assert stored_until_swept  # gone for reads at once; deleted by the sweep
    assert swept_after == 1 and left == {"kept"}
    assert again["turn"] == 1
    assert server.fake.requests[-1]["body"]["messages"] == [
        {"role": "user", "content": "hello again"}
    ]


async def test_a_conversation_expiry_of_its_own_beats_the_server_ttl(start_server, backend):
    server = await start_server(CONVERSATION_TTL=str(HOUR), **backend)
    async with server.client() as client:
        for name, expires_in in (("short", 60), ("forever", 0), ("default", None)):
            await ask(client, name, "hello")
            if expires_in is not None:
                changed = await client.put(
                    f"/conversations/{name}/settings", json={"expires_in": expires_in}
                )
                assert changed.status_code == 200, changed.text
        for name in ("short", "forever", "default"):
            age(server.settings, name, 120)
        after_two_minutes = [
            (await client.get(f"/conversations/{name}")).status_code
            for name in ("short", "forever", "default")
        ]
        for name in ("forever", "default"):
            age(server.settings, name, 2 * HOUR)
        after_two_hours = [
            (await client.get(f"/conversations/{name}")).status_code
            for name in ("forever", "default")
        ]
        reset = await client.put("/conversations/forever/settings", json={"expires_in": None})
        age(server.settings, "forever", 2 * HOUR)  # a change of settings was activity
        after_reset = (await client.get("/conversations/forever")).status_code

    assert after_two_minutes == [404, 200, 200]
    assert after_two_hours == [200, 404]
    assert reset.status_code == 200 and reset.json()["settings"]["expires_in"] is None
    assert after_reset == 404  # the server's TTL applies again


async def test_the_sweep_deletes_expired_conversations_and_none_being_asked(start_server, backend):
    server = await start_server(CONVERSATION_TTL=str(HOUR), SWEEP_INTERVAL="0.05", **backend)
    async with server.client() as client:
        for name in ("stale", "live", "busy"):
            await ask(client, name, "hello")
        age(server.settings, "stale", 2 * HOUR)
        await wait_gone(server.settings, "stale")
        assert {"live", "busy"} <= conversation_ids(server.settings)

        # An ask in progress: its conversation expires while it streams, and the sweep leaves it.
        async with trio.open_nursery() as nursery:
            replies: list[str] = []

            async def slow_ask() -> None:
                response = await client.post(
                    "/ask/busy/stream", json={"prompt": "slowly [[fake:delay=0.4]]"}
                )
                replies.append(response.text)

            nursery.start_soon(slow_ask)
            await wait_until(lambda: len(server.fake.requests) == 4)
            age(server.settings, "busy", 2 * HOUR)
            await ask(client, "witness", "hello")
            age(server.settings, "witness", 2 * HOUR)
            await wait_gone(server.settings, "witness")  # a sweep ran after "busy" expired
            assert "busy" in conversation_ids(server.settings)
        events = [event for event, _ in parse_sse(replies[0])]
        assert events[-1] == "end"
        body = (await client.get("/conversations/busy")).json()

    assert body["stored_turns"] == 2  # the answer was stored into the conversation it began in
    assert "live" in conversation_ids(server.settings)


async def test_sweeps_of_several_postgres_instances_share_the_work_and_skip_asks(pg_schema):
    url = pg_url(pg_schema)
    first, second = await open_url(url, SETTINGS), await open_url(url, SETTINGS)
    try:
        old = time.time() - 2 * HOUR
        refs = [ConversationRef("k", f"c{number}") for number in range(120)]
        for ref in refs:
            await first.append_turn(ref, sample_turn("hello", at=old), None)
        asked = refs[0]
        counts: list[int] = []

        async def sweep(store) -> None:
            while True:
                deleted = await store.sweep_expired(time.time(), HOUR, 25, lambda *_: False)
                counts.append(deleted)
                if deleted == 0:
                    return

        held, swept = trio.Event(), trio.Event()

        async def hold() -> None:  # an ask in progress on the first instance
            async with first.conversation_lock(asked):
                held.set()
                await swept.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold)
            await held.wait()
            async with trio.open_nursery() as sweepers:
                sweepers.start_soon(sweep, first)
                sweepers.start_soon(sweep, second)
            left = await second.list_conversations("k", 200, None)
            swept.set()
        assert [summary.conversation_id for summary in left] == [asked.conversation_id]
        assert sum(counts) == 119
        assert await second.sweep_expired(time.time(), HOUR, 25, lambda *_: False) == 1
    finally:
        await first.close()
        await second.close()


async def test_the_sqlite_sweep_leaves_busy_conversations_and_deletes_in_batches(tmp_path):
    store = await open_url(f"sqlite:///{tmp_path / 'sweep.sqlite3'}", SETTINGS)
    try:
        old = time.time() - 2 * HOUR
        for number in range(5):
            await store.append_turn(
                ConversationRef("", f"c{number}"), sample_turn("x", at=old), None
            )
        fresh = ConversationRef("", "fresh")
        await store.append_turn(fresh, sample_turn("x"), None)
        busy = {("", "c0")}
        now = time.time()
        batches = [
            await store.sweep_expired(now, HOUR, 2, lambda *ref: ref in busy) for _ in range(4)
        ]
        no_ttl = await store.sweep_expired(now, None, 10, lambda *_: False)
        busy.clear()
        last = await store.sweep_expired(now, HOUR, 10, lambda *_: False)
        left = [s.conversation_id for s in await store.list_conversations("", 10, None)]
    finally:
        await store.close()

    assert batches == [2, 2, 0, 0]  # two a batch; c0 skipped while busy
    assert no_ttl == 0  # without a TTL, only a conversation's own expiry counts
    assert last == 1 and left == ["fresh"]
