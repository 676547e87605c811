"""Persistence: history survives a restart and a ``kill -9`` (SPEC §3 "Persistence", §9)."""

from __future__ import annotations

import sqlite3
from collections import defaultdict

import httpx2
import pytest
import trio
from helpers.database import stored_turns
from helpers.servers import ServerProcess, free_port, server_env
from helpers.upstream import echo, history_of, upstream_messages
from helpers.waiting import wait_until


async def test_history_survives_a_restart(fake, start_server):
    first = await start_server()
    async with first.client() as client:
        response = await client.post("/ask/durable", json={"prompt": "remember me"})
        assert response.status_code == 200, response.text
    first.shutdown.set()
    with trio.fail_after(10):
        await first.stopped.wait()
    with pytest.raises(httpx2.TransportError):
        async with first.client() as client:
            await client.get("/healthz")

    second = await start_server()
    assert second.settings.sqlite_path == first.settings.sqlite_path
    assert second.running.http_port != first.running.http_port
    async with second.client() as client:
        response = await client.post("/ask/durable", json={"prompt": "who am I?"})
        assert response.status_code == 200, response.text
    assert history_of(upstream_messages(fake)) == [("remember me", echo(1, "remember me"))]
    assert response.json()["response"] == echo(3, "who am I?")
    assert [t["seq"] for t in stored_turns(second.settings.sqlite_path, "durable")] == [1, 2]


async def test_shutdown_stores_an_in_flight_answer_as_cancelled(fake, start_server):
    server = await start_server(SHUTDOWN_GRACE="0.2")
    async with server.client() as client:

        async def ask() -> None:  # cut at the end of the grace: told so, not dropped
            response = await client.post(
                "/ask/inflight", json={"prompt": "x [[fake:stall_after=2]]"}
            )
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "shutting_down"

        async with trio.open_nursery() as asks:
            asks.start_soon(ask)
            await wait_until(lambda: "stalled" in [e["event"] for e in fake.events])
            server.shutdown.set()
            with trio.fail_after(10):
                await server.stopped.wait()
    (turn,) = stored_turns(server.settings.sqlite_path, "inflight")
    assert (turn["answer"], turn["finish_reason"]) == ("echo(1): x", "cancelled")
    await wait_until(lambda: fake.events[-1]["event"] == "disconnected", timeout=1)


def check_database(path) -> dict[str, list[sqlite3.Row]]:
    """The database is intact and every turn whole; returns the turns per conversation."""
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    try:
        assert db.execute("PRAGMA integrity_check").fetchall()[0][0] == "ok"
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        counts = {
            row["conversation_id"]: row["turn_count"]
            for row in db.execute("SELECT conversation_id, turn_count FROM conversations")
        }
        turns: dict[str, list[sqlite3.Row]] = defaultdict(list)
        for row in db.execute(
            "SELECT c.conversation_id, t.* FROM turns t"
            " JOIN conversations c ON c.pk = t.conversation_pk ORDER BY c.conversation_id, t.seq"
        ):
            turns[row["conversation_id"]].append(row)
    finally:
        db.close()
    for cid, rows in turns.items():
        assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1)), cid
        assert counts[cid] == len(rows), cid
        for row in rows:
            assert row["prompt"] and row["answer"], dict(row)
            assert row["finish_reason"] in ("stop", "length", "cancelled"), dict(row)
    assert all(counts[cid] == len(turns.get(cid, [])) for cid in counts)
    return turns


async def test_kill_minus_nine_mid_burst_leaves_every_turn_whole(fake, tmp_path, start_server):
    data = tmp_path / "data"
    port = free_port()
    env = server_env(
        fake,
        HTTP_PORT=str(port),
        GRPC_PORT="off",
        WS_PORT="off",
        CONVERSATIONS_DIR=str(data),
        LOG_LEVEL="WARNING",
    )
    server = await ServerProcess(tmp_path, env).start()
    try:
        await server.wait_healthy(port)
        answered: dict[str, list[str]] = defaultdict(list)
        async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

            async def ask(cid: str, prompt: str, must_succeed: bool) -> None:
                try:
                    response = await client.post(f"/ask/{cid}", json={"prompt": prompt})
                except httpx2.TransportError:
                    assert not must_succeed
                    return
                assert response.status_code == 200, response.text
                answered[cid].append(prompt)

            # a first wave to completion, then a burst that is killed mid-answer
            async with trio.open_nursery() as burst:
                for c in range(8):
                    burst.start_soon(ask, f"c{c}", "warm up", True)
            with trio.fail_after(20):
                async with trio.open_nursery() as burst:
                    for c in range(8):
                        for n in range(4):
                            prompt = f"c{c} n{n} [[fake:tokens=30]] [[fake:delay=0.01]]"
                            burst.start_soon(ask, f"c{c}", prompt, False)

                    def mid_answer() -> list[list[str]]:
                        return [
                            events
                            for events in _events_by_request(fake).values()
                            if events == ["started"]
                        ]

                    # some answered, and (on a loaded machine not at every instant) one under way
                    await wait_until(
                        lambda: sum(map(len, answered.values())) >= 8 + 6 and bool(mid_answer()),
                        timeout=15,
                    )
                    in_flight = mid_answer()
                    assert in_flight, "nothing was in the middle of an answer"
                    await server.kill()
        assert server.process.returncode == -9
    finally:
        server.ensure_stopped()

    turns = check_database(data / "easybackend.sqlite3")
    for c in range(8):
        stored = [row["prompt"] for row in turns[f"c{c}"]]
        # every ask whose answer reached the client is stored, and nothing twice
        assert set(answered[f"c{c}"]) <= set(stored), (answered[f"c{c}"], stored)
        assert len(set(stored)) == len(stored)
        assert stored[0] == "warm up"
    assert sum(map(len, turns.values())) >= 8 + 6

    # a new server on the same directory carries on where the old one stopped
    restarted = await start_server(CONVERSATIONS_DIR=str(data))
    async with restarted.client() as client:
        response = await client.post("/ask/c0", json={"prompt": "after the crash"})
        assert response.status_code == 200, response.text
    expected = [(row["prompt"], row["answer"]) for row in turns["c0"]]
    assert history_of(upstream_messages(fake)) == expected
    assert response.json()["response"] == echo(2 * len(expected) + 1, "after the crash")
    after = stored_turns(restarted.settings.sqlite_path, "c0")
    assert [row["seq"] for row in after] == list(range(1, len(expected) + 2))


def _events_by_request(fake) -> dict[str, list[str]]:
    events: dict[str, list[str]] = defaultdict(list)
    for event in fake.events:
        events[event["id"]].append(event["event"])
    return events
