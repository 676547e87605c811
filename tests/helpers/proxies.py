"""Proxies on loopback for the tests: SOCKS5 (CONNECT only) and HTTP CONNECT.

Each records the tunnels its clients asked for (``tunnels``); start one with
``await nursery.start(proxy.serve)``, then point a client at ``proxy.port``.
"""

from __future__ import annotations

import socket
from typing import Any

import trio


class Reader:
    """Exact reads from a stream, keeping what was read past them."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = b""

    async def exactly(self, count: int) -> bytes:
        while len(self.buffer) < count:
            data = await self.stream.receive_some()
            if not data:
                raise trio.BrokenResourceError("closed mid-handshake")
            self.buffer += data
        taken, self.buffer = self.buffer[:count], self.buffer[count:]
        return taken

    async def until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            data = await self.stream.receive_some()
            if not data:
                raise trio.BrokenResourceError("closed mid-handshake")
            self.buffer += data
        taken, _, self.buffer = self.buffer.partition(marker)
        return taken


async def splice(a: trio.abc.Stream, b: trio.abc.Stream, first: bytes = b"") -> None:
    """Copy bytes both ways until either side ends; then close both."""

    async def copy(source: trio.abc.Stream, sink: trio.abc.Stream, scope: trio.CancelScope) -> None:
        try:
            while data := await source.receive_some():
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    try:
        if first:
            await b.send_all(first)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(copy, a, b, nursery.cancel_scope)
            nursery.start_soon(copy, b, a, nursery.cancel_scope)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(a)
        await trio.aclose_forcefully(b)


class _LoopbackProxy:
    """A proxy on a free loopback port; ``tunnels`` records what each client asked for."""

    def __init__(self) -> None:
        self.tunnels: list[tuple[str, Any]] = []
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._client, listeners)

    async def _client(self, client: trio.SocketStream) -> None:
        raise NotImplementedError


class Socks5Proxy(_LoopbackProxy):
    """A SOCKS5 proxy (no authentication, CONNECT only) recording each tunnel's target."""

    async def _client(self, client: trio.SocketStream) -> None:
        try:
            reader = Reader(client)
            version, methods = await reader.exactly(2)
            assert version == 5 and 0 in await reader.exactly(methods)
            await client.send_all(b"\x05\x00")
            version, command, _, address_type = await reader.exactly(4)
            assert (version, command) == (5, 1), "only CONNECT"
            if address_type == 1:
                host = socket.inet_ntop(socket.AF_INET, await reader.exactly(4))
            elif address_type == 3:
                host = (await reader.exactly((await reader.exactly(1))[0])).decode()
            else:
                host = socket.inet_ntop(socket.AF_INET6, await reader.exactly(16))
            port = int.from_bytes(await reader.exactly(2), "big")
            target = await trio.open_tcp_stream(host, port)
        except (trio.BrokenResourceError, OSError):
            await trio.aclose_forcefully(client)
            return
        self.tunnels.append((host, port))
        await client.send_all(b"\x05\x00\x00\x01" + bytes(6))
        await splice(client, target, reader.buffer)


class ConnectProxy(_LoopbackProxy):
    """An HTTP proxy: CONNECT, and plain requests forwarded (``GET http://host:port/path``).

    Records each target and its first tunnelled byte (for a forwarded request: ``b"="``).
    """

    async def _client(self, client: trio.SocketStream) -> None:
        try:
            reader = Reader(client)
            head = (await reader.until(b"\r\n\r\n")).decode("latin-1")
            method, authority, rest = head.split("\r\n", 1)[0].split(" ", 2)
            if method != "CONNECT" and authority.startswith("http://"):
                await self._forward(client, reader, head, method, authority, rest)
                return
            assert method == "CONNECT", head
            host, _, port = authority.rpartition(":")
            target = await trio.open_tcp_stream(host, int(port))
            await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            first = reader.buffer or await client.receive_some()
        except (trio.BrokenResourceError, OSError):
            await trio.aclose_forcefully(client)
            return
        self.tunnels.append((authority, first[:1]))
        await splice(client, target, first)

    async def _forward(
        self, client: trio.SocketStream, reader: Reader, head: str, method: str, url: str, rest: str
    ) -> None:
        """Send one plain request on to the host its absolute URL names; splice the rest."""
        authority, _, path = url[len("http://") :].partition("/")
        host, _, port = authority.rpartition(":")
        try:
            target = await trio.open_tcp_stream(host, int(port or 80))
        except OSError:
            await trio.aclose_forcefully(client)
            return
        self.tunnels.append((authority, b"="))
        headers = head.partition("\r\n")[2]
        request = f"{method} /{path} {rest}\r\n{headers}\r\n\r\n".encode("latin-1")
        await splice(client, target, request + reader.buffer)
