"""One bound for every protocol: a send to a client may block for at most CLIENT_SEND_TIMEOUT seconds.

A client that stops reading makes the server's writes block once the socket
buffers are full (HTTP, WebSocket) or its HTTP/2 flow-control window is spent
(gRPC). Unbounded, such a client would hold its ask, its stream slot and the
upstream request for ever. Here a send that has not completed within the
timeout gives up, and the ask ends exactly as if the client had gone: the
transport stops consuming the chat core's events, the core closes the upstream
call and stores the pieces whose send completed as a ``cancelled`` turn, and
the slot is freed.

- :func:`send_deadline` bounds one wait to send and raises :class:`ClientTooSlow`
  when it passes (the WebSocket send of one message, the gRPC send of one
  response message).
- :class:`SendBoundedStream` bounds every write of a byte stream (hypercorn's
  HTTP connections, the gRPC connection's writer): a write that times out closes
  the connection at once, since no goodbye can get through a full buffer, and
  raises :class:`trio.BrokenResourceError`, which every server here takes for a
  client that went away.
- :func:`bound_hypercorn_sends` makes hypercorn run each HTTP connection over a
  :class:`SendBoundedStream` (through the hook of :mod:`._hypercorn_compat`);
  :class:`StopOnBrokenSend` is the ASGI wrapper that makes a send to a
  connection whose write failed raise :class:`ClientGone` in the application,
  instead of returning as if the bytes had gone out.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from ._hypercorn_compat import wrap_connection_streams

log = logging.getLogger("easybackend.send_deadline")

STREAM_KEY = "easybackend.client_stream"  # the connection's SendBoundedStream, in the ASGI state
# Once the shutdown grace is over, the seconds the asks cut short have to tell their clients
# (503 shutting_down, gRPC UNAVAILABLE, a WebSocket error and close 1001) before every
# connection still open is dropped.
GOODBYE_SECONDS = 2.0


class ClientGone(Exception):
    """A send to the client failed: the client closed the connection, or stopped reading."""


class ClientTooSlow(ClientGone):
    """A send to the client did not complete within CLIENT_SEND_TIMEOUT seconds."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the client read nothing for {seconds:g} seconds")
        self.seconds = seconds


def send_deadline(seconds: float) -> _SendDeadline:
    """Bound the send inside the ``with`` block by ``seconds``; raises ClientTooSlow when it passes.

    The send is cancelled at the deadline (a byte stream left half-written must
    then be closed). Outer cancellation passes through unchanged.
    """
    return _SendDeadline(seconds)


class _SendDeadline:
    """The context manager of :func:`send_deadline` (a class: it is entered once per send)."""

    __slots__ = ("_scope", "_seconds")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._scope = trio.CancelScope(deadline=trio.current_time() + seconds)

    def __enter__(self) -> None:
        self._scope.__enter__()

    def __exit__(self, *exc_info: Any) -> bool:
        suppressed = self._scope.__exit__(*exc_info)
        if self._scope.cancelled_caught:
            raise ClientTooSlow(self._seconds)
        return suppressed


class SendBoundedStream(trio.abc.HalfCloseableStream):
    """A stream whose every ``send_all`` completes within ``seconds`` or closes the connection.

    A write that times out closes the underlying stream at once (a reader
    blocked on it wakes with ClosedResourceError) and raises
    BrokenResourceError; the bound holds even inside a shielded scope, as
    hypercorn's writes are. :attr:`broken` is set once any write has failed.
    Every other attribute (``socket``, ``transport_stream``, TLS methods) is
    the underlying stream's.
    """

    def __init__(self, stream: trio.abc.Stream, seconds: float) -> None:
        self.stream = stream
        self.seconds = seconds
        self.broken = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            with send_deadline(self.seconds):
                await self.stream.send_all(data)
        except ClientTooSlow as exc:
            self.broken = True
            log.info("closing a connection whose client stopped reading: %s", exc)
            await trio.aclose_forcefully(self.stream)
            raise trio.BrokenResourceError(str(exc)) from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.broken = True
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.stream.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.stream.send_eof()  # type: ignore[attr-defined]  # AttributeError over TLS

    async def aclose(self) -> None:
        await self.stream.aclose()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _bounded_stream(
    config: Any, state: dict[str, Any], stream: trio.abc.Stream
) -> tuple[dict[str, Any], trio.abc.Stream]:
    """An HTTP connection's stream, bounded when its hypercorn config carries a timeout."""
    seconds = getattr(config, "client_send_timeout", None)
    if seconds is None:
        return state, stream
    bounded = SendBoundedStream(stream, seconds)
    return {**state, STREAM_KEY: bounded}, bounded  # state: copied into each request's scope


def bound_hypercorn_sends(config: Any, seconds: float) -> None:
    """Make hypercorn's trio worker bound every write of a connection served with ``config``.

    hypercorn 0.17 writes in a shielded scope and swallows a failed write, so a
    deadline around the ASGI ``send`` would never fire and the application would
    never learn that the client is gone: the bound has to sit on the connection's
    stream, through the hook :mod:`._hypercorn_compat` adds. Only connections
    served with a config carrying ``client_send_timeout`` are bounded (other
    hypercorn servers in the process, such as the demo upstream, are left as
    they were).
    """
    config.client_send_timeout = seconds
    wrap_connection_streams(_bounded_stream)


class StopOnBrokenSend:
    """ASGI wrapper: a send after which the connection's write had failed raises ClientGone.

    hypercorn returns from a send whose write failed as if it had succeeded; the
    application (an SSE body in particular) would count that piece as delivered.
    Raised from ``send``, ClientGone unwinds the application as a client that went
    away does (a streamed body is closed, so the chat core stores only the pieces
    sent before); it is not an error of the server and ends the request quietly.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        stream = scope.get("state", {}).get(STREAM_KEY) if scope["type"] == "http" else None
        if stream is None:
            await self.app(scope, receive, send)
            return

        async def checked_send(message: dict[str, Any]) -> None:
            await send(message)
            if stream.broken:
                raise ClientGone("the connection to the client is closed")

        try:
            await self.app(scope, receive, checked_send)
        except* ClientGone:
            pass
