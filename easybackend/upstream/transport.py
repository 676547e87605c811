"""A lean HTTP/1.1 transport for the ``openai`` SDK's HTTP client, made for streamed answers.

The SDK builds, sends and checks every request as usual; this transport is the
part below it that writes the request on a socket and reads the response. It
replaces httpx's default (httpcore and h11), which costs several times more CPU
for every piece of a streamed answer: the relay reads thousands of pieces a
second, so that cost is most of what EasyBackend would add to the model's own
latency (see docs/performance.md).

What it does: HTTP/1.1 over TCP, or TLS with the SSL context it is given;
bodies framed by ``Content-Length``, chunked transfer encoding or the end of the
connection; a pool of idle keep-alive connections per origin, each checked
before reuse (a connection the server has closed is dropped); the SDK's
connect, read and write timeouts.

A request goes out at most once, unless the server cannot have read it whole.
It is sent again, once and on a new connection, only when it was on a pooled
connection, not one byte of a response had arrived, and the write failed
before the whole request (head and body) had been handed to the connection. A
request written in full is never sent again by this transport, whatever the
server does next (closes, resets, times out): the server may have acted on it,
and a chat completion sent twice is billed twice. The one policy that may send
it again is the upstream client's own, counted and bounded by
``UPSTREAM_RETRIES`` (a pooled connection the server closed just as the request
went out is such a case; before reuse, a connection the server has already
closed is dropped). (When a server answers before taking the whole request,
a 413 say, that answer is read and returned.) Content decoding
(gzip and the like) and redirects stay with httpx. Proxies are not spoken
here: when the environment names one, the upstream client keeps httpx's own
transport, which honours it.

Errors are httpx's own exception types (``ConnectError``, ``ReadTimeout``,
``RemoteProtocolError``...), so the SDK maps them as it would its default
transport's. On cancellation, or when a response is closed before its end, the
connection is closed at once (which tells the provider to stop generating) and
never reused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import select
import socket
import ssl
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator

import httpx2
import trio

MAX_HEAD_BYTES = 64 * 1024
RECEIVE_SIZE = 64 * 1024
KEEPALIVE_EXPIRY = 5.0  # seconds an idle connection is kept, as httpx does
MAX_IDLE_PER_ORIGIN = 256

Origin = tuple[bytes, bytes, int]


class _Connection:
    """One HTTP/1.1 connection: a byte stream and what has been read past the last response."""

    def __init__(self, stream: trio.abc.Stream, sock: trio.socket.SocketType) -> None:
        self.stream = stream
        self.sock = sock
        self.buffer = b""
        self.idle_since = 0.0

    def looks_usable(self, now: float) -> bool:
        """False when idle too long or when the peer has closed it (readable while idle)."""
        if now - self.idle_since > KEEPALIVE_EXPIRY:
            return False
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        return not poller.poll(0)

    async def receive(self, read_timeout: float | None) -> bytes:
        """The next bytes from the peer (b"" at its end); raises ReadTimeout or ReadError."""
        try:
            if read_timeout is None:
                return await self.stream.receive_some(RECEIVE_SIZE)
            with trio.move_on_after(read_timeout):
                return await self.stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise httpx2.ReadError(str(exc) or type(exc).__name__) from exc
        raise httpx2.ReadTimeout("the server sent nothing within the read timeout")

    async def close(self) -> None:
        await trio.aclose_forcefully(self.stream)


class LeanTransport(httpx2.AsyncBaseTransport):
    """An ``httpx2`` async transport speaking HTTP/1.1 (see the module docstring)."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl_context = ssl_context or httpx2.create_ssl_context()
        self._idle: defaultdict[Origin, list[_Connection]] = defaultdict(list)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        """Send ``request`` and return the response once its head has arrived.

        Raises httpx's transport exceptions. The returned response's stream
        gives the body as it arrives; closing it returns the connection to the
        pool only if the whole body was read.
        """
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx2.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}")
        origin: Origin = (url.raw_scheme, url.raw_host, url.port or _default_port(url.scheme))
        timeouts = request.extensions.get("timeout", {})
        message = _request_head(request) + _framed(request, await request.aread())
        connection = self._reusable(origin)
        if connection is not None:
            try:
                return await self._exchange(connection, request, message, timeouts, origin)
            except _NotSent:
                pass  # the server had closed the pooled connection: it never read the request
        connection = await self._connect(origin, timeouts.get("connect"))
        try:
            return await self._exchange(connection, request, message, timeouts, origin)
        except _NotSent as exc:
            raise _no_response() from exc

    def _reusable(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.looks_usable(now):
                return connection
            connection.sock.close()
        return None

    async def _connect(self, origin: Origin, connect_timeout: float | None) -> _Connection:
        scheme, host, port = origin
        hostname = host.decode("ascii")
        try:
            with _fail_after(connect_timeout, httpx2.ConnectTimeout):
                tcp = await trio.open_tcp_stream(hostname, port)
                stream: trio.abc.Stream = tcp
                if scheme == b"https":
                    stream = trio.SSLStream(
                        tcp, self._ssl_context, server_hostname=hostname, https_compatible=True
                    )
                    try:
                        await stream.do_handshake()
                    except BaseException:
                        await trio.aclose_forcefully(tcp)
                        raise
        except (OSError, trio.BrokenResourceError) as exc:
            raise httpx2.ConnectError(str(exc) or type(exc).__name__) from exc
        return _Connection(stream, tcp.socket)

    async def _exchange(
        self,
        connection: _Connection,
        request: httpx2.Request,
        message: bytes,
        timeouts: dict[str, float | None],
        origin: Origin,
    ) -> httpx2.Response:
        """Write the request and read the response head on ``connection``.

        Raises _NotSent when the server cannot have read the request whole and
        no byte of an answer has arrived (the write failed before its end): the
        caller may send it again on a new connection. Any other failure, the server closing after reading the
        request in particular, closes the connection and raises httpx's
        exception.
        """
        try:
            written = True
            try:
                with _fail_after(timeouts.get("write"), httpx2.WriteTimeout):
                    await connection.stream.send_all(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                if not _answer_waiting(connection):
                    raise _NotSent from exc
                written = False  # the server answered before taking it all: read that answer
            head = await self._read_head(connection, timeouts.get("read"))
            body = _Body(self, connection, origin, request.method, head, timeouts.get("read"))
            if not written:
                body.keep_alive = False
        except BaseException:
            await connection.close()
            raise
        return httpx2.Response(
            status_code=head.status,
            headers=head.headers,
            stream=body,
            extensions={"http_version": head.version, "reason_phrase": head.reason},
        )

    async def _read_head(self, connection: _Connection, read_timeout: float | None) -> _Head:
        """The head of the next final (non-1xx) response."""
        while True:
            while (end := connection.buffer.find(b"\r\n\r\n")) < 0:
                if len(connection.buffer) > MAX_HEAD_BYTES:
                    raise httpx2.RemoteProtocolError("the response head is too large")
                try:
                    data = await connection.receive(read_timeout)
                except httpx2.ReadError as exc:
                    if not connection.buffer:
                        raise _no_response() from exc
                    raise
                if not data:
                    if not connection.buffer:
                        raise _no_response()
                    raise httpx2.RemoteProtocolError("the server closed the connection mid-head")
                connection.buffer += data
            if end > MAX_HEAD_BYTES:
                raise httpx2.RemoteProtocolError("the response head is too large")
            raw, connection.buffer = connection.buffer[:end], connection.buffer[end + 4 :]
            head = _parse_head(raw)
            if not 100 <= head.status < 200 or head.status == 101:
                return head

    def _release(self, connection: _Connection, origin: Origin) -> None:
        """Keep a connection whose response was read to its end, for the next request."""
        idle = self._idle[origin]
        if len(idle) >= MAX_IDLE_PER_ORIGIN:
            connection.sock.close()
            return
        connection.idle_since = time.monotonic()
        idle.append(connection)

    async def aclose(self) -> None:
        """Close every idle connection."""
        for idle in self._idle.values():
            for connection in idle:
                await connection.close()
        self._idle.clear()


class _NotSent(Exception):
    """The server cannot have read the request whole (see the module docstring); no answer came."""


def _no_response() -> httpx2.RemoteProtocolError:
    """What a request written in full gets when the server closes without answering.

    Never retried: the server may have acted on the request.
    """
    return httpx2.RemoteProtocolError("the server closed the connection without sending a response")


def _answer_waiting(connection: _Connection) -> bool:
    """Whether a byte from the server is waiting on the connection (read, or peeked at)."""
    if connection.buffer:
        return True
    try:
        with socket.fromfd(
            connection.sock.fileno(), connection.sock.family, socket.SOCK_STREAM
        ) as peek:
            return bool(peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # nothing there yet (EAGAIN), or only the reset
        return False


class _Body(httpx2.AsyncByteStream):
    """A response body, read from the connection as the consumer iterates it."""

    def __init__(
        self,
        transport: LeanTransport,
        connection: _Connection,
        origin: Origin,
        method: str,
        head: _Head,
        read_timeout: float | None,
    ) -> None:
        """Raises RemoteProtocolError when the head does not say how the body is framed."""
        self._transport = transport
        self._connection: _Connection | None = connection
        self._origin = origin
        self._timeout = read_timeout
        self._complete = False  # set by the reader at the body's end, never after an error
        self.keep_alive = head.keep_alive  # the connection may serve another request afterwards
        fields = {name.lower(): value for name, value in head.headers}
        parts: AsyncIterator[bytes]
        if method == "HEAD" or head.status in (204, 304):
            parts = self._read_length(connection, 0)
        elif b"chunked" in fields.get(b"transfer-encoding", b"").lower():
            parts = self._read_chunked(connection)
        elif (length := fields.get(b"content-length")) is not None:
            if not length.strip().isdigit():
                raise httpx2.RemoteProtocolError("invalid Content-Length in the response")
            parts = self._read_length(connection, int(length))
        else:  # the body ends with the connection
            parts = self._read_to_close(connection)
            self.keep_alive = False
        self._parts = parts

    async def __aiter__(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive; a second iteration goes on where the first stopped."""
        if self._connection is None:
            raise httpx2.StreamClosed()
        async for part in self._parts:
            yield part

    async def _read_length(self, connection: _Connection, length: int) -> AsyncIterator[bytes]:
        remaining = length
        while remaining:
            if not connection.buffer:
                data = await connection.receive(self._timeout)
                if not data:
                    raise httpx2.RemoteProtocolError(
                        f"the server closed the connection {remaining} bytes before the end of the body"
                    )
                connection.buffer = data
            part, connection.buffer = connection.buffer[:remaining], connection.buffer[remaining:]
            remaining -= len(part)
            yield part
        self._complete = True

    async def _read_to_close(self, connection: _Connection) -> AsyncIterator[bytes]:
        if connection.buffer:
            part, connection.buffer = connection.buffer, b""
            yield part
        while data := await connection.receive(self._timeout):
            yield data
        self._complete = True

    async def _read_chunked(self, connection: _Connection) -> AsyncIterator[bytes]:
        """Decode chunked transfer encoding.

        Whatever has arrived is given before waiting for more: the data of
        every chunk one read completed comes as one piece, and a chunk that
        arrives in parts comes in those parts.
        """
        pending: list[bytes] = []
        while True:
            if (size_line := _take_line(connection)) is None:
                if pending:
                    yield b"".join(pending)
                    pending.clear()
                size_line = await self._line(connection)
            size = _chunk_size(size_line)
            if size == 0:
                if pending:
                    yield b"".join(pending)
                while await self._line(connection):  # trailers, up to the blank line
                    pass
                self._complete = True
                return
            while size:
                if not connection.buffer:
                    if pending:
                        yield b"".join(pending)
                        pending.clear()
                    connection.buffer = await self._more(connection)
                part, connection.buffer = connection.buffer[:size], connection.buffer[size:]
                size -= len(part)
                pending.append(part)
            if (end := _take_line(connection)) is None:
                if pending:
                    yield b"".join(pending)
                    pending.clear()
                end = await self._line(connection)
            if end:
                raise httpx2.RemoteProtocolError("chunk data longer than its size")

    async def _line(self, connection: _Connection) -> bytes:
        """The next CRLF-terminated line of the chunked framing, without its CRLF."""
        while (line := _take_line(connection)) is None:
            if len(connection.buffer) > MAX_HEAD_BYTES:
                raise httpx2.RemoteProtocolError("a chunk header line is too long")
            connection.buffer += await self._more(connection)
        return line

    async def _more(self, connection: _Connection) -> bytes:
        data = await connection.receive(self._timeout)
        if not data:
            raise httpx2.RemoteProtocolError(
                "the server closed the connection before the end of a chunked body"
            )
        return data

    async def aclose(self) -> None:
        """Give the connection back if the body was read to its end, else close it."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        await self._parts.aclose()  # type: ignore[attr-defined]
        if self._complete and self.keep_alive and not connection.buffer:
            self._transport._release(connection, self._origin)
        else:
            await connection.close()


def _take_line(connection: _Connection) -> bytes | None:
    """The next CRLF-terminated line already read, without its CRLF; None if none is complete."""
    end = connection.buffer.find(b"\r\n")
    if end < 0:
        return None
    line, connection.buffer = connection.buffer[:end], connection.buffer[end + 2 :]
    return line


def _chunk_size(line: bytes) -> int:
    """The size in a chunk-size line (extensions ignored); raises RemoteProtocolError."""
    try:
        size = int(line.split(b";", 1)[0].strip(), 16)
    except ValueError:
        raise httpx2.RemoteProtocolError("invalid chunk size in the response") from None
    if size < 0:
        raise httpx2.RemoteProtocolError("invalid chunk size in the response")
    return size


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def _request_head(request: httpx2.Request) -> bytes:
    url = request.url
    target = url.raw_path or b"/"
    lines = [request.method.encode("ascii") + b" " + target + b" HTTP/1.1"]
    lines += [name + b": " + value for name, value in request.headers.raw]
    return b"\r\n".join(lines) + b"\r\n\r\n"


@dataclasses.dataclass(frozen=True, slots=True)
class _Head:
    """A response's status line and header fields."""

    version: bytes
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool  # the connection stays open after this response


def _framed(request: httpx2.Request, body: bytes) -> bytes:
    """The body as sent: chunk-encoded when the request says so (httpx does for a generator)."""
    if "chunked" not in request.headers.get("transfer-encoding", "").lower():
        return body
    return (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"


def _parse_head(head: bytes) -> _Head:
    """Raises RemoteProtocolError on anything but an HTTP/1.x response head."""
    status_line, _, fields = head.partition(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise httpx2.RemoteProtocolError("the server did not answer with HTTP/1.x")
    status = int(parts[1])
    reason = parts[2] if len(parts) == 3 else b""
    headers = []
    for line in fields.split(b"\r\n") if fields else ():
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise httpx2.RemoteProtocolError("a malformed header line in the response")
        headers.append((name, value.strip()))
    connection = b",".join(value for name, value in headers if name.lower() == b"connection")
    keep_alive = parts[0] != b"HTTP/1.0" and b"close" not in connection.lower()
    return _Head(parts[0], status, reason, headers, keep_alive)


@contextlib.contextmanager
def _fail_after(timeout: float | None, error: type[httpx2.TimeoutException]) -> Iterator[None]:
    """Raise ``error`` when the block takes longer than ``timeout`` seconds (None: no limit)."""
    if timeout is None:
        yield
        return
    try:
        with trio.fail_after(timeout):
            yield
    except trio.TooSlowError:
        raise error(f"timed out after {timeout:g} seconds") from None
