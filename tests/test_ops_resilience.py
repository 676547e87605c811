"""Upstream resilience (SPEC §7): retries before the first token, timeouts, and clear errors.

Every test runs a real server against the fake upstream, whose failure
injection (queued faults, inline ``[[fake:…]]`` directives) drives the real
``openai`` SDK over real sockets.
"""

from __future__ import annotations

import grpc
import trio
from helpers.database import stored_turns, turn_count
from helpers.grpc import grpc_ask
from helpers.http import error_code, parse_sse
from helpers.logs import metric, scrape
from helpers.servers import free_port
from helpers.upstream import UPSTREAM_KEY, full_answer, queue_faults, started_times
from helpers.waiting import wait_until
from helpers.websocket import ws_json_ask

WRONG_KEY = "sk-wrong-upstream-SECRET-9876543210"


def retries(text: str) -> float:
    return metric(text, "easybackend_upstream_retries_total")


def upstream_errors(text: str, kind: str) -> float:
    return metric(text, "easybackend_upstream_errors_total", kind=kind)


# -- retries ------------------------------------------------------------------------------------


async def test_rate_limit_with_retry_after_then_success_is_one_answer_from_two_calls(
    fake, start_server
):
    server = await start_server(UPSTREAM_RETRIES="2")
    await queue_faults(fake, {"status": 429, "retry_after": 0.6})
    async with server.client() as client:
        with trio.fail_after(5):
            response = await client.post("/ask/limited", json={"prompt": "hello"})
        assert response.status_code == 200, response.text
        assert response.json()["response"] == "echo(1): hello"
        text = await scrape(client)
    assert [r["fault"] for r in fake.requests] == [{"status": 429, "retry_after": 0.6}, None]
    first, second = started_times(fake)
    # Retry-After was honoured: the backoff of a first retry alone is at most 0.5 s.
    assert second - first >= 0.55
    assert len(stored_turns(server.settings.sqlite_path, "limited")) == 1
    assert retries(text) == 1
    assert upstream_errors(text, "upstream_rate_limited") == 1
    assert metric(text, "easybackend_asks_total", protocol="http", outcome="ok") == 1


async def test_server_error_then_success_streams_one_answer(fake, start_server):
    server = await start_server(UPSTREAM_RETRIES="2")
    await queue_faults(fake, {"status": 500})
    async with server.client() as client:
        with trio.fail_after(5):
            response = await client.post("/ask/flaky/stream", json={"prompt": "hello again"})
        assert response.status_code == 200, response.text
        frames = parse_sse(response.text)
        text = await scrape(client)
    assert [event for event, _ in frames][-1] == "end"
    assert "".join(data["text"] for event, data in frames if event == "delta") == (
        "echo(1): hello again"
    )
    assert len(fake.requests) == 2
    (turn,) = stored_turns(server.settings.sqlite_path, "flaky")
    assert (turn["answer"], turn["finish_reason"]) == ("echo(1): hello again", "stop")
    assert retries(text) == 1
    assert upstream_errors(text, "upstream_error") == 1
    assert metric(text, "easybackend_asks_total", protocol="sse", outcome="ok") == 1


async def test_retries_stop_after_upstream_retries(fake, start_server):
    server = await start_server(UPSTREAM_RETRIES="2")
    await queue_faults(fake, *[{"status": 503, "retry_after": 0}] * 3)
    async with server.client() as client:
        with trio.fail_after(5):
            response = await client.post("/ask/down", json={"prompt": "anyone?"})
        assert response.status_code == 502
        assert error_code(response) == "upstream_error"
        assert "503" in response.json()["error"]["message"]
        assert len(fake.requests) == 3  # the first call and two retries
        assert turn_count(server.settings.sqlite_path) == 0
        text = await scrape(client)
        assert retries(text) == 2
        assert upstream_errors(text, "upstream_error") == 3
        assert (
            metric(text, "easybackend_asks_total", protocol="http", outcome="upstream_error") == 1
        )

        # the failed ask left nothing behind: the next one starts the conversation afresh
        response = await client.post("/ask/down", json={"prompt": "now?"})
    assert response.json()["response"] == "echo(1): now?"
    assert len(stored_turns(server.settings.sqlite_path, "down")) == 1


async def test_retry_after_beyond_the_limit_is_not_waited_for(fake, start_server):
    server = await start_server(UPSTREAM_RETRIES="2")
    await queue_faults(fake, {"status": 429, "retry_after": 60})
    async with server.client() as client:
        started = trio.current_time()
        with trio.fail_after(5):
            response = await client.post("/ask/later", json={"prompt": "hello"})
        assert trio.current_time() - started < 3
        assert response.status_code == 429
        assert error_code(response) == "upstream_rate_limited"
        assert "rate limit" in response.json()["error"]["message"]
        text = await scrape(client)
    assert len(fake.requests) == 1
    assert retries(text) == 0
    assert upstream_errors(text, "upstream_rate_limited") == 1


async def test_unreachable_upstream_is_retried_then_reported(start_server):
    server = await start_server(
        UPSTREAM_RETRIES="1", OPENAI_BASE_URL=f"http://127.0.0.1:{free_port()}/v1"
    )
    async with server.client() as client:
        with trio.fail_after(5):
            response = await client.post("/ask/nobody", json={"prompt": "hello"})
        assert response.status_code == 503  # the provider is unavailable
        assert error_code(response) == "upstream_unavailable"
        assert "could not be reached" in response.json()["error"]["message"]
        text = await scrape(client)
    assert retries(text) == 1
    assert upstream_errors(text, "upstream_unavailable") == 2
    assert turn_count(server.settings.sqlite_path) == 0


# -- failures after the first token -------------------------------------------------------------


async def test_disconnect_mid_stream_gives_the_partial_text_then_an_error(fake, start_server):
    server = await start_server(
        UPSTREAM_RETRIES="2", WS_PORT=str(free_port()), GRPC_PORT=str(free_port())
    )
    prompt = "hello [[fake:tokens=10]] [[fake:disconnect_after=3]]"
    partial = full_answer(1, "hello", 3)  # the three tokens sent before the drop

    async with server.client() as client:
        with trio.fail_after(10):
            response = await client.post("/ask/broken/stream", json={"prompt": prompt})
    assert response.status_code == 200
    frames = parse_sse(response.text)
    events = [event for event, _ in frames]
    assert events == ["delta"] * (len(events) - 1) + ["error"] and len(events) > 1, events
    assert "".join(data["text"] for _, data in frames[:-1]) == partial
    assert frames[-1][1]["code"] == "upstream_error"
    assert "broke off" in frames[-1][1]["message"]

    replies = await ws_json_ask(
        server.running.ws_port, {"conversation_id": "broken-ws", "prompt": prompt}
    )
    types = [r["type"] for r in replies]
    assert types == ["start"] + ["delta"] * (len(types) - 2) + ["error"] and len(types) > 2, types
    assert "".join(r["text"] for r in replies[1:-1]) == partial
    assert replies[-1]["code"] == "upstream_error"

    result = await grpc_ask(server.running.grpc_port, "broken-grpc", prompt)
    assert result.text == partial
    assert result.code == grpc.StatusCode.UNAVAILABLE
    assert "broke off" in result.details

    # after the first token nothing is retried, and a failed answer is not stored
    assert len(fake.requests) == 3
    assert turn_count(server.settings.sqlite_path) == 0
    async with server.client() as client:
        response = await client.post("/ask/broken", json={"prompt": "again"})
        text = await scrape(client)
    assert response.json()["response"] == "echo(1): again"
    assert [t["answer"] for t in stored_turns(server.settings.sqlite_path, "broken")] == [
        "echo(1): again"
    ]
    assert retries(text) == 0
    assert upstream_errors(text, "upstream_error") == 3


async def test_a_stall_becomes_a_timeout_error_within_the_idle_bound(fake, start_server):
    server = await start_server(UPSTREAM_RETRIES="2", UPSTREAM_IDLE_TIMEOUT="0.5")
    async with server.client() as client:
        times: list[float] = []
        frames: list[str] = []
        with trio.fail_after(5):
            async with client.stream(
                "POST", "/ask/stalled/stream", json={"prompt": "x [[fake:stall_after=2]]"}
            ) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("event: "):
                        frames.append(line.removeprefix("event: "))
                        times.append(trio.current_time())
        assert frames == ["start", "delta", "delta", "error"]
        assert 0.4 <= times[-1] - times[-2] < 2.0  # the idle timeout, not a hang

        # before the first token: a plain 504, within the bound too
        started = trio.current_time()
        with trio.fail_after(5):
            response = await client.post(
                "/ask/stalled", json={"prompt": "[[fake:stall_after=0]] y"}
            )
        assert 0.4 <= trio.current_time() - started < 2.0
        assert response.status_code == 504
        assert error_code(response) == "upstream_timeout"
        assert "sent nothing for 0.5 seconds" in response.json()["error"]["message"]
        text = await scrape(client)
    # the stalled calls were closed, not retried, and nothing was stored
    assert len(fake.requests) == 2
    await wait_until(lambda: [e["event"] for e in fake.events].count("disconnected") == 2)
    assert turn_count(server.settings.sqlite_path) == 0
    assert upstream_errors(text, "upstream_timeout") == 2
    assert metric(text, "easybackend_asks_total", protocol="sse", outcome="upstream_timeout") == 1


async def test_total_timeout_cuts_a_slow_answer(fake, start_server):
    server = await start_server(UPSTREAM_TIMEOUT="1")
    slow = "[[fake:tokens=200]] [[fake:delay=0.02]] take your time"  # about 4 s
    async with server.client() as client:
        started = trio.current_time()
        with trio.fail_after(5):
            response = await client.post("/ask/slow", json={"prompt": slow})
        assert 0.9 <= trio.current_time() - started < 2.5
        assert response.status_code == 504
        assert error_code(response) == "upstream_timeout"
        assert "within 1 seconds" in response.json()["error"]["message"]
        text = await scrape(client)
    await wait_until(lambda: fake.events[-1]["event"] == "disconnected")
    assert 10 < fake.events[-1]["chunks"] < 200
    assert turn_count(server.settings.sqlite_path) == 0
    assert upstream_errors(text, "upstream_timeout") == 1


# -- errors on every protocol -------------------------------------------------------------------


async def test_upstream_rejecting_the_key_is_reported_without_the_key(fake, start_server):
    server = await start_server(
        OPENAI_API_KEY=WRONG_KEY,
        UPSTREAM_RETRIES="2",
        WS_PORT=str(free_port()),
        GRPC_PORT=str(free_port()),
    )
    async with server.client() as client:
        for path in ("/ask/keyless", "/ask/keyless/stream"):
            with trio.fail_after(5):
                response = await client.post(path, json={"prompt": "hello"})
            assert response.status_code == 502, path
            assert error_code(response) == "upstream_auth_failed"
            assert "rejected" in response.json()["error"]["message"]
            raw = response.text + str(response.headers)
            assert WRONG_KEY not in raw and UPSTREAM_KEY not in raw and "SECRET" not in raw
        text = await scrape(client)

    replies = await ws_json_ask(
        server.running.ws_port, {"conversation_id": "keyless", "prompt": "hello"}
    )
    assert [(r["type"], r["code"]) for r in replies] == [("error", "upstream_auth_failed")]
    assert "SECRET" not in str(replies)

    result = await grpc_ask(server.running.grpc_port, "keyless", "hello")
    assert result.code == grpc.StatusCode.UNAVAILABLE
    assert "rejected" in result.details and "SECRET" not in result.details

    assert len(fake.requests) == 4  # never retried
    assert all(r["headers"]["authorization"] == f"Bearer {WRONG_KEY}" for r in fake.requests)
    assert retries(text) == 0
    assert upstream_errors(text, "upstream_auth_failed") == 2
    assert turn_count(server.settings.sqlite_path) == 0


async def test_rate_limit_and_timeout_map_to_each_protocols_errors(fake, start_server):
    server = await start_server(
        UPSTREAM_IDLE_TIMEOUT="0.5", WS_PORT=str(free_port()), GRPC_PORT=str(free_port())
    )
    ws_port, grpc_port = server.running.ws_port, server.running.grpc_port

    await queue_faults(fake, {"status": 429, "retry_after": 60}, {"status": 429})
    replies = await ws_json_ask(ws_port, {"conversation_id": "m", "prompt": "a"})
    assert [(r["type"], r["code"]) for r in replies] == [("error", "upstream_rate_limited")]
    result = await grpc_ask(grpc_port, "m", "b")
    assert result.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "rate limit" in result.details

    stall = "c [[fake:stall_after=0]]"
    replies = await ws_json_ask(ws_port, {"conversation_id": "m", "prompt": stall})
    # the model took the call (the start), then sent nothing
    assert [(r["type"], r.get("code")) for r in replies] == [
        ("start", None),
        ("error", "upstream_timeout"),
    ]
    result = await grpc_ask(grpc_port, "m", stall)
    assert result.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "sent nothing" in result.details
    assert turn_count(server.settings.sqlite_path) == 0
