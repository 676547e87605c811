"""Graceful shutdown of a real process (SPEC §7): SIGTERM drains, a second SIGTERM stops at once.

``python run.py`` runs against the in-process fake upstream; the tests send
real signals and read the database the process left behind.
"""

from __future__ import annotations

import json
import re
import signal

import grpc
import httpx2
import trio
from helpers.database import stored_turns
from helpers.grpc import grpc_ask
from helpers.servers import ServerProcess, free_port, port_closed, server_env
from helpers.upstream import full_answer, history_of, upstream_messages
from helpers.waiting import wait_until
from trio_websocket import ConnectionClosed, open_websocket_url

SHORT = "short [[fake:tokens=20]] [[fake:delay=0.05]]"  # about 1 s
LONG = "long [[fake:tokens=3000]] [[fake:delay=0.01]]"  # about 30 s
LONG_ANSWER = full_answer(1, "long", 3000)
GRACE = 2.0


class SseReader:
    """Reads an SSE answer, keeping the text and the events seen, until the stream ends or breaks."""

    def __init__(self) -> None:
        self.text = ""
        self.events: list[str] = []
        self.broken: Exception | None = None

    async def run(self, client: httpx2.AsyncClient, conversation_id: str, prompt: str) -> None:
        try:
            async with client.stream(
                "POST", f"/ask/{conversation_id}/stream", json={"prompt": prompt}
            ) as response:
                async for line in response.aiter_lines():
                    if line.startswith("event: "):
                        self.events.append(line.removeprefix("event: "))
                    elif line.startswith("data: ") and self.events[-1] == "delta":
                        self.text += json.loads(line.removeprefix("data: "))["text"]
        except httpx2.HTTPError as exc:
            self.broken = exc


async def test_sigterm_finishes_short_answers_and_cuts_long_ones_at_the_grace(
    fake, tmp_path, start_server
):
    http_port, grpc_port, ws_port = free_port(), free_port(), free_port()
    data = tmp_path / "data"
    env = server_env(
        fake,
        CONVERSATIONS_DIR=str(data),
        HTTP_PORT=str(http_port),
        GRPC_PORT=str(grpc_port),
        WS_PORT=str(ws_port),
        SHUTDOWN_GRACE=str(GRACE),
    )
    process = ServerProcess(tmp_path, env)
    await process.start()
    try:
        await process.wait_healthy(http_port)
        short: dict[str, object] = {}
        sse = SseReader()
        ws_text: list[str] = []
        ws_closed: list[ConnectionClosed] = []
        grpc_replies: list = []
        grpc_result = []

        async with httpx2.AsyncClient(
            base_url=f"http://127.0.0.1:{http_port}", timeout=30
        ) as client:

            async def ask_short() -> None:
                response = await client.post("/ask/short", json={"prompt": SHORT})
                short["response"], short["at"] = response, trio.current_time()

            async def ask_ws() -> None:
                try:
                    async with open_websocket_url(f"ws://127.0.0.1:{ws_port}") as ws:
                        ask = {"type": "ask", "conversation_id": "long-ws", "prompt": LONG}
                        await ws.send_message(json.dumps(ask))
                        while True:
                            reply = json.loads(await ws.get_message())
                            if reply["type"] == "error":  # the grace is over (then: 1001)
                                assert reply["code"] == "shutting_down", reply
                                continue
                            if reply["type"] == "start":  # the turn it is stored as
                                assert reply["conversation_id"] == "long-ws", reply
                                continue
                            assert reply["type"] == "delta", reply
                            ws_text.append(reply["text"])
                except ConnectionClosed as exc:
                    ws_closed.append(exc)

            async def ask_grpc() -> None:
                grpc_result.append(await grpc_ask(grpc_port, "long-grpc", LONG, sink=grpc_replies))

            with trio.fail_after(GRACE + 10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(ask_short)
                    nursery.start_soon(sse.run, client, "long-sse", LONG)
                    nursery.start_soon(ask_ws)
                    nursery.start_soon(ask_grpc)
                    await wait_until(lambda: bool(sse.text and ws_text and grpc_replies))
                    assert "response" not in short

                    sigterm_at = trio.current_time()
                    process.process.send_signal(signal.SIGTERM)
                    for port in (http_port, grpc_port, ws_port):  # no new connection is taken
                        await port_closed(port, within=3.0)
                    assert "response" not in short  # ... while an answer is still in flight
                with trio.fail_after(10):
                    assert await process.process.wait() == 0
                stopped_at = trio.current_time()
    finally:
        process.ensure_stopped()

    # the short answer finished during the grace
    response = short["response"]
    assert response.status_code == 200, response.text
    assert response.json()["response"] == full_answer(1, "short", 20)
    assert short["at"] - sigterm_at < GRACE
    # the long ones were cut at the grace, and the process stopped right after
    assert GRACE - 0.2 <= stopped_at - sigterm_at < GRACE + 4
    assert "end" not in sse.events and ws_closed
    assert grpc_result[0].code != grpc.StatusCode.OK

    database = data / "easybackend.sqlite3"
    (turn,) = stored_turns(database, "short")
    assert (turn["answer"], turn["finish_reason"]) == (full_answer(1, "short", 20), "stop")
    partials = {}
    for conversation_id, received in (
        ("long-sse", sse.text),
        ("long-ws", "".join(ws_text)),
        ("long-grpc", "".join(r.response for r in grpc_replies)),
    ):
        (turn,) = stored_turns(database, conversation_id)
        assert turn["finish_reason"] == "cancelled", conversation_id
        assert turn["prompt"] == LONG
        # what the client got is a prefix of what was stored, itself a prefix of the answer
        assert turn["answer"].startswith(received) and received, conversation_id
        assert LONG_ANSWER.startswith(turn["answer"]) and turn["answer"] != LONG_ANSWER
        partials[conversation_id] = turn["answer"]

    stderr = process.stderr_path.read_text()
    assert "Traceback" not in stderr, stderr
    assert "SIGTERM received" in stderr
    assert stderr.splitlines()[-1].endswith("easybackend: EasyBackend stopped")
    # console access lines, one per ask, readable
    access = re.findall(
        r"INFO easybackend\.access: ask request_id=\S+ protocol=(\w+) conversation_id=(\S+) "
        r"key=- upstream=default outcome=(\w+) ttft_ms=[\d.]+ duration_ms=[\d.]+ "
        r"prompt_tokens=\d+ completion_tokens=\d+",
        stderr,
    )
    assert sorted(access) == [
        ("grpc", "long-grpc", "cancelled"),
        ("http", "short", "ok"),
        ("sse", "long-sse", "cancelled"),
        ("ws", "long-ws", "cancelled"),
    ]

    # a restart sees the partial turns, and sends them as history
    restarted = await start_server(CONVERSATIONS_DIR=str(data))
    async with restarted.client() as client:
        detail = (await client.get("/conversations/long-sse")).json()
        response = await client.post("/ask/long-sse", json={"prompt": "go on"})
    (turn,) = detail["history"]
    assert turn["finish_reason"] == "cancelled"
    assert turn["messages"][1]["text"] == partials["long-sse"]
    assert response.json()["response"] == "echo(3): go on"
    assert history_of(upstream_messages(fake)) == [(LONG, partials["long-sse"])]


async def test_a_second_sigterm_stops_at_once(fake, tmp_path):
    http_port = free_port()
    data = tmp_path / "data"
    env = server_env(
        fake,
        CONVERSATIONS_DIR=str(data),
        HTTP_PORT=str(http_port),
        GRPC_PORT="off",
        WS_PORT="off",
        SHUTDOWN_GRACE="30",
    )
    process = ServerProcess(tmp_path, env)
    await process.start()
    try:
        await process.wait_healthy(http_port)
        sse = SseReader()
        async with httpx2.AsyncClient(
            base_url=f"http://127.0.0.1:{http_port}", timeout=30
        ) as client:
            with trio.fail_after(15):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(sse.run, client, "hurry", LONG)
                    await wait_until(lambda: bool(sse.text))
                    process.process.send_signal(signal.SIGTERM)
                    await wait_until(lambda: "SIGTERM received" in process.stderr_path.read_text())
                    first_text = sse.text
                    await wait_until(lambda: len(sse.text) > len(first_text))  # still answering
                    second_at = trio.current_time()
                    process.process.send_signal(signal.SIGTERM)
                    with trio.fail_after(5):
                        assert await process.process.wait() == 0
                    assert trio.current_time() - second_at < 3  # far from the 30 s grace
    finally:
        process.ensure_stopped()

    assert "end" not in sse.events
    (turn,) = stored_turns(data / "easybackend.sqlite3", "hurry")
    assert turn["finish_reason"] == "cancelled"
    assert turn["answer"].startswith(sse.text) and LONG_ANSWER.startswith(turn["answer"])
    stderr = process.stderr_path.read_text()
    assert "Traceback" not in stderr, stderr
    assert "second SIGTERM: stopping now" in stderr
    assert stderr.splitlines()[-1].endswith("easybackend: EasyBackend stopped")
