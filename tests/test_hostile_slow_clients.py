"""Hostile clients that stop reading, or never finish a request head.

A client that asks for a long answer and then reads nothing must not hold its
ask, its stream slot and the upstream request for ever: once one send to it
has blocked for CLIENT_SEND_TIMEOUT seconds, the ask ends as if the client
had gone (partial turn stored as ``cancelled``, upstream closed, slot freed).
The clients here are raw sockets with tiny buffers (a small SO_RCVBUF and a
small MSS, which also keeps the server's send buffer small), so that the
server's writes block after a few hundred kilobytes.

A client that trickles a request head must be closed after HTTP_HEADER_TIMEOUT.
"""

from __future__ import annotations

import json
import socket

import h2.config
import h2.connection
import h2.events
import httpx2
import trio
from helpers.database import stored_turns
from helpers.grpc import grpc_ask
from helpers.servers import free_port
from helpers.upstream import events_of
from helpers.waiting import wait_until
from helpers.websocket import ws_original_ask
from trio_websocket import wrap_client_stream

from easybackend.proto_gen import chat_pb2

# The fake answers 100 000 tokens (about 700 KB) but stalls after 60 000 of them: far more
# than the tiny buffers take, and the fake is still in the request when the server gives up.
NEVER_READ_PROMPT = "[[fake:tokens=100000]] [[fake:stall_after=60000]]"
SEND_TIMEOUT = "1"


async def tiny_buffer_connection(port: int) -> trio.socket.SocketType:
    """A TCP connection to ``port`` whose client side can hold only a few kilobytes."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    await sock.connect(("127.0.0.1", port))
    return sock


async def given_up(server, fake, conversation_id: str) -> None:
    """The server gave the ask up: the turn is stored as cancelled, the upstream was closed."""
    path = server.settings.sqlite_path
    await wait_until(lambda: len(stored_turns(path, conversation_id)) == 1, timeout=20)
    (turn,) = stored_turns(path, conversation_id)
    assert turn["finish_reason"] == "cancelled"
    assert turn["answer"].startswith("echo(1): ")
    request_id = fake.requests[-1]["id"]
    await wait_until(lambda: "disconnected" in events_of(fake, request_id))


async def closed_by_server(sock: trio.socket.SocketType) -> None:
    """Read (and drop) what is buffered until the server's close shows."""
    with trio.fail_after(10):
        while True:
            try:
                if not await sock.recv(65536):
                    return
            except ConnectionResetError:
                return


async def test_sse_client_that_stops_reading_is_cut_off(start_server, fake):
    server = await start_server(CLIENT_SEND_TIMEOUT=SEND_TIMEOUT, MAX_STREAMS_PER_KEY="1")
    sock = await tiny_buffer_connection(server.running.http_port)
    body = json.dumps({"prompt": NEVER_READ_PROMPT}).encode()
    head = (
        f"POST /ask/never-read-sse/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    await sock.send(head.encode() + body)

    await given_up(server, fake, "never-read-sse")
    async with server.client() as client:  # the slot is free again
        response = await client.post("/ask/after-sse", json={"prompt": "hello"})
    assert response.status_code == 200, response.text
    await closed_by_server(sock)
    sock.close()


async def test_websocket_client_that_stops_reading_is_dropped(start_server, fake):
    ws_port = free_port()
    server = await start_server(
        WS_PORT=str(ws_port), CLIENT_SEND_TIMEOUT=SEND_TIMEOUT, MAX_STREAMS_PER_KEY="1"
    )
    sock = await tiny_buffer_connection(ws_port)
    async with trio.open_nursery() as nursery:
        ws = await wrap_client_stream(nursery, trio.SocketStream(sock), "127.0.0.1", "/")
        await ws.send_message(f"<|ask|>$never-read-ws${NEVER_READ_PROMPT}")  # then read nothing

        await given_up(server, fake, "never-read-ws")
        frames = await ws_original_ask(ws_port, "after-ws", "hello")  # the slot is free again
        assert frames[-1] == "<|end|>", frames
        nursery.cancel_scope.cancel()


def grpc_frame(message: chat_pb2.AskRequest) -> bytes:
    data = message.SerializeToString()
    return b"\x00" + len(data).to_bytes(4, "big") + data


async def raw_grpc_ask(
    sock: trio.socket.SocketType, port: int, conversation_id: str
) -> h2.connection.H2Connection:
    """Send one Ask over a raw HTTP/2 connection (and read nothing); returns the client's h2 state."""
    h2_client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    h2_client.initiate_connection()
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/chat.Chat/Ask"),
        (":authority", f"127.0.0.1:{port}"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    h2_client.send_headers(1, headers)
    ask = chat_pb2.AskRequest(conversation_id=conversation_id, prompt=NEVER_READ_PROMPT)
    h2_client.send_data(1, grpc_frame(ask), end_stream=True)
    await sock.send(h2_client.data_to_send())
    return h2_client


async def test_grpc_connection_that_stops_reading_is_closed(start_server, fake):
    """The client reads nothing at all: the server's writes block, and the connection is closed."""
    grpc_port = free_port()
    server = await start_server(
        GRPC_PORT=str(grpc_port), CLIENT_SEND_TIMEOUT=SEND_TIMEOUT, MAX_STREAMS_PER_KEY="1"
    )
    sock = await tiny_buffer_connection(grpc_port)
    await raw_grpc_ask(sock, grpc_port, "never-read-grpc")

    await given_up(server, fake, "never-read-grpc")
    result = await grpc_ask(grpc_port, "after-grpc", "hello")  # the slot is free again
    assert result.text == "echo(1): hello", result
    await closed_by_server(sock)
    sock.close()


async def test_grpc_stream_whose_window_stays_shut_is_given_up(start_server, fake):
    """The client never opens the stream's flow-control window again: the call is given up.

    What the server stored is exactly what the client can still read: the whole
    response messages sent before it gave up (the one it was sending when the
    deadline passed is not counted).
    """
    grpc_port = free_port()
    server = await start_server(
        GRPC_PORT=str(grpc_port), CLIENT_SEND_TIMEOUT=SEND_TIMEOUT, MAX_STREAMS_PER_KEY="1"
    )
    sock = trio.socket.socket()  # buffers that hold the stream's whole window (64 KiB)
    await sock.connect(("127.0.0.1", grpc_port))
    h2_client = await raw_grpc_ask(sock, grpc_port, "shut-window-grpc")

    await given_up(server, fake, "shut-window-grpc")
    result = await grpc_ask(grpc_port, "after-grpc", "hello")  # the slot is free again
    assert result.text == "echo(1): hello", result

    # Now read what the server sent before it gave up on the call.
    received, status = bytearray(), None
    with trio.fail_after(10):
        while status is None:
            data = await sock.recv(65536)
            assert data, "the connection closed before the call's status"
            for event in h2_client.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    received += event.data
                elif isinstance(event, h2.events.TrailersReceived):
                    status = dict(event.headers)[b"grpc-status"]
    sock.close()
    assert status == b"1"  # CANCELLED
    text = ""
    while len(received) >= 5 and len(received) >= 5 + int.from_bytes(received[1:5], "big"):
        size = int.from_bytes(received[1:5], "big")
        text += chat_pb2.AskResponse.FromString(bytes(received[5 : 5 + size])).response
        del received[: 5 + size]
    assert received, "the message being sent when the server gave up was cut"
    (turn,) = stored_turns(server.settings.sqlite_path, "shut-window-grpc")
    assert turn["answer"] == text


async def test_a_trickled_request_head_is_cut_off(start_server):
    server = await start_server(HTTP_HEADER_TIMEOUT="1")
    port = server.running.http_port
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    closed = trio.Event()

    async def trickle() -> None:
        """One byte every 0.2 s, for at most 30 s, until the server closes the connection."""
        try:
            for _ in range(150):
                await stream.send_all(b"X")
                await trio.sleep(0.2)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def wait_for_close() -> None:
        try:
            while await stream.receive_some(1024):
                pass
        except trio.BrokenResourceError:
            pass
        closed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        nursery.start_soon(wait_for_close)
        async with httpx2.AsyncClient(base_url=server.http_url, timeout=5) as client:
            response = await client.get("/healthz")  # another connection is served meanwhile
        assert response.status_code == 200
        with trio.fail_after(5):
            await closed.wait()
        nursery.cancel_scope.cancel()
    await stream.aclose()
