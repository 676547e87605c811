"""The WebSocket transport over real sockets: the original text protocol, JSON, cancellation."""

from __future__ import annotations

import json

import pytest
import trio
from helpers import database
from helpers.servers import Server, free_port
from helpers.websocket import original_pieces
from trio_websocket import ConnectionClosed, open_websocket_url

LONG = "[[fake:tokens=300]][[fake:delay=0.02]] long answer"


def ws_url(server: Server) -> str:
    return f"ws://127.0.0.1:{server.running.ws_port}"


def stored_turns(server: Server, conversation_id: str) -> list[tuple[str, str, str]]:
    turns = database.stored_turns(server.settings.sqlite_path, conversation_id)
    return [(turn["prompt"], turn["answer"], turn["finish_reason"]) for turn in turns]


async def original_answer(ws, conversation_id: str, prompt: str) -> list[str]:
    await ws.send_message(f"<|ask|>${conversation_id}${prompt}")
    return await original_pieces(ws)


async def json_exchange(ws, payload: dict) -> list[dict]:
    """Send a JSON ask and collect replies up to and including its end or error."""
    await ws.send_message(json.dumps(payload))
    replies = []
    with trio.fail_after(10):
        while True:
            reply = json.loads(await ws.get_message())
            replies.append(reply)
            if reply["type"] in ("end", "error"):
                return replies


async def wait_for_event(server: Server, event: str, *, timeout: float) -> dict:
    with trio.fail_after(timeout):
        while True:
            for record in server.fake.events:
                if record["event"] == event:
                    return record
            await trio.sleep(0.01)


async def test_original_protocol_prompt_keeps_dollars_and_blank_lines(ws_server):
    prompt = "price: $5 $ and $HOME\n\nsecond paragraph $"
    async with open_websocket_url(ws_url(ws_server)) as ws:
        pieces = await original_answer(ws, "111222333", prompt)
    assert len(pieces) > 1  # streamed in pieces, not one frame
    assert "".join(pieces) == f"echo(1): {prompt}"
    assert ws_server.fake.requests[-1]["body"]["messages"][-1]["content"] == prompt


async def test_malformed_messages_then_a_valid_ask_on_the_same_socket(ws_server):
    async with open_websocket_url(ws_url(ws_server)) as ws:
        for bad in ("<|ask|>$only-an-id", "<|ask|>$bad id$hello", "hello there"):
            await ws.send_message(bad)
            with trio.fail_after(5):
                reply = await ws.get_message()
            assert reply.startswith("<|err|>$") and len(reply) > len("<|err|>$"), reply
        await ws.send_message(b"\x00\x01binary")
        with trio.fail_after(5):
            reply = json.loads(await ws.get_message())
        assert reply["type"] == "error" and "binary" in reply["message"]
        assert "".join(await original_answer(ws, "abc", "still here?")) == "echo(1): still here?"
    assert len(ws_server.fake.requests) == 1  # nothing malformed reached the model


async def test_memory_carries_over_between_asks(ws_server):
    async with open_websocket_url(ws_url(ws_server)) as ws:
        await original_answer(ws, "mem", "first")
        await original_answer(ws, "mem", "second")
    messages = ws_server.fake.requests[-1]["body"]["messages"]
    assert [m["content"] for m in messages] == ["first", "echo(1): first", "second"]


async def test_json_protocol_ask_ping_and_errors(ws_server):
    async with open_websocket_url(ws_url(ws_server)) as ws:
        replies = await json_exchange(
            ws, {"type": "ask", "conversation_id": "j1", "prompt": "hi there", "id": "a1"}
        )
        start, *deltas, end = replies
        assert start["type"] == "start" and start["id"] == "a1" and start["seq"] == 1
        assert all(d["type"] == "delta" and d["id"] == "a1" for d in deltas)
        assert "".join(d["text"] for d in deltas) == "echo(1): hi there"
        assert end["type"] == "end" and end["id"] == "a1" and end["finish_reason"] == "stop"
        assert end["usage"]["completion_tokens"] > 0

        await ws.send_message(json.dumps({"type": "ping", "id": 5}))
        with trio.fail_after(5):
            assert json.loads(await ws.get_message()) == {"type": "pong", "id": 5}

        for bad, code in (
            ("{not json", "invalid_input"),
            (json.dumps([1, 2]), "invalid_input"),
            (json.dumps({"type": "dance"}), "invalid_input"),
            (
                json.dumps({"type": "ask", "conversation_id": "../x", "prompt": "p"}),
                "invalid_input",
            ),
            (json.dumps({"type": "ask", "conversation_id": "ok", "prompt": ""}), "invalid_input"),
            (
                json.dumps(
                    {"type": "ask", "conversation_id": "ok", "prompt": "p", "temperature": 9}
                ),
                "invalid_input",
            ),
        ):
            await ws.send_message(bad)
            with trio.fail_after(5):
                reply = json.loads(await ws.get_message())
            assert reply["type"] == "error" and reply["code"] == code and reply["message"], (
                bad,
                reply,
            )

        replies = await json_exchange(
            ws,
            {
                "type": "ask",
                "conversation_id": "j1",
                "prompt": "[[fake:tokens=500]] x",
                "max_tokens": 3,
            },
        )
        assert replies[-1]["finish_reason"] == "length"
        assert ws_server.fake.requests[-1]["body"]["max_tokens"] == 3


async def test_json_cancel_stops_the_answer_and_stores_the_partial_turn(ws_server):
    async with open_websocket_url(ws_url(ws_server)) as ws:
        await ws.send_message(
            json.dumps({"type": "ask", "conversation_id": "c1", "prompt": LONG, "id": 1})
        )
        received = []
        with trio.fail_after(10):
            while len(received) < 3:
                received.append(json.loads(await ws.get_message()))
        await ws.send_message(json.dumps({"type": "cancel"}))
        with trio.fail_after(10):
            while (reply := json.loads(await ws.get_message()))["type"] == "delta":
                received.append(reply)
        request_id = reply.pop("request_id")
        assert reply == {"type": "end", "finish_reason": "cancelled", "usage": None, "id": 1}
        assert len(request_id) == 16
        disconnected = await wait_for_event(ws_server, "disconnected", timeout=1)
        assert disconnected["chunks"] < 300
        # the socket stays usable
        replies = await json_exchange(
            ws, {"type": "ask", "conversation_id": "c1", "prompt": "after"}
        )
        assert replies[-1]["finish_reason"] == "stop"
    turns = stored_turns(ws_server, "c1")
    (prompt, answer, reason), after = turns
    assert (prompt, reason) == (LONG, "cancelled")
    assert received[0]["type"] == "start"
    assert answer == "".join(r["text"] for r in received[1:])
    assert after[2] == "stop"


async def test_closing_the_socket_mid_answer_cancels_upstream_and_stores_partial(ws_server):
    async with open_websocket_url(ws_url(ws_server)) as ws:
        await ws.send_message(f"<|ask|>$gone${LONG}")
        with trio.fail_after(10):
            for _ in range(3):
                await ws.get_message()
    await wait_for_event(ws_server, "disconnected", timeout=1)
    with trio.fail_after(5):
        while not stored_turns(ws_server, "gone"):
            await trio.sleep(0.01)
    [(prompt, answer, reason)] = stored_turns(ws_server, "gone")
    assert reason == "cancelled"
    assert answer.startswith("echo(1): long answer") and not answer.endswith(" t297")


async def test_fifty_parallel_streams_each_get_their_own_answer(ws_server):
    results: dict[int, str] = {}

    async def one(i: int) -> None:
        async with open_websocket_url(ws_url(ws_server)) as ws:
            prompt = f"[[fake:delay=0.005]] prompt number {i} $ {i}"
            results[i] = "".join(await original_answer(ws, f"par-{i}", prompt))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(one, i)
    assert results == {i: f"echo(1): prompt number {i} $ {i}" for i in range(50)}


async def test_oversized_message_closes_with_1009_and_server_keeps_serving(start_server):
    server = await start_server(WS_PORT=str(free_port()), MAX_BODY_BYTES="4096")
    async with open_websocket_url(ws_url(server)) as ws:
        await ws.send_message("<|ask|>$big$" + "x" * 10_000)
        with pytest.raises(ConnectionClosed) as closed, trio.fail_after(5):
            await ws.get_message()
        assert closed.value.reason.code == 1009
    async with open_websocket_url(ws_url(server)) as ws:
        assert "".join(await original_answer(ws, "small", "ok")) == "echo(1): ok"


async def test_shutdown_lets_the_answer_finish_then_closes_going_away(ws_server):
    async with open_websocket_url(ws_url(ws_server)) as ws:
        await ws.send_message("<|ask|>$sd$[[fake:tokens=20]][[fake:delay=0.01]] bye")
        with trio.fail_after(5):
            await ws.get_message()  # the first piece
        ws_server.shutdown.set()
        await original_pieces(ws)  # the rest of the answer, up to its end
        with trio.fail_after(10):
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
        assert closed.value.reason.code == 1001
    assert stored_turns(ws_server, "sd")[0][2] == "stop"
