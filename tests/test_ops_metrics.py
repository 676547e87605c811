"""``/metrics`` moves with every ask on every protocol; ``/readyz`` and gRPC health follow storage."""

from __future__ import annotations

import httpx2
import trio
from helpers.grpc import grpc_ask, grpc_health
from helpers.http import error_code, parse_sse, sse_leave_after_first_piece
from helpers.logs import metric, scrape
from helpers.servers import free_port
from helpers.waiting import wait_until
from helpers.websocket import ws_json_ask, ws_original_ask

from easybackend.errors import StorageUnavailable
from easybackend.proto_gen import health_pb2

PROTOCOLS = ("http", "sse", "ws", "grpc")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def counters(text: str) -> dict[str, float]:
    """The per-ask figures of one scrape, flattened."""
    values = {}
    for protocol in PROTOCOLS:
        values[f"ok/{protocol}"] = metric(
            text, "easybackend_asks_total", protocol=protocol, outcome="ok"
        )
        for name in ("time_to_first_token_seconds", "ask_duration_seconds"):
            values[f"{name}/{protocol}"] = metric(
                text, f"easybackend_{name}_count", protocol=protocol
            )
        values[f"active/{protocol}"] = metric(text, "easybackend_active_streams", protocol=protocol)
    for direction in ("prompt", "completion"):
        values[direction] = metric(text, "easybackend_tokens_total", direction=direction)
    return values


def changes(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in after if after[name] != before[name]}


async def test_metrics_move_with_each_ask_on_every_protocol(start_server):
    server = await start_server(WS_PORT=str(free_port()), GRPC_PORT=str(free_port()))
    ws_port, grpc_port = server.running.ws_port, server.running.grpc_port

    async with server.client() as client:

        async def http() -> dict[str, int]:
            response = await client.post("/ask/m-http", json={"prompt": "one two three"})
            assert response.status_code == 200, response.text
            return response.json()["usage"]

        async def sse() -> dict[str, int]:
            response = await client.post("/ask/m-sse/stream", json={"prompt": "one two"})
            event, data = parse_sse(response.text)[-1]
            assert event == "end", data
            return data["usage"]

        async def ws() -> dict[str, int]:
            replies = await ws_json_ask(ws_port, {"conversation_id": "m-ws", "prompt": "one"})
            assert replies[-1]["type"] == "end", replies
            return replies[-1]["usage"]

        async def grpc() -> dict[str, int]:
            result = await grpc_ask(grpc_port, "m-grpc", "one two three four")
            assert result.replies[-1].finish_reason == "stop", result
            usage = result.replies[-1].usage
            return {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
            }

        before = counters(await scrape(client))
        assert all(value == 0 for value in before.values()), before
        for protocol, ask in zip(PROTOCOLS, (http, sse, ws, grpc), strict=True):
            with trio.fail_after(10):
                usage = await ask()
            after = counters(await scrape(client))
            assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
            assert changes(before, after) == {
                f"ok/{protocol}": 1,
                f"time_to_first_token_seconds/{protocol}": 1,
                f"ask_duration_seconds/{protocol}": 1,
                "prompt": usage["prompt_tokens"],
                "completion": usage["completion_tokens"],
            }, protocol
            before = after

        # the original WebSocket protocol is counted as ws too
        frames = await ws_original_ask(ws_port, "m-ws", "old style")
        assert frames[-1] == "<|end|>"
        after = counters(await scrape(client))
        assert changes(before, after)["ok/ws"] == 1


async def test_active_streams_and_latency_histograms(fake, start_server):
    server = await start_server()
    slow = "[[fake:tokens=40]] [[fake:delay=0.02]] slow"  # about 0.8 s
    async with server.client() as client:
        async with trio.open_nursery() as nursery:

            async def ask() -> None:
                response = await client.post("/ask/active/stream", json={"prompt": slow})
                assert parse_sse(response.text)[-1][0] == "end"

            nursery.start_soon(ask)
            with trio.fail_after(5):
                while (
                    metric(await scrape(client), "easybackend_active_streams", protocol="sse") != 1
                ):
                    await trio.sleep(0.02)
        text = await scrape(client)
    assert metric(text, "easybackend_active_streams", protocol="sse") == 0
    assert metric(text, "easybackend_asks_total", protocol="sse", outcome="ok") == 1
    # the first token came at once, the whole answer took the 40 token delays
    ttft = metric(text, "easybackend_time_to_first_token_seconds_sum", protocol="sse")
    duration = metric(text, "easybackend_ask_duration_seconds_sum", protocol="sse")
    assert 0 < ttft < 0.5 and 0.7 <= duration < 5, (ttft, duration)
    assert metric(text, "easybackend_ask_duration_seconds_bucket", protocol="sse", le="0.5") == 0
    assert metric(text, "easybackend_ask_duration_seconds_bucket", protocol="sse", le="5.0") == 1
    assert (
        metric(text, "easybackend_time_to_first_token_seconds_bucket", protocol="sse", le="0.5")
        == 1
    )


async def test_failed_and_cancelled_asks_are_counted_by_outcome(fake, start_server):
    server = await start_server()
    async with server.client() as client:
        response = await client.post("/ask/bad%20id", json={"prompt": "x"})
        assert error_code(response) == "invalid_input"
        response = await client.post("/ask/fails", json={"prompt": "x [[fake:status=500]]"})
        assert error_code(response) == "upstream_error"

        # a client that goes away mid-answer
        await sse_leave_after_first_piece(client, "gone")

        def outcome(name: str, protocol: str) -> float:
            return metric(text, "easybackend_asks_total", protocol=protocol, outcome=name)

        text = await scrape(client)
        with trio.fail_after(5):
            while outcome("cancelled", "sse") != 1:
                await trio.sleep(0.02)
                text = await scrape(client)
    assert outcome("invalid_input", "http") == 1
    assert outcome("upstream_error", "http") == 1
    assert outcome("ok", "http") == outcome("ok", "sse") == 0
    assert metric(text, "easybackend_upstream_errors_total", kind="upstream_error") == 1
    assert metric(text, "easybackend_active_streams", protocol="sse") == 0
    await wait_until(lambda: fake.events[-1]["event"] == "disconnected")


async def test_readiness_follows_storage_on_http_and_grpc_health(start_server, monkeypatch):
    server = await start_server(GRPC_PORT=str(free_port()))
    grpc_port = server.running.grpc_port
    storage = server.running.service.storage

    async def unreachable() -> None:
        raise StorageUnavailable("the database is locked")

    async def hanging() -> None:
        await trio.sleep_forever()

    async with server.client() as client:

        async def readiness() -> httpx2.Response:
            with trio.fail_after(5):
                return await client.get("/readyz")

        response = await readiness()
        assert (response.status_code, response.json()) == (200, {"status": "ready"})
        assert await grpc_health(grpc_port) == SERVING
        assert await grpc_health(grpc_port, "chat.Chat") == SERVING

        monkeypatch.setattr(storage, "ping", unreachable)
        response = await readiness()
        assert response.status_code == 503
        assert error_code(response) == "storage_unavailable"
        assert await grpc_health(grpc_port) == NOT_SERVING
        assert await grpc_health(grpc_port, "chat.Chat") == NOT_SERVING
        assert (await client.get("/healthz")).status_code == 200  # alive, just not ready

        # a store that does not answer at all is not ready either, and the probe does not hang
        monkeypatch.setattr("easybackend.chat.service.READY_TIMEOUT", 0.2)
        monkeypatch.setattr(storage, "ping", hanging)
        started = trio.current_time()
        response = await readiness()
        assert response.status_code == 503
        assert await grpc_health(grpc_port) == NOT_SERVING
        assert trio.current_time() - started < 2

        monkeypatch.undo()
        response = await readiness()
        assert (response.status_code, response.json()) == (200, {"status": "ready"})
        assert await grpc_health(grpc_port) == SERVING
