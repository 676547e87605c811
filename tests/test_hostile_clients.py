"""Hostile clients over real sockets: none may stop the server, and each gets a clear answer.

Clients that walk away mid-answer or mid-handshake, JSON nested too deep, frames that
break the WebSocket protocol, and answer pieces larger than the message limit.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
from collections.abc import Callable

import grpc
import purerpc
import pytest
import trio
from helpers import database
from helpers.grpc import grpc_ask, grpc_health
from helpers.one_piece_upstream import serve_one_piece
from helpers.servers import Server, free_port
from helpers.websocket import original_pieces, ws_json_ask, ws_original_ask
from trio_websocket import open_websocket_url

from easybackend.chat.client_json import MAX_DEPTH
from easybackend.proto_gen import chat_grpc, chat_pb2

LONG_ANSWER = "[[fake:tokens=300]] [[fake:delay=0.001]] long"
API_KEY = "hostile:SECRET-hostile-key-0123456789"


@pytest.fixture
async def all_protocols(start_server) -> Server:
    return await start_server(WS_PORT=str(free_port()), GRPC_PORT=str(free_port()))


async def assert_serving_everywhere(server: Server, api_key: str | None = None) -> None:
    """One ask on each protocol is answered in full."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with server.client(headers=headers) as client:
        response = await client.post("/ask/after-http", json={"prompt": "still there?"})
    assert response.status_code == 200, response.text
    assert response.json()["response"] == "echo(1): still there?"
    replies = await ws_json_ask(
        server.running.ws_port,
        {"conversation_id": "after-ws", "prompt": "still there?"},
        api_key=api_key,
    )
    assert replies[-1]["type"] == "end", replies
    assert "".join(r["text"] for r in replies if r["type"] == "delta") == "echo(1): still there?"
    result = await grpc_ask(server.running.grpc_port, "after-grpc", "still there?", api_key=api_key)
    assert result.code == grpc.StatusCode.OK, result.details
    assert result.text == "echo(1): still there?"
    assert await grpc_health(server.running.grpc_port) == 1  # SERVING


async def run_clients(count: int, at_once: int, client: Callable[[int], object]) -> None:
    """Run ``client(n)`` for n in range(count), ``at_once`` at a time."""
    limiter = trio.CapacityLimiter(at_once)

    async def limited(n: int) -> None:
        async with limiter:
            await client(n)  # type: ignore[misc]

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for n in range(count):
                nursery.start_soon(limited, n)


# -- 1: clients that go away ------------------------------------------------------------------


async def test_websocket_clients_closing_mid_answer_leave_the_server_serving(all_protocols):
    """8 at a time, 32 clients ask for a long answer, read one frame and close.

    The server used to exit: the socket's answer task met ConnectionClosed, its nursery
    raised it in an ExceptionGroup, which contextlib.suppress does not catch on 3.11.
    """
    port = all_protocols.running.ws_port

    async def ask_and_leave(n: int) -> None:
        async with open_websocket_url(f"ws://127.0.0.1:{port}") as ws:
            await ws.send_message(f"<|ask|>$c{n}${LONG_ANSWER}")
            await ws.get_message()

    await run_clients(32, 8, ask_and_leave)
    await assert_serving_everywhere(all_protocols)


def handshake(*, key: str | None = "dGhlIHNhbXBsZSBub25jZQ==", api_key: str | None = None) -> bytes:
    lines = [
        "GET / HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Version: 13",
    ]
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    if api_key is not None:
        lines.append(f"Authorization: Bearer {api_key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def send_and_reset(port: int, data: bytes) -> None:
    """Send ``data`` on a new connection, then reset it (RST, not FIN) at once."""
    sock = trio.socket.socket()
    with trio.fail_after(5):
        await sock.connect(("127.0.0.1", port))
        await sock.send(data)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def test_websocket_clients_resetting_during_the_handshake_leave_the_server_serving(
    start_server,
):
    """The handshake is answered (accepted, refused for a wrong key, or refused as malformed)
    to a client that has already reset the connection: each used to stop the server
    (ConnectionClosed out of the handler or trio-websocket's reader task, OSError from
    getpeername), since nothing stood between one connection and the server's nursery."""
    server = await start_server(
        WS_PORT=str(free_port()), GRPC_PORT=str(free_port()), API_KEYS=API_KEY
    )
    port = server.running.ws_port
    attempts = [
        handshake(api_key="hostile:SECRET-wrong-key"),  # refused: 401
        handshake(key=None),  # malformed: 400
        handshake(api_key=API_KEY.split(":", 1)[1]),  # accepted
    ]

    async def reset(n: int) -> None:
        await send_and_reset(port, attempts[n % len(attempts)])

    await run_clients(60, 8, reset)
    await assert_serving_everywhere(server, api_key=API_KEY.split(":", 1)[1])


# -- 2: JSON nested too deep ------------------------------------------------------------------

DEEP = "[" * 100_000  # 100 KB, under MAX_BODY_BYTES


async def test_deeply_nested_websocket_json_is_invalid_input(all_protocols):
    port = all_protocols.running.ws_port
    deep_id = {
        "type": "ping",
        "id": json.loads("[" * 500 + "]" * 500),
    }  # parses; echoing it would not
    async with open_websocket_url(f"ws://127.0.0.1:{port}") as ws:
        for message in (DEEP, json.dumps(deep_id), '{"type": "ping", "id": NaN}'):
            await ws.send_message(message)
            with trio.fail_after(5):
                reply = json.loads(await ws.get_message())
            assert reply["type"] == "error" and reply["code"] == "invalid_input", reply
        assert str(MAX_DEPTH) in json.loads(await _error_for(ws, DEEP))["message"]
        await ws.send_message('{"type": "ping", "id": 7}')  # the socket is still usable
        with trio.fail_after(5):
            assert json.loads(await ws.get_message()) == {"type": "pong", "id": 7}
    await assert_serving_everywhere(all_protocols)


async def _error_for(ws, message: str) -> str:
    await ws.send_message(message)
    with trio.fail_after(5):
        return await ws.get_message()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/ask/deep"),
        ("POST", "/ask/deep/stream"),
        ("POST", "/conversations/deep/rollback"),
        ("PUT", "/conversations/deep/system"),
    ],
)
async def test_deeply_nested_or_undecodable_http_bodies_are_400(server, method, path):
    async with server.client() as client:
        for body in (DEEP.encode(), b'{"prompt": "\xff\xfe"}', b'{"prompt": "hi", "x": NaN}'):
            response = await client.request(method, path, content=body)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["code"] == "invalid_input", response.text
            assert "Traceback" not in response.text
        response = await client.post("/ask/deep", json={"prompt": "fine"})
    assert response.status_code == 200, response.text


async def test_an_unexpected_error_in_a_handler_is_a_json_500_without_details(server, monkeypatch):
    async def broken(*args, **kwargs):
        raise RuntimeError("internal detail: /srv/easybackend/db.sqlite")

    monkeypatch.setattr(server.running.service, "list_conversations", broken)
    async with server.client() as client:
        response = await client.get("/conversations")
        assert response.status_code == 500, response.text
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]["code"] == "internal_error", response.text
        assert "internal detail" not in response.text and "Traceback" not in response.text
        assert (await client.get("/healthz")).status_code == 200


# -- 9: answer pieces over the message limit --------------------------------------------------

LIMIT = 65536  # MAX_BODY_BYTES for these tests
# 1-, 2-, 3- and 4-byte characters, a newline and a quote (escaped in JSON): ~3.5 limits of
# UTF-8 in one piece, so cuts fall inside characters unless they are made with care.
HUGE_PIECE = ('ab"\n é中😀' * 16_000) + "end"


@pytest.fixture
async def huge_piece_server(nursery, start_server) -> Server:
    port = await nursery.start(serve_one_piece, HUGE_PIECE)
    return await start_server(
        OPENAI_BASE_URL=f"http://127.0.0.1:{port}/v1",
        MAX_BODY_BYTES=str(LIMIT),
        MAX_CONTEXT_TOKENS="100000",
        WS_PORT=str(free_port()),
        GRPC_PORT=str(free_port()),
    )


def stored_answer(server: Server, conversation_id: str) -> str:
    (turn,) = database.stored_turns(server.settings.sqlite_path, conversation_id)
    return turn["answer"]


async def test_a_huge_piece_reaches_grpcio_in_messages_under_the_limit(huge_piece_server):
    port = huge_piece_server.running.grpc_port

    def ask() -> tuple[list[chat_pb2.AskResponse], grpc.StatusCode, str]:
        options = [("grpc.max_receive_message_length", LIMIT)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            call = chat_grpc_stub(channel)(
                chat_pb2.AskRequest(conversation_id="grpcio", prompt="hi"), timeout=20
            )
            replies = []
            try:
                replies.extend(call)
            except grpc.RpcError:
                pass
            return replies, call.code(), call.details() or ""

    with trio.fail_after(30):
        replies, code, details = await trio.to_thread.run_sync(ask)
    assert code == grpc.StatusCode.OK, details
    check_grpc_replies(replies)
    assert stored_answer(huge_piece_server, "grpcio") == HUGE_PIECE


def chat_grpc_stub(channel: grpc.Channel):
    return channel.unary_stream(
        "/chat.Chat/Ask",
        request_serializer=chat_pb2.AskRequest.SerializeToString,
        response_deserializer=chat_pb2.AskResponse.FromString,
    )


def check_grpc_replies(replies: list[chat_pb2.AskResponse]) -> None:
    assert "".join(reply.response for reply in replies) == HUGE_PIECE
    assert replies[-1].finish_reason == "stop"
    assert len(replies) > 1 + len(HUGE_PIECE.encode()) // LIMIT  # the piece was cut
    assert all(reply.ByteSize() <= LIMIT for reply in replies)


async def test_a_huge_piece_reaches_purerpc_in_messages_under_the_limit(huge_piece_server):
    port = huge_piece_server.running.grpc_port
    with trio.fail_after(30):
        async with purerpc.insecure_channel("127.0.0.1", port) as channel:
            stub = chat_grpc.ChatStub(channel)
            request = chat_pb2.AskRequest(conversation_id="purerpc", prompt="hi")
            replies = [reply async for reply in stub.Ask(request)]
    check_grpc_replies(replies)
    assert stored_answer(huge_piece_server, "purerpc") == HUGE_PIECE


async def test_a_huge_piece_reaches_websocket_clients_in_frames_under_the_limit(
    huge_piece_server,
):
    url = f"ws://127.0.0.1:{huge_piece_server.running.ws_port}"
    with trio.fail_after(30):
        async with open_websocket_url(url, max_message_size=LIMIT) as ws:
            await ws.send_message("<|ask|>$original$hi")
            frames = await original_pieces(ws, timeout=30)
            assert "".join(frames) == HUGE_PIECE and len(frames) > 3
            assert all(len(frame.encode()) <= LIMIT for frame in frames)

            await ws.send_message(
                json.dumps({"type": "ask", "conversation_id": "json", "prompt": "hi", "id": "x"})
            )
            messages = []
            while True:
                message = await ws.get_message()
                assert len(message.encode()) <= LIMIT
                messages.append(json.loads(message))
                if messages[-1]["type"] not in ("start", "delta"):
                    break
    assert messages[0]["type"] == "start" and messages[-1]["type"] == "end", messages[-1]
    assert "".join(m["text"] for m in messages[1:-1]) == HUGE_PIECE and len(messages) > 5
    assert stored_answer(huge_piece_server, "original") == HUGE_PIECE
    assert stored_answer(huge_piece_server, "json") == HUGE_PIECE


# -- 17: frames that break the WebSocket protocol ---------------------------------------------


async def open_raw_websocket(port: int) -> trio.SocketStream:
    """A TCP connection that has completed the WebSocket handshake (101)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    await stream.send_all(handshake(key=key))
    response = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in response:
            more = await stream.receive_some()
            assert more, response
            response += more
    assert response.startswith(b"HTTP/1.1 101"), response
    assert response.endswith(b"\r\n\r\n"), "the server sent more than the handshake"
    return stream


def text_frame(payload: bytes, *, masked: bool = True) -> bytes:
    assert len(payload) < 126
    if not masked:
        return bytes([0x81, len(payload)]) + payload
    mask = os.urandom(4)
    return (
        bytes([0x81, 0x80 | len(payload)])
        + mask
        + bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    )


async def close_frame_then_eof(stream: trio.SocketStream) -> int:
    """Read to the end of the connection: it must hold exactly one close frame; its code."""
    data = b""
    with trio.fail_after(5):
        while more := await stream.receive_some():
            data += more
    assert data, "the connection was closed without a close frame"
    assert data[0] == 0x88 and data[1] < 126 and len(data) == 2 + data[1], data
    return struct.unpack("!H", data[2:4])[0]


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (text_frame(b"caf\xc3"), 1007),  # invalid UTF-8 (a cut 2-byte character)
        (text_frame(b"\xff\xfehello"), 1007),
        (text_frame(b"hello", masked=False), 1002),  # client frames must be masked
        (bytes([0x83, 0x80]) + b"\0\0\0\0", 1002),  # a reserved opcode
    ],
    ids=["cut-character", "not-utf8", "unmasked", "reserved-opcode"],
)
async def test_a_frame_that_breaks_the_protocol_gets_its_close_frame(all_protocols, frame, code):
    stream = await open_raw_websocket(all_protocols.running.ws_port)
    async with stream:
        await stream.send_all(frame)
        assert await close_frame_then_eof(stream) == code
    replies = await ws_original_ask(all_protocols.running.ws_port, "after-bad-frame", "hello")
    assert "".join(replies[:-1]) == "echo(1): hello" and replies[-1] == "<|end|>"
