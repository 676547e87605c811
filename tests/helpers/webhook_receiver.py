"""A webhook receiver on loopback: a small HTTP/1.1 server (trio + h11) that records requests.

Each request is answered with the next :class:`Reply` queued on the receiver
(``replies``), else with ``default``. A reply with ``hang=True`` reads the
request and never answers: the connection stays open until the client drops
it (``dropped`` counts those) or the receiver is cancelled. Every request is
recorded whole (method, target, headers, body) with the trio clock's time it
arrived, so tests can check signatures and the gaps between retries.
"""

from __future__ import annotations

import collections
import dataclasses

import h11
import trio

MAX_REQUEST_BYTES = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int = 204
    headers: tuple[tuple[str, str], ...] = ()
    hang: bool = False


@dataclasses.dataclass(frozen=True)
class Received:
    method: str
    target: str  # path and query
    headers: dict[str, str]  # names lower-cased
    body: bytes
    at: float  # trio.current_time() when it arrived whole


class WebhookReceiver:
    """Serve with ``await nursery.start(receiver.serve)``; then ``receiver.url(path)``."""

    def __init__(self) -> None:
        self.replies: collections.deque[Reply] = collections.deque()
        self.default = Reply()
        self.requests: list[Received] = []
        self.dropped = 0  # hanging requests whose client went away
        self.port = 0
        self._changed = trio.Event()

    def url(self, path: str = "/hooks/answers") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:
        """Wait until ``count`` requests have arrived; returns them all."""
        with trio.fail_after(timeout):
            while len(self.requests) < count:
                await self._wait_change()
        return list(self.requests)

    async def wait_dropped(self, count: int, timeout: float = 5.0) -> None:
        """Wait until ``count`` hanging requests have been dropped by their client."""
        with trio.fail_after(timeout):
            while self.dropped < count:
                await self._wait_change()

    async def _wait_change(self) -> None:
        await self._changed.wait()

    def _change(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _connection(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        try:
            async with stream:
                for _ in range(1000):  # requests on one kept-alive connection, at most
                    if not await self._one_request(stream, connection):
                        return
                    if connection.our_state is not h11.DONE:
                        return
                    connection.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return

    async def _one_request(self, stream: trio.SocketStream, connection: h11.Connection) -> bool:
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return False
                connection.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                return False
        assert request is not None
        self.requests.append(
            Received(
                method=request.method.decode(),
                target=request.target.decode(),
                headers={name.decode().lower(): value.decode() for name, value in request.headers},
                body=bytes(body),
                at=trio.current_time(),
            )
        )
        self._change()
        reply = self.replies.popleft() if self.replies else self.default
        if reply.hang:
            await self._hang(stream)
            return False
        headers = [("content-length", "0"), *reply.headers]
        await stream.send_all(
            connection.send(h11.Response(status_code=reply.status, headers=headers))
        )
        await stream.send_all(connection.send(h11.EndOfMessage()))
        return True

    async def _hang(self, stream: trio.SocketStream) -> None:
        """Answer nothing; return once the client has closed the connection."""
        while await stream.receive_some(65536):
            pass
        self.dropped += 1
        self._change()
