"""Bad input on every port: schema fuzzing, malformed frames, garbage bytes, huge bodies, bad ids.

Each is answered with a clear error (or a closed connection) and the server
keeps serving: every test ends with ordinary asks on every protocol.
"""

from __future__ import annotations

import json
import random

import purerpc
import pytest
import trio
from helpers.fuzz import run_schemathesis
from helpers.servers import Server, free_port
from helpers.websocket import original_pieces
from trio_websocket import ConnectionClosed, open_websocket_url

from easybackend.proto_gen import chat_grpc, chat_pb2

KEY = "fuzzer-SECRET-0000"


@pytest.fixture
async def target(start_server) -> Server:
    return await start_server(
        API_KEYS=f"fuzzer:{KEY}",
        WS_PORT=str(free_port()),
        GRPC_PORT=str(free_port()),
        WS_HANDSHAKE_TIMEOUT="2",
    )


async def assert_every_protocol_still_answers(server: Server) -> None:
    async with server.client(headers={"Authorization": f"Bearer {KEY}"}) as client:
        reply = await client.post("/ask/after-fuzz", json={"prompt": "still there?"})
    assert reply.status_code == 200 and reply.json()["response"].endswith("still there?")
    url = f"ws://127.0.0.1:{server.running.ws_port}/?api_key={KEY}"
    async with open_websocket_url(url) as ws:
        await ws.send_message("<|ask|>$after-fuzz-ws$still there?")
        pieces = await original_pieces(ws)
    assert "".join(pieces).endswith("still there?")
    with trio.fail_after(10):
        async with purerpc.insecure_channel("127.0.0.1", server.running.grpc_port) as channel:
            stub = chat_grpc.ChatStub(channel)
            request = chat_pb2.AskRequest(conversation_id="after-fuzz-grpc", prompt="still there?")
            metadata = [("authorization", f"Bearer {KEY}")]
            replies = [reply async for reply in stub.Ask(request, metadata=metadata)]
    assert "".join(r.response for r in replies).endswith("still there?")


async def test_schemathesis_finds_no_server_error_and_no_schema_violation(target):
    await run_schemathesis(target.http_url, KEY, max_examples=25, seed=20261125)
    await assert_every_protocol_still_answers(target)


async def test_malformed_websocket_frames_get_errors_and_the_socket_stays(target):
    url = f"ws://127.0.0.1:{target.running.ws_port}/?api_key={KEY}"
    rng = random.Random(7)
    async with open_websocket_url(url, max_message_size=4 * 1024 * 1024) as ws:
        for frame in (
            b"\x00\xff binary",
            "{not json",
            "[1, 2, 3]",
            json.dumps({"type": "launch-missiles"}),
            json.dumps({"type": "ask"}),
            json.dumps({"type": "ask", "conversation_id": 5, "prompt": ["x"]}),
            json.dumps({"type": "ask", "conversation_id": "x", "prompt": "p", "max_tokens": True}),
            "<|ask|>",
            "<|ask|>$$",
            "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(200)),
        ):
            await ws.send_message(frame)
            with trio.fail_after(5):
                reply = await ws.get_message()
            assert reply.startswith("<|err|>$") or json.loads(reply)["type"] == "error", (
                frame,
                reply,
            )
    # a 2 MiB frame is over the 1 MiB limit: the socket is closed with 1009, nothing crashes
    async with open_websocket_url(url) as ws:
        with pytest.raises(ConnectionClosed) as closed, trio.fail_after(5):
            await ws.send_message("x" * (2 * 1024 * 1024))
            await ws.get_message()
        assert closed.value.reason.code == 1009
    await assert_every_protocol_still_answers(target)


def masked_text_frame(payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


async def test_invalid_utf8_text_frame_closes_with_1007(target):
    stream = await trio.open_tcp_stream("127.0.0.1", target.running.ws_port)
    handshake = (
        f"GET /?api_key={KEY} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    received = b""
    with trio.fail_after(5):
        await stream.send_all(handshake)
        while b"\r\n\r\n" not in received:
            received += await stream.receive_some()
        assert received.startswith(b"HTTP/1.1 101")
        received = received.split(b"\r\n\r\n", 1)[1]
        await stream.send_all(masked_text_frame(b"<|ask|>$x$\xff\xfe\xfd"))
        while chunk := await stream.receive_some():
            received += chunk
    # the server ends the connection, with a close frame 1007 (invalid payload data) if any
    if received:
        assert received[0] == 0x88 and int.from_bytes(received[2:4], "big") == 1007, received
    await stream.aclose()
    await assert_every_protocol_still_answers(target)


@pytest.mark.parametrize("port_name", ["http_port", "ws_port", "grpc_port"])
async def test_garbage_bytes_on_every_port_are_refused(target, port_name):
    port = getattr(target.running, port_name)
    rng = random.Random(port_name)
    payloads = [
        bytes(rng.randrange(256) for _ in range(4096)),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),  # a TLS hello on a plain port
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04",  # a truncated HTTP/2 preface
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
        b"\r\n" * 3000,
    ]
    for payload in payloads:
        # A client sends garbage and stops: the server must end the connection (at the latest
        # when the WebSocket handshake times out), with an error reply or without.
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(10):
            try:
                await stream.send_all(payload)
                await stream.send_eof()
                while await stream.receive_some():
                    pass
            except trio.BrokenResourceError:
                pass  # the server reset the connection
        await stream.aclose()
    await assert_every_protocol_still_answers(target)


async def test_huge_body_and_bad_ids_get_clear_errors(target):
    headers = {"Authorization": f"Bearer {KEY}"}
    # an 8 MiB body is refused as soon as its headers arrive
    stream = await trio.open_tcp_stream("127.0.0.1", target.running.http_port)
    head = (
        f"POST /ask/big HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {8 * 1024 * 1024}\r\n\r\n"
    )
    reply = b""
    with trio.fail_after(10):
        await stream.send_all(head.encode() + b'{"prompt": "' + b"x" * 65536)
        while b"request_too_large" not in reply and (chunk := await stream.receive_some()):
            reply += chunk
    await stream.aclose()
    assert reply.startswith(b"HTTP/1.1 413") and b"request_too_large" in reply
    async with target.client(headers=headers) as client:
        for bad_id in ("..%2F..%2Fetc", "a%00b", "x" * 10_000):
            reply = await client.post(f"/ask/{bad_id}", json={"prompt": "p"})
            assert reply.status_code == 400, bad_id[:20]
            assert reply.json()["error"]["code"] == "invalid_input"
    url = f"ws://127.0.0.1:{target.running.ws_port}/?api_key={KEY}"
    async with open_websocket_url(url) as ws:
        for bad_id in ("../../etc", "a\x00b", "x" * 10_000):
            await ws.send_message(
                json.dumps({"type": "ask", "conversation_id": bad_id, "prompt": "p"})
            )
            with trio.fail_after(5):
                reply = json.loads(await ws.get_message())
            assert reply["type"] == "error" and reply["code"] == "invalid_input"
            await ws.send_message(f"<|ask|>${bad_id}$p")
            with trio.fail_after(5):
                assert (await ws.get_message()).startswith("<|err|>$conversation_id must be")
    assert not target.fake.requests
    await assert_every_protocol_still_answers(target)
