"""The upstream HTTP/1.1 transports (UPSTREAM_TRANSPORT=lean and httpx), on real loopback sockets.

Every test of the ``client`` or ``sdk`` fixtures runs against both: LeanTransport and httpx's
own transport (httpcore over h11), so the lean one is held to what a real HTTP/1.1
implementation does; the few lean-only cases say why. Wire-level cases talk to a tiny raw trio
server defined here, which reads each request with h11 (the reference parser: what the
transports write must be HTTP/1.1 to it), writes exactly the bytes a test chooses, and counts
the connections it accepts and the requests it reads; the SDK cases go through the real
``openai`` client to the in-process FakeUpstream.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import h11
import httpx2
import openai
import pytest
import trio
import trustme
from helpers.upstream import user

from easybackend.fake_upstream import FakeUpstream
from easybackend.metrics import Metrics
from easybackend.settings import Settings
from easybackend.upstream.openai_client import Answering, Completion, OpenAIUpstream, UpstreamCall
from easybackend.upstream.transport import LeanTransport

OK_HELLO = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


# -- a raw HTTP server ----------------------------------------------------------------------


class Peer:
    """One accepted connection, seen from the raw server."""

    def __init__(self, server: RawServer, stream: trio.abc.Stream, index: int) -> None:
        self.server = server
        self.stream = stream
        self.index = index  # 0 for the first connection accepted
        self.buffer = b""

    async def read_head(self) -> bytes | None:
        """The next request head (without its blank line), or None when the client closed.

        The head is parsed by h11 (a test fails on one h11 refuses); its request is recorded.
        """
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            data = await self.stream.receive_some(65536)
            if not data:
                self.server.closed_by_client.append(self.index)
                self.server.client_closed.set()
                return None
            self.buffer += data
        head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
        self.server.heads.append(head)
        self.server.requests.append(parse_request_head(head))
        return head

    async def read_request(self) -> tuple[h11.Request, bytes] | None:
        """The next whole request, head and body, read by h11; None when the client closed."""
        parser = h11.Connection(h11.SERVER)
        if self.buffer:  # (b"" would tell h11 the connection ended)
            parser.receive_data(self.buffer)
        self.buffer = b""
        request, body = None, []
        while True:
            event = parser.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(65536)
                if not data and request is None:
                    self.server.closed_by_client.append(self.index)
                    self.server.client_closed.set()
                    return None
                parser.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                self.buffer = parser.trailing_data[0]
                self.server.requests.append(request)
                self.server.bodies.append(b"".join(body))
                return request, b"".join(body)
            else:
                raise AssertionError(f"h11 read {event!r} while reading a request")

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def wait_eof(self) -> None:
        """Read (and drop) until the client closes the connection, then record that."""
        with contextlib.suppress(trio.BrokenResourceError):  # a reset is a close too
            while await self.stream.receive_some(65536):
                pass
        self.server.closed_by_client.append(self.index)
        self.server.client_closed.set()


class RawServer:
    """A loopback TCP server running ``handler`` on each connection, with what it saw."""

    def __init__(self, handler: Callable[[Peer], Awaitable[None]]) -> None:
        self.handler = handler
        self.port = 0
        self.accepted = 0
        self.heads: list[bytes] = []
        self.requests: list[h11.Request] = []  # every request read, as h11 parsed it
        self.bodies: list[bytes] = []  # the body of every request read whole (read_request)
        self.closed_by_client: list[int] = []  # connections the client closed first
        self.client_closed = trio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, stream: trio.abc.Stream) -> None:
        peer = Peer(self, stream, self.accepted)
        self.accepted += 1
        try:
            async with stream:
                await self.handler(peer)
        except trio.BrokenResourceError:  # the client reset the connection
            self.closed_by_client.append(peer.index)
            self.client_closed.set()


def parse_request_head(head: bytes) -> h11.Request:
    """``head`` as h11 reads it (raises h11.RemoteProtocolError when it is not HTTP/1.1)."""
    parser = h11.Connection(h11.SERVER)
    parser.receive_data(head + b"\r\n\r\n")
    event = parser.next_event()
    assert isinstance(event, h11.Request), event
    return event


def answer(response: bytes | Callable[[bytes], bytes], *, close: bool = False):
    """A handler sending ``response`` (or ``response(head)``) to every request on a connection.

    With ``close``, the server closes the connection after the first response.
    """

    async def handler(peer: Peer) -> None:
        while (head := await peer.read_head()) is not None:
            await peer.send(response(head) if callable(response) else response)
            if close:
                return

    return handler


async def first_chunk_then_hello(peer: Peer) -> None:
    """The first connection gets one chunk of a body that never ends; later ones get "hello"."""
    if peer.index == 0:
        await peer.read_head()
        await peer.send(CHUNKED_HEAD + b"5\r\nfirst\r\n")
        await peer.wait_eof()
    else:
        await answer(OK_HELLO)(peer)


@pytest.fixture
def serve_raw(nursery: trio.Nursery) -> Callable[..., Awaitable[RawServer]]:
    async def start(handler: Callable[[Peer], Awaitable[None]]) -> RawServer:
        server = RawServer(handler)
        listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
        server.port = listeners[0].socket.getsockname()[1]
        return server

    return start


def make_transport(
    name: str, ssl_context: ssl.SSLContext | None = None
) -> httpx2.AsyncBaseTransport:
    """The transport UPSTREAM_TRANSPORT=``name`` means: LeanTransport, or httpx's own."""
    if name == "lean":
        return LeanTransport(ssl_context=ssl_context)
    return httpx2.AsyncHTTPTransport(verify=ssl_context or True)


@pytest.fixture(params=["lean", "httpx"])
def transport_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def lean_only(transport_name: str) -> None:
    """For a behaviour of LeanTransport alone (httpx's own transport does otherwise, or cannot)."""
    if transport_name != "lean":
        pytest.skip("a behaviour of the lean transport only")


@pytest.fixture
async def client(transport_name: str) -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(transport=make_transport(transport_name), timeout=5) as http:
        yield http


# -- body framing ---------------------------------------------------------------------------


async def test_content_length_body_is_read_exactly(serve_raw, client):
    server = await serve_raw(answer(OK_HELLO))
    with trio.fail_after(5):
        response = await client.get(server.url + "/a?b=1")
    assert response.status_code == 200
    assert response.content == b"hello"
    assert server.heads[0].startswith(b"GET /a?b=1 HTTP/1.1\r\n")
    assert b"\r\nHost: 127.0.0.1:%d" % server.port in server.heads[0]


async def test_chunked_body_with_extensions_and_trailers(serve_raw, client):
    """Chunk extensions are ignored, trailers consumed: the connection then serves another request."""
    body = b"5;ext=1\r\nhello\r\n6;a=b;c\r\n world\r\n0\r\nX-Trailer: t\r\nX-More: u\r\n\r\n"
    server = await serve_raw(answer(CHUNKED_HEAD + body))
    with trio.fail_after(5):
        first = await client.get(server.url)
        second = await client.get(server.url)
    assert first.content == second.content == b"hello world"
    assert server.accepted == 1 and len(server.heads) == 2


async def test_body_delimited_by_connection_close(serve_raw, client):
    payload = bytes(range(256)) * 1024  # 256 KiB: several reads

    async def handler(peer: Peer) -> None:
        await peer.read_head()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: x/y\r\n\r\n" + payload)

    server = await serve_raw(handler)
    with trio.fail_after(5):
        response = await client.get(server.url)
        assert response.content == payload
        await client.get(server.url)
    assert server.accepted == 2  # a body ended by the close leaves nothing to reuse


async def test_204_304_and_head_responses_have_empty_bodies_without_waiting(serve_raw, client):
    """The server keeps the connection open and sends no body: nothing is waited for."""

    def respond(head: bytes) -> bytes:
        if head.startswith(b"HEAD "):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
        if head.startswith(b"GET /304 "):
            return b"HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\n\r\n"
        return b"HTTP/1.1 204 No Content\r\n\r\n"

    server = await serve_raw(answer(respond))
    with trio.fail_after(5):
        no_content = await client.get(server.url)
        head = await client.head(server.url)
        not_modified = await client.get(server.url + "/304")
        after = await client.head(server.url)
    assert (no_content.status_code, no_content.content) == (204, b"")
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-length"] == "100"
    assert (not_modified.status_code, not_modified.content) == (304, b"")
    assert after.status_code == 200
    assert server.accepted == 1 and len(server.heads) == 4


async def test_chunks_are_delivered_as_they_arrive(serve_raw, client):
    """The server sends the rest only once the client has seen the first chunk: no buffering."""
    first_seen = trio.Event()

    async def handler(peer: Peer) -> None:
        await peer.read_head()
        await peer.send(CHUNKED_HEAD + b"5\r\nfirst\r\n")
        await first_seen.wait()
        await peer.send(b"4\r\nrest\r\n0\r\n\r\n")

    server = await serve_raw(handler)
    parts = []
    with trio.fail_after(5):
        async with client.stream("GET", server.url) as response:
            async for part in response.aiter_raw():
                parts.append(part)
                first_seen.set()
    assert parts == [b"first", b"rest"]


# -- keep-alive -----------------------------------------------------------------------------


async def test_sequential_requests_reuse_one_connection(serve_raw, client):
    server = await serve_raw(answer(OK_HELLO))
    with trio.fail_after(5):
        for _ in range(3):
            assert (await client.get(server.url)).content == b"hello"
    assert server.accepted == 1 and len(server.heads) == 3


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nconnection: Keep-Alive, Close\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    ],
    ids=["connection-close", "close-in-a-list", "http-1.0"],
)
async def test_response_that_ends_the_connection_is_not_reused(serve_raw, client, response):
    """The server would keep the connection open, but the response said it would not."""
    server = await serve_raw(answer(response))
    with trio.fail_after(5):
        assert (await client.get(server.url)).content == b"hello"
        await server.client_closed.wait()  # the client closed the first connection
        assert (await client.get(server.url)).content == b"hello"
    assert server.closed_by_client[0] == 0
    assert server.accepted == 2 and len(server.heads) == 2


async def test_response_closed_early_is_not_reused_and_its_connection_is_closed(serve_raw, client):
    server = await serve_raw(first_chunk_then_hello)
    with trio.fail_after(5):
        async with client.stream("GET", server.url) as response:
            parts = response.aiter_raw()
            assert await parts.__anext__() == b"first"
            await parts.aclose()
            await response.aclose()  # before the end of the body
        await server.client_closed.wait()
        assert (await client.get(server.url)).content == b"hello"
    assert server.closed_by_client[0] == 0
    assert server.accepted == 2


async def test_idle_connection_closed_by_server_is_not_used(serve_raw, client):
    server = await serve_raw(answer(OK_HELLO, close=True))
    with trio.fail_after(5):
        assert (await client.get(server.url)).content == b"hello"
        await trio.sleep(0.05)  # the FIN reaches the client's idle socket
        assert (await client.get(server.url)).content == b"hello"
    assert server.accepted == 2 and len(server.heads) == 2


async def test_idle_connection_that_received_unexpected_bytes_is_not_used(serve_raw, client):
    """Bytes arriving on an idle connection (a stray response) make it unusable."""
    first_answered, stray_sent = trio.Event(), trio.Event()

    async def handler(peer: Peer) -> None:
        if peer.index == 0:
            await peer.read_head()
            await peer.send(OK_HELLO)
            await first_answered.wait()  # the connection is back in the client's pool
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray")
            stray_sent.set()
            await peer.wait_eof()
        else:
            await answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nright")(peer)

    server = await serve_raw(handler)
    with trio.fail_after(5):
        assert (await client.get(server.url)).content == b"hello"
        first_answered.set()
        await stray_sent.wait()
        assert (await client.get(server.url)).content == b"right"
        await server.client_closed.wait()  # the dropped connection was closed
    assert server.closed_by_client[0] == 0
    assert server.accepted == 2 and len(server.heads) == 2


async def test_request_on_reused_connection_closed_before_answer_is_not_sent_again(
    serve_raw, client
):
    """The server reads the second request on the kept connection, then closes it unanswered.

    It may have acted on it: the request is not sent again, the caller gets the error.
    """

    async def handler(peer: Peer) -> None:
        await peer.read_head()
        await peer.send(OK_HELLO)
        if peer.index == 0:
            await peer.read_head()  # and close without answering
        else:
            await answer(OK_HELLO)(peer)

    server = await serve_raw(handler)
    with trio.fail_after(5):
        await client.get(server.url)
        with pytest.raises(httpx2.RemoteProtocolError):
            await client.get(server.url)
    assert server.accepted == 1
    assert len(server.heads) == 2  # the second request went out once


async def test_post_read_whole_then_closed_unanswered_is_never_sent_twice(serve_raw, client):
    """A POST whose body the server read to its end, on a reused connection or a new one.

    The server then closes without a byte of an answer: the transport raises, and the
    server has read each POST exactly once (a chat completion sent twice is billed twice).
    """

    async def handler(peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            method, body = request
            if method.method == b"POST":
                return  # read in full, then closed unanswered
            await peer.send(OK_HELLO)

    server = await serve_raw(handler)
    body = json.dumps({"model": "m", "messages": user("hi")}).encode()
    with trio.fail_after(5):
        await client.get(server.url)  # leaves a connection in the pool
        with pytest.raises(httpx2.RemoteProtocolError):
            await client.post(server.url + "/v1/chat/completions", content=body)
        with pytest.raises(httpx2.RemoteProtocolError):  # and on a new connection
            await client.post(server.url + "/v1/chat/completions", content=body)
    posts = [request for request in server.requests if request.method == b"POST"]
    assert len(posts) == 2  # one per call, none re-sent
    assert server.bodies.count(body) == 2
    assert server.accepted == 2


async def test_request_written_whole_on_a_pooled_connection_then_reset_is_not_sent_again(
    serve_raw, client
):
    """The server closes the kept connection as the request arrives, without reading it.

    Its system then resets the connection. The request was written in full, so the
    transport does not send it again (only the upstream client's counted retries may):
    the caller gets the error, and the server saw the POST once.
    """

    async def handler(peer: Peer) -> None:
        if peer.index == 0:
            await peer.read_request()
            await peer.send(OK_HELLO)
            await trio.lowlevel.wait_readable(peer.stream.socket)  # the POST, left unread
            return  # closed with unread bytes: a reset
        while await peer.read_request() is not None:
            await peer.send(OK_HELLO)

    server = await serve_raw(handler)
    with trio.fail_after(5):
        await client.get(server.url)
        with pytest.raises(httpx2.TransportError):
            await client.post(server.url, content=b"once")
    assert server.accepted == 1  # no second connection: nothing was sent again


async def test_request_whose_write_failed_on_a_pooled_connection_is_sent_on_a_new_one(
    serve_raw, client, lean_only
):
    """The server resets the pooled connection after the head, long before the body is written.

    The server cannot have acted on a request it did not get whole, and no byte of an answer
    came: the request goes out once more, on a new connection, and is answered there. Lean
    only: httpx's own transport raises here.
    """
    body = b"x" * (32 * 1024 * 1024)  # more than the loopback socket buffers hold

    async def handler(peer: Peer) -> None:
        if peer.index == 0:
            await peer.read_request()
            await peer.send(OK_HELLO)
            await peer.read_head()  # of the POST, whose body is still being written
            sock = peer.stream.socket
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return  # closed with a reset
        while await peer.read_request() is not None:
            await peer.send(OK_HELLO)

    server = await serve_raw(handler)
    with trio.fail_after(10):
        await client.get(server.url)
        response = await client.post(server.url, content=body)
    assert response.content == b"hello"
    assert server.accepted == 2
    assert server.bodies == [b"", body]  # the POST read whole once, on the new connection


# -- errors ---------------------------------------------------------------------------------


async def test_connecting_to_a_closed_port_is_a_connect_error(client):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: refused
        with trio.fail_after(5), pytest.raises(httpx2.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/")


async def test_server_that_never_answers_is_a_read_timeout(serve_raw, client):
    async def handler(peer: Peer) -> None:
        await peer.read_head()
        await peer.wait_eof()

    server = await serve_raw(handler)
    with trio.fail_after(5), pytest.raises(httpx2.ReadTimeout):
        await client.get(server.url, timeout=httpx2.Timeout(5, read=0.2))
    with trio.fail_after(5):
        await server.client_closed.wait()  # the timed-out connection was closed


async def test_server_closing_without_an_answer_is_a_protocol_error(serve_raw, client):
    async def handler(peer: Peer) -> None:
        await peer.read_head()

    server = await serve_raw(handler)
    with trio.fail_after(5), pytest.raises(httpx2.RemoteProtocolError):
        await client.get(server.url)
    assert server.accepted == 1  # a fresh connection is not tried again


@pytest.mark.parametrize(
    "head",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/2 200\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5",  # then the server closes mid-head
    ],
    ids=["not-http", "http-2", "bad-status", "no-colon", "folded", "truncated-head"],
)
async def test_malformed_response_head_is_a_protocol_error(serve_raw, client, head):
    server = await serve_raw(answer(head, close=True))
    with trio.fail_after(5), pytest.raises(httpx2.RemoteProtocolError):
        await client.get(server.url)


async def test_connection_closed_mid_chunked_body_raises_while_iterating(serve_raw, client):
    async def handler(peer: Peer) -> None:
        await peer.read_head()
        await peer.send(CHUNKED_HEAD + b"5\r\nhello\r\n5\r\nwo")

    server = await serve_raw(handler)
    parts = []
    with trio.fail_after(5):
        async with client.stream("GET", server.url) as response:
            assert response.status_code == 200
            with pytest.raises(httpx2.RemoteProtocolError):
                async for part in response.aiter_raw():
                    parts.append(part)
    assert b"".join(parts).startswith(b"hello")


async def test_connection_closed_before_content_length_is_reached(serve_raw, client):
    server = await serve_raw(
        answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello", close=True)
    )
    with trio.fail_after(5), pytest.raises(httpx2.RemoteProtocolError):
        await client.get(server.url)


@pytest.mark.parametrize(
    "chunks",
    [b"zz\r\nhello\r\n0\r\n\r\n", b"-5\r\nhello\r\n0\r\n\r\n", b"\r\n", b"2\r\nhello\r\n"],
    ids=["not-hex", "negative", "empty", "data-longer-than-size"],
)
async def test_malformed_chunk_framing_is_a_protocol_error(serve_raw, client, chunks):
    server = await serve_raw(answer(CHUNKED_HEAD + chunks))
    with trio.fail_after(5), pytest.raises(httpx2.RemoteProtocolError):
        await client.get(server.url)


async def test_response_head_larger_than_64_kib_is_a_protocol_error(serve_raw, client):
    big = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (200 * 1024) + b"\r\nContent-Length: 0\r\n\r\n"
    server = await serve_raw(answer(big))
    with trio.fail_after(5), pytest.raises(httpx2.RemoteProtocolError):
        await client.get(server.url)


async def test_unsupported_scheme(client, lean_only):
    """Lean only: the message is the lean transport's (httpx's own raises the same type)."""
    with pytest.raises(httpx2.UnsupportedProtocol, match="unsupported URL scheme"):
        await client.get("ftp://127.0.0.1/file")


async def test_interim_100_continue_responses_are_skipped(serve_raw, client):
    async def handler(peer: Peer) -> None:
        await peer.read_head()
        await peer.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        await trio.sleep(0.01)  # the final response comes in a later read
        await peer.send(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n" + OK_HELLO)

    server = await serve_raw(handler)
    with trio.fail_after(5):
        response = await client.post(server.url, content=b"data")
    assert (response.status_code, response.content) == (200, b"hello")
    assert "link" not in response.headers


# -- cancellation ---------------------------------------------------------------------------


async def test_cancelling_a_body_read_closes_the_connection(serve_raw, client):
    server = await serve_raw(first_chunk_then_hello)
    first_seen = trio.Event()
    parts = []

    async def read() -> None:
        async with client.stream("GET", server.url) as response:
            async for part in response.aiter_raw():
                parts.append(part)
                first_seen.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await first_seen.wait()
            nursery.cancel_scope.cancel()
        await server.client_closed.wait()
        assert (await client.get(server.url)).content == b"hello"
    assert parts == [b"first"]
    assert server.closed_by_client[0] == 0 and server.accepted == 2


async def test_cancelling_while_waiting_for_the_head_closes_the_connection(serve_raw, client):
    async def handler(peer: Peer) -> None:
        if peer.index == 0:
            await peer.read_head()
            await peer.wait_eof()
        else:
            await answer(OK_HELLO)(peer)

    server = await serve_raw(handler)
    with trio.fail_after(5):
        with trio.move_on_after(0.2) as waited:
            await client.get(server.url)
        assert waited.cancelled_caught
        await server.client_closed.wait()
        assert (await client.get(server.url)).content == b"hello"
    assert server.accepted == 2


# -- TLS ------------------------------------------------------------------------------------


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_server(nursery: trio.Nursery, ca: trustme.CA) -> RawServer:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(server_context)
    server = RawServer(answer(OK_HELLO))
    listeners = await nursery.start(
        partial(trio.serve_ssl_over_tcp, server.handle, 0, server_context, host="127.0.0.1")
    )
    server.port = listeners[0].transport_listener.socket.getsockname()[1]
    return server


async def test_https_with_a_trusted_ca(tls_server, ca, transport_name):
    context = ssl.create_default_context()
    ca.configure_trust(context)
    url = f"https://127.0.0.1:{tls_server.port}/x"
    with trio.fail_after(5):
        async with httpx2.AsyncClient(transport=make_transport(transport_name, context)) as http:
            first = await http.get(url)
            second = await http.get(url)
    assert first.content == second.content == b"hello"
    assert tls_server.accepted == 1 and len(tls_server.heads) == 2


async def test_https_with_an_untrusted_certificate_is_a_connect_error(tls_server, transport_name):
    with trio.fail_after(5):
        async with httpx2.AsyncClient(transport=make_transport(transport_name)) as http:
            with pytest.raises(httpx2.ConnectError):
                await http.get(f"https://127.0.0.1:{tls_server.port}/x")
    assert tls_server.heads == []


# -- through the openai SDK -----------------------------------------------------------------


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        yield fake
        nursery.cancel_scope.cancel()


def sdk_client(base_url: str, transport_name: str) -> openai.AsyncOpenAI:
    http = openai.DefaultAsyncHttpxClient(transport=make_transport(transport_name))
    return openai.AsyncOpenAI(base_url=base_url, api_key="k", max_retries=0, http_client=http)


@pytest.fixture
async def sdk(upstream: FakeUpstream, transport_name: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with sdk_client(upstream.base_url(), transport_name) as c:
        yield c


async def test_sdk_streamed_completion_yields_every_chunk(sdk):
    with trio.fail_after(5):
        stream = await sdk.chat.completions.create(
            model="m", messages=user("one two three"), stream=True
        )
        chunks = [chunk async for chunk in stream]
    contents = [c.choices[0].delta.content for c in chunks]
    assert contents == ["", "echo(1):", " one", " two", " three", None]
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_sdk_non_streamed_completion_returns_the_message(sdk):
    with trio.fail_after(5):
        reply = await sdk.chat.completions.create(model="m", messages=user("hello there"))
    assert reply.choices[0].message.content == "echo(1): hello there"
    assert reply.usage.completion_tokens == 3


async def test_sdk_error_status_raises_the_sdk_error(sdk):
    with trio.fail_after(5), pytest.raises(openai.RateLimitError) as limited:
        await sdk.chat.completions.create(model="m", messages=user("x [[fake:status=429]]"))
    assert limited.value.status_code == 429
    assert limited.value.code == "rate_limit_exceeded"


async def test_sdk_stream_broken_mid_body_raises_a_connection_error(upstream, sdk):
    received = []
    with trio.fail_after(5):
        stream = await sdk.chat.completions.create(
            model="m", messages=user("one two three [[fake:disconnect_after=2]]"), stream=True
        )
        with pytest.raises(openai.APIConnectionError) as broken:
            async for chunk in stream:
                received.append(chunk.choices[0].delta.content)
        assert isinstance(broken.value.__cause__, httpx2.RemoteProtocolError)
        assert received == ["", "echo(1):", " one"]
        reply = await sdk.chat.completions.create(model="m", messages=user("fine"))
    assert reply.choices[0].message.content == "echo(1): fine"


@asynccontextmanager
async def counting_relay(port: int) -> AsyncIterator[RawServer]:
    """A TCP relay to ``127.0.0.1:port`` that counts the connections it accepts."""

    async def relay(peer: Peer) -> None:
        async with await trio.open_tcp_stream("127.0.0.1", port) as target:
            async with trio.open_nursery() as nursery:

                async def pipe(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
                    try:
                        while data := await source.receive_some(65536):
                            await sink.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(pipe, peer.stream, target)
                nursery.start_soon(pipe, target, peer.stream)

    server = RawServer(relay)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
        server.port = listeners[0].socket.getsockname()[1]
        yield server
        nursery.cancel_scope.cancel()


async def test_sdk_sequential_calls_reuse_one_connection(upstream, transport_name):
    relayed = counting_relay(upstream.port)
    async with relayed as relay, sdk_client(relay.url + "/v1", transport_name) as sdk:
        with trio.fail_after(5):
            for i in range(5):
                reply = await sdk.chat.completions.create(model="m", messages=user(f"n{i}"))
                assert reply.choices[0].message.content == f"echo(1): n{i}"
    assert len(upstream.requests) == 5
    assert relay.accepted == 1


# -- framing and reuse corner cases ---------------------------------------------------------


async def test_streamed_request_body_is_sent_chunk_encoded(serve_raw, client, lean_only):
    """Lean only: httpx's own sends one chunk per part (both are read alike by h11, below)."""
    bodies = []

    async def handler(peer: Peer) -> None:
        head = await peer.read_head()
        assert b"transfer-encoding: chunked" in head.lower()
        with trio.move_on_after(0.5):
            while not peer.buffer.endswith(b"0\r\n\r\n"):
                peer.buffer += await peer.stream.receive_some(65536)
        bodies.append(peer.buffer)
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    async def content() -> AsyncIterator[bytes]:
        yield b"hello"
        yield b" world"

    server = await serve_raw(handler)
    with trio.fail_after(5):
        await client.post(server.url, content=content())
    assert bodies == [b"b\r\nhello world\r\n0\r\n\r\n"]  # one chunk, then the last


async def test_invalid_content_length_closes_the_connection(serve_raw, client):
    async def handler(peer: Peer) -> None:
        await peer.read_head()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: five\r\n\r\nhello")
        await peer.wait_eof()

    server = await serve_raw(handler)
    with trio.fail_after(5), pytest.raises(httpx2.RemoteProtocolError) as error:
        await client.get(server.url)
    with trio.move_on_after(1):
        await server.client_closed.wait()
    assert server.client_closed.is_set(), error  # the error (as a caller would) is still held


async def test_sdk_sequential_streamed_calls_reuse_one_connection(upstream, transport_name):
    relayed = counting_relay(upstream.port)
    async with relayed as relay, sdk_client(relay.url + "/v1", transport_name) as sdk:
        with trio.fail_after(5):
            for i in range(3):
                stream = await sdk.chat.completions.create(
                    model="m", messages=user(f"s{i}"), stream=True
                )
                assert [c async for c in stream][-1].choices[0].finish_reason == "stop"
    assert len(upstream.requests) == 3
    assert relay.accepted == 1  # the SDK drains each stream, and the connection is reused


async def test_response_stream_resumes_where_an_earlier_iteration_stopped(serve_raw, client):
    """What the SDK's drain does: iterate response.stream after aiter_raw() stopped early."""

    first_read = trio.Event()

    async def handler(peer: Peer) -> None:
        await peer.read_head()
        await peer.send(CHUNKED_HEAD + b"5\r\nhello\r\n")
        await first_read.wait()
        await peer.send(b"6\r\n world\r\n0\r\n\r\n")
        await peer.wait_eof()

    server = await serve_raw(handler)
    with trio.fail_after(5):
        async with client.stream("GET", server.url) as response:
            parts = response.aiter_raw()
            assert await parts.__anext__() == b"hello"
            first_read.set()
            rest = [part async for part in response.stream]
            await parts.aclose()
    assert b"".join(rest) == b" world"


async def test_head_just_over_64_kib_is_a_protocol_error(serve_raw, client, lean_only):
    """Lean only: 64 KiB is the lean transport's limit (httpcore lets h11 read 100 kB)."""

    async def handler(peer: Peer) -> None:
        await peer.read_head()
        start = b"HTTP/1.1 200 OK\r\nX-Big: "
        await peer.send(start + b"a" * (65536 - len(start) - 2) + b"\r\n")  # exactly 64 KiB
        await trio.sleep(0.1)
        await peer.send(b"X-More: " + b"b" * 1000 + b"\r\nContent-Length: 0\r\n\r\n")
        await peer.wait_eof()

    server = await serve_raw(handler)
    with trio.fail_after(5), pytest.raises(httpx2.RemoteProtocolError):
        await client.get(server.url)


async def test_http_1_0_response_reports_its_version(serve_raw, client):
    server = await serve_raw(answer(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello"))
    with trio.fail_after(5):
        response = await client.get(server.url)
    assert response.http_version == "HTTP/1.0"


# -- the upstream client on top: pieces that arrive together make one item ------------------


def sse_chunk(content: str | None = None, finish: str | None = None) -> bytes:
    delta = {} if content is None else {"content": content}
    event = {"model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    data = b"data: " + json.dumps(event).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
SSE_END = sse_chunk(finish="stop") + b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"


async def read_answer(
    settings: Settings, url: str, *, after_first: trio.Event | None = None
) -> list[str | Completion]:
    """Everything OpenAIUpstream.stream yields for one call after its first item (which names
    the upstream that answers); ``after_first`` is set at the first piece."""
    upstream = OpenAIUpstream(settings, Metrics(), base_url=url)
    call = UpstreamCall(
        messages=[{"role": "user", "content": "hi"}], model="m", temperature=1.0, max_tokens=None
    )
    items: list[str | Completion] = []
    try:
        with trio.fail_after(5):
            stream = upstream.stream(call)
            assert await anext(stream) == Answering("default")
            async for item in stream:
                items.append(item)
                if after_first is not None:
                    after_first.set()
    finally:
        await upstream.aclose()
    return items


async def test_pieces_read_together_are_one_item(
    serve_raw, make_settings, transport_name, lean_only
):
    """A provider faster than the relay costs one delta per read, not one per token.

    Lean only: httpx's own transport gives one part per chunk, read together or not.
    """

    first_item = trio.Event()

    async def handler(peer: Peer) -> None:
        await peer.read_head()
        await peer.send(SSE_HEAD + b"".join(sse_chunk(word) for word in ("a", " b", " c")))
        await first_item.wait()
        await peer.send(sse_chunk(" d") + SSE_END)
        await peer.wait_eof()

    server = await serve_raw(handler)
    settings = make_settings(UPSTREAM_TRANSPORT=transport_name)
    items = await read_answer(settings, server.url + "/v1", after_first=first_item)
    assert items[:2] == ["a b c", " d"]
    assert items[2] == Completion(
        finish_reason="stop", model="m", prompt_tokens=None, completion_tokens=None
    )


async def test_a_proxy_in_the_environment_is_used(serve_raw, make_settings, monkeypatch):
    """With HTTP(S)_PROXY set, calls go through httpx's own transport, which honours it."""

    async def proxy(peer: Peer) -> None:
        head = await peer.read_head()
        if head.startswith(b"POST http://upstream.invalid/v1/chat/completions "):
            await peer.send(SSE_HEAD + sse_chunk("via proxy") + SSE_END)
        await peer.wait_eof()

    server = await serve_raw(proxy)
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", server.url)
    items = await read_answer(make_settings(), "http://upstream.invalid/v1")
    assert items[0] == "via proxy"
    assert server.accepted == 1
