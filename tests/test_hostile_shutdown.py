"""Shutdown, as a client sees it: refused once it begins, told when the grace cuts it short.

Each test runs the real server in-process and sets its ``shutdown`` event (what
SIGTERM does) while a slow answer keeps it in its grace.
"""

from __future__ import annotations

import functools
import json

import grpc
import trio
from helpers.database import stored_turns
from helpers.grpc import grpc_ask
from helpers.http import error_code, parse_sse
from helpers.servers import free_port
from helpers.upstream import events_of
from helpers.waiting import wait_until
from trio_websocket import ConnectionClosed, open_websocket_url

SLOW = "[[fake:tokens=400]] [[fake:delay=0.05]]"  # about 20 s: longer than any grace here
GRACE = "1"


async def started(fake, count: int = 1) -> None:
    """The fake has received ``count`` completion requests."""
    await wait_until(lambda: len(fake.requests) >= count)


async def test_a_kept_alive_connection_is_refused_new_asks_once_shutdown_begins(start_server, fake):
    server = await start_server(SHUTDOWN_GRACE="5")
    async with server.client() as busy, server.client() as kept_alive:
        assert (await kept_alive.get("/healthz")).status_code == 200  # the connection stays open
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(busy.post, "/ask/in-flight", json={"prompt": SLOW})
            )
            await started(fake)
            server.shutdown.set()
            await trio.sleep(0.5)  # well into the grace
            response = await kept_alive.post("/ask/too-late", json={"prompt": "hello"})
            nursery.cancel_scope.cancel()
    assert response.status_code == 503, response.text
    assert error_code(response) == "shutting_down"
    assert response.headers["connection"] == "close"
    assert len(fake.requests) == 1  # the refused ask never reached the model


async def test_a_whole_answer_cut_at_the_end_of_the_grace_gets_503(start_server, fake):
    server = await start_server(SHUTDOWN_GRACE=GRACE)
    async with server.client() as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_set_after_start, fake, server.shutdown)
            with trio.fail_after(10):
                response = await client.post("/ask/cut-whole", json={"prompt": SLOW})
    assert response.status_code == 503, response.text
    assert error_code(response) == "shutting_down"
    (turn,) = stored_turns(server.settings.sqlite_path, "cut-whole")
    assert turn["finish_reason"] == "cancelled"
    assert "disconnected" in events_of(fake, fake.requests[-1]["id"])


async def test_a_streamed_answer_cut_at_the_end_of_the_grace_ends_with_an_error_event(
    start_server, fake
):
    server = await start_server(SHUTDOWN_GRACE=GRACE)
    async with server.client() as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_set_after_start, fake, server.shutdown)
            with trio.fail_after(10):
                response = await client.post("/ask/cut-sse/stream", json={"prompt": SLOW})
    frames = parse_sse(response.text)
    assert frames[-1] == ("error", {"code": "shutting_down", "message": frames[-1][1]["message"]})
    assert {event for event, _ in frames[:-1]} == {"delta"}
    received = "".join(data["text"] for _, data in frames[:-1])
    (turn,) = stored_turns(server.settings.sqlite_path, "cut-sse")
    assert (turn["finish_reason"], turn["answer"]) == ("cancelled", received)


async def test_a_websocket_cut_at_the_end_of_the_grace_gets_an_error_then_1001(start_server, fake):
    ws_port = free_port()
    server = await start_server(WS_PORT=str(ws_port), SHUTDOWN_GRACE=GRACE)
    replies = []
    with trio.fail_after(10):
        async with open_websocket_url(f"ws://127.0.0.1:{ws_port}") as ws:
            ask = {"type": "ask", "conversation_id": "cut-ws", "prompt": SLOW}
            await ws.send_message(json.dumps(ask))
            try:
                while True:
                    replies.append(json.loads(await ws.get_message()))
                    if len(replies) == 1:
                        server.shutdown.set()
            except ConnectionClosed as exc:
                closed = exc.reason
    assert closed.code == 1001, closed
    assert replies[-1]["type"] == "error" and replies[-1]["code"] == "shutting_down", replies
    assert replies[0]["type"] == "start"
    assert {reply["type"] for reply in replies[1:-1]} == {"delta"}
    received = "".join(reply["text"] for reply in replies[1:-1])
    (turn,) = stored_turns(server.settings.sqlite_path, "cut-ws")
    assert (turn["finish_reason"], turn["answer"]) == ("cancelled", received)


async def test_a_grpc_ask_cut_at_the_end_of_the_grace_gets_unavailable(start_server, fake):
    grpc_port = free_port()
    server = await start_server(GRPC_PORT=str(grpc_port), SHUTDOWN_GRACE=GRACE)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_set_after_start, fake, server.shutdown)
        result = await grpc_ask(grpc_port, "cut-grpc", SLOW)
    assert result.code == grpc.StatusCode.UNAVAILABLE, result
    assert result.details == "the server is shutting down", result
    (turn,) = stored_turns(server.settings.sqlite_path, "cut-grpc")
    assert (turn["finish_reason"], turn["answer"]) == ("cancelled", result.text)


async def _set_after_start(fake, shutdown: trio.Event) -> None:
    """Begin the shutdown once the answer is under way (a few pieces sent)."""
    await started(fake)
    await trio.sleep(0.3)
    shutdown.set()
