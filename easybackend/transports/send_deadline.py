"""One bound for every protocol: a send to a client may block for at most CLIENT_SEND_TIMEOUT seconds.

A client that stops reading makes the server's writes block once the socket
buffers are full (HTTP, WebSocket) or its HTTP/2 flow-control window is spent
(gRPC). Unbounded, such a client would hold its ask, its stream slot and the
upstream request for ever. Here a send that has not completed within the
timeout is ended, and the ask ends exactly as if the client had gone: the
transport stops consuming the chat core's events, the core closes the upstream
call and stores the pieces whose send completed as a ``cancelled`` turn, and
the slot is freed.

A send costs the bound two clock readings, not a cancel scope (entering and
leaving one costs about 5 µs, which under load showed as much more queueing),
and a connection costs it no task: one watchdog task per server does the timing.

- :class:`SendWatchdog` is that task (run by :meth:`~SendWatchdog.running` in
  the server's nursery): it sleeps until the deadline of the oldest send in
  progress on any connection it watches, and ends each send that has waited
  ``seconds``.
- :class:`Watched` is one sender under a watchdog (a connection's byte stream,
  a WebSocket connection, a gRPC call), for as long as
  :meth:`~SendWatchdog.watching` holds it: :meth:`~Watched.begin` and
  :meth:`~Watched.end` bracket each of its sends, and its
  :meth:`~Watched.expire` says how a send that waited too long is ended.
- :class:`SendBoundedStream` bounds every write of a byte stream (hypercorn's
  HTTP connections, the gRPC connection's writer): a write that times out closes
  the connection at once, since no goodbye can get through a full buffer, and
  raises :class:`trio.BrokenResourceError`, which every server here takes for a
  client that went away.
- :func:`bound_hypercorn_sends` makes hypercorn run each HTTP connection over a
  watched :class:`SendBoundedStream` (through the hook of
  :mod:`._hypercorn_compat`); :class:`StopOnBrokenSend` is the ASGI wrapper that
  makes a send to a connection whose write failed raise :class:`ClientGone` in
  the application, instead of returning as if the bytes had gone out.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import trio

from ._hypercorn_compat import wrap_connections

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


class Watched:
    """One sender whose sends a :class:`SendWatchdog` bounds; subclasses say how one is ended.

    Each send is bracketed by :meth:`begin` and :meth:`end` (in a ``finally``).
    Sends may overlap (several tasks sending on one connection): the clock then
    runs from the last moment the sender made progress (the first send began,
    or one completed). :attr:`too_slow` is set, to the ClientTooSlow, when the
    watchdog ends a send; from then on the sender counts as gone.
    """

    def __init__(self) -> None:
        self.since: float | None = None  # when the clock of the sends in progress started
        self.sending = 0  # sends in progress
        self.too_slow: ClientTooSlow | None = None

    def begin(self) -> None:
        if not self.sending:
            self.since = trio.current_time()
        self.sending += 1

    def end(self) -> None:
        self.sending -= 1
        self.since = trio.current_time() if self.sending else None

    async def expire(self, error: ClientTooSlow) -> None:
        """End the send in progress, so that it raises; called once, by the watchdog's task.

        It should not block (the watchdog's other senders wait meanwhile). An
        exception from it is logged, and the watchdog goes on watching the others.
        """
        raise NotImplementedError


class SendWatchdog:
    """Ends the sends, of every sender it is watching, that have waited ``seconds``.

    One per server: :meth:`running` runs its task for the life of the server's
    connections, and each connection (each gRPC call) is watched for its own
    life with :meth:`watching`. The task sleeps until the deadline of the
    oldest send in progress (``seconds`` from now when none is), so it wakes
    about once per ``seconds`` however many clients keep reading, and ends a
    blocked send at its deadline exactly.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._senders: set[Watched] = set()
        # shielded: cancelling the server does not stop the watching (see running)
        self._watching = trio.CancelScope(shield=True)

    @contextlib.contextmanager
    def watching(self, sender: Watched) -> Iterator[None]:
        """Watch ``sender``'s sends during the ``with`` block."""
        self._senders.add(sender)
        try:
            yield
        finally:
            self._senders.discard(sender)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Run the watchdog's task for the ``async with`` block (once per watchdog).

        The task keeps watching while the block is cancelled, so that a write
        made in a shielded scope (hypercorn's) as the server stops stays
        bounded; it stops when the block exits. The block runs in the task's
        nursery: what it raises comes out in an ExceptionGroup.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._run)
            try:
                yield
            finally:
                self._watching.cancel()

    async def _run(self) -> None:
        with self._watching:
            while True:
                now = trio.current_time()
                wake = now + self.seconds
                for sender in list(self._senders):
                    since = sender.since
                    if since is None or sender.too_slow is not None:
                        continue
                    deadline = since + self.seconds
                    if deadline <= now:
                        sender.too_slow = ClientTooSlow(self.seconds)
                        try:
                            await sender.expire(sender.too_slow)
                        except Exception:  # one sender's bug leaves the others bounded
                            log.exception("ending a send to a client that stopped reading failed")
                    elif deadline < wake:
                        wake = deadline
                await trio.sleep_until(wake)


class SendBoundedStream(Watched, trio.abc.HalfCloseableStream):
    """A stream whose every ``send_all`` completes within its watchdog's time or closes the connection.

    Bounded while a :class:`SendWatchdog` is watching it. A write that times
    out has the underlying stream closed under it by the watchdog (a reader blocked on it wakes with ClosedResourceError) and raises
    BrokenResourceError; the bound holds even inside a shielded scope, as
    hypercorn's writes are. :attr:`broken` is set once any write has failed.
    Every other attribute (``socket``, ``transport_stream``, TLS methods) is
    the underlying stream's.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        super().__init__()
        self.stream = stream
        self.broken = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.begin()
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.broken = True
            if self.too_slow is not None:
                raise trio.BrokenResourceError(str(self.too_slow)) from self.too_slow
            raise
        finally:
            self.end()

    async def expire(self, error: ClientTooSlow) -> None:
        """Close the connection at once: the write blocked on it raises, and no goodbye fits."""
        self.broken = True
        log.info("closing a connection whose client stopped reading: %s", error)
        await trio.aclose_forcefully(self.stream)

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


@contextlib.contextmanager
def _bounded_connection(
    config: Any, state: dict[str, Any], stream: trio.abc.Stream
) -> Iterator[tuple[dict[str, Any], trio.abc.Stream]]:
    """An HTTP connection's stream, watched when its hypercorn config carries a watchdog."""
    watchdog: SendWatchdog | None = getattr(config, "send_watchdog", None)
    if watchdog is None:
        yield state, stream
        return
    bounded = SendBoundedStream(stream)
    with watchdog.watching(bounded):
        yield {**state, STREAM_KEY: bounded}, bounded  # state: copied into each request's scope


def bound_hypercorn_sends(config: Any, watchdog: SendWatchdog) -> None:
    """Make hypercorn's trio worker bound every write of a connection served with ``config``.

    hypercorn 0.17 writes in a shielded scope and swallows a failed write, so a
    deadline around the ASGI ``send`` would never fire and the application would
    never learn that the client is gone: the bound has to sit on the connection's
    stream, through the hook :mod:`._hypercorn_compat` adds, each connection
    watched by ``watchdog`` while it is served (the caller runs the watchdog
    around hypercorn's ``serve``). Only connections served with a config
    carrying the watchdog are bounded (other hypercorn servers in the process,
    such as the demo upstream, are left as they were).
    """
    config.send_watchdog = watchdog
    wrap_connections(_bounded_connection)


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
