"""Clients that go away, and upstream failures (SPEC §3 "Persistence")."""

from __future__ import annotations

import json
from functools import partial

import trio
import trio.testing
from helpers.database import stored_turns
from helpers.http import error_code
from helpers.upstream import echo, events_of, full_answer, history_of, upstream_messages
from helpers.waiting import wait_until

LONG = "tell me everything [[fake:tokens=200]] [[fake:delay=0.05]]"


async def test_sse_client_that_disconnects_cancels_upstream_and_stores_the_partial_answer(server):
    received: list[str] = []
    async with server.client() as client:
        async with client.stream("POST", "/ask/gone-sse/stream", json={"prompt": LONG}) as response:
            assert response.status_code == 200
            event = None
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "delta":
                    received.append(json.loads(line[6:])["text"])
                    if len(received) == 3:
                        break
        # the response is closed here, mid-body: the connection goes away
        with trio.fail_after(1):
            await wait_until(lambda: "disconnected" in events_of(server.fake, "chatcmpl-1"))

    assert events_of(server.fake, "chatcmpl-1") == ["started", "disconnected"]
    full = full_answer(1, "tell me everything", 200)
    db = server.settings.sqlite_path
    await wait_until(lambda: stored_turns(db, "gone-sse"), timeout=2)
    (turn,) = stored_turns(db, "gone-sse")
    assert turn["finish_reason"] == "cancelled"
    assert turn["prompt"] == LONG
    assert turn["answer"].startswith("".join(received))
    assert full.startswith(turn["answer"]) and turn["answer"] != full
    # the fake stopped generating where the server stopped reading
    chunks = server.fake.events[-1]["chunks"]
    assert 3 <= chunks < 200


async def test_plain_client_that_goes_away_cancels_upstream_and_stores_the_partial_answer(server):
    prompt = "half an answer [[fake:tokens=200]] [[fake:stall_after=4]]"
    async with server.client() as client:
        with trio.move_on_after(10) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(client.post, "/ask/gone-plain", json={"prompt": prompt}))
                # four pieces are out and the upstream waits: once the server has read
                # them (everything idle), the client gives up
                await wait_until(lambda: "stalled" in events_of(server.fake, "chatcmpl-1"))
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
        assert not scope.cancelled_caught
        with trio.fail_after(1):
            await wait_until(lambda: "disconnected" in events_of(server.fake, "chatcmpl-1"))

    db = server.settings.sqlite_path
    await wait_until(lambda: stored_turns(db, "gone-plain"), timeout=2)
    (turn,) = stored_turns(db, "gone-plain")
    assert turn["finish_reason"] == "cancelled"
    assert turn["answer"] == full_answer(1, "half an answer", 4)
    assert turn["answer"] == "echo(1): half an answer"

    # the cancelled turn is history for the next ask
    async with server.client() as client:
        response = await client.post("/ask/gone-plain", json={"prompt": "go on"})
        assert response.status_code == 200, response.text
    assert history_of(upstream_messages(server.fake)) == [(prompt, turn["answer"])]


async def test_client_gone_before_any_token_stores_nothing(server):
    prompt = "nothing yet [[fake:stall_after=0]]"
    async with server.client() as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(client.post, "/ask/gone-early", json={"prompt": prompt}))
            await wait_until(lambda: "stalled" in events_of(server.fake, "chatcmpl-1"))
            nursery.cancel_scope.cancel()
    with trio.fail_after(1):
        await wait_until(lambda: "disconnected" in events_of(server.fake, "chatcmpl-1"))
    # give the server every chance to store something it should not
    async with server.client() as client:
        response = await client.post("/ask/gone-early", json={"prompt": "fresh"})
        assert response.status_code == 200, response.text
    assert upstream_messages(server.fake) == [{"role": "user", "content": "fresh"}]
    assert [t["prompt"] for t in stored_turns(server.settings.sqlite_path, "gone-early")] == [
        "fresh"
    ]


async def test_upstream_failure_is_502_stores_nothing_and_leaves_no_trace(server):
    async with server.client() as client:
        ok = await client.post("/ask/flaky", json={"prompt": "before"})
        assert ok.status_code == 200, ok.text
        failed = await client.post("/ask/flaky", json={"prompt": "boom [[fake:status=500]]"})
        assert failed.status_code == 502, failed.text
        assert error_code(failed) == "upstream_error"
        assert "500" in failed.json()["error"]["message"]
        assert [t["prompt"] for t in stored_turns(server.settings.sqlite_path, "flaky")] == [
            "before"
        ]

        after = await client.post("/ask/flaky", json={"prompt": "after"})
        assert after.status_code == 200, after.text
    assert history_of(upstream_messages(server.fake)) == [("before", echo(1, "before"))]
    assert after.json()["response"] == echo(3, "after")
    assert "boom" not in json.dumps(server.fake.requests[-1]["body"])
    assert [t["seq"] for t in stored_turns(server.settings.sqlite_path, "flaky")] == [1, 2]


async def test_upstream_error_statuses_map_to_their_codes(server):
    cases = {500: (502, "upstream_error"), 503: (502, "upstream_error"), 429: (429, None)}
    async with server.client() as client:
        for status, (expected, code) in cases.items():
            response = await client.post(
                "/ask/statuses", json={"prompt": f"x [[fake:status={status}]]"}
            )
            assert response.status_code == expected, (status, response.text)
            assert error_code(response) == (code or "upstream_rate_limited")
    assert stored_turns(server.settings.sqlite_path, "statuses") == []


async def test_upstream_failure_is_retried_before_the_first_token_without_duplicating(
    start_server,
):
    server = await start_server(UPSTREAM_RETRIES="2")
    async with server.client() as client:
        faults = await client.post(
            f"{server.fake.base_url().removesuffix('/v1')}/_fake/faults",
            json=[{"status": 500, "retry_after": 0.01}, {"status": 503, "retry_after": 0.01}],
        )
        assert faults.status_code == 200, faults.text
        response = await client.post("/ask/retried", json={"prompt": "third time lucky"})
        assert response.status_code == 200, response.text
    assert len(server.fake.requests) == 3
    assert response.json()["response"] == echo(1, "third time lucky")
    assert [t["prompt"] for t in stored_turns(server.settings.sqlite_path, "retried")] == [
        "third time lucky"
    ]
