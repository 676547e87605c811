"""Listening sockets, bound before anything is served so that a taken port fails start-up.

Sockets get ``SO_REUSEADDR`` (restart without waiting for TIME_WAIT) and never
``SO_REUSEPORT``, so a second instance on the same port fails instead of
silently sharing it.
"""

from __future__ import annotations

import errno
import socket

LISTEN_BACKLOG = 4096  # connections the kernel queues before they are accepted (bursts of clients)


class ListenError(Exception):
    """A listener could not be bound; the message names the port and the reason."""


def bind_tcp(host: str, port: int, *, name: str, backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """A listening TCP socket on ``host:port``; raises :class:`ListenError`."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ListenError(
            f"cannot listen for {name} on {host}:{port}: {exc.strerror or exc}"
        ) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        reason = (
            "the port is already in use"
            if exc.errno == errno.EADDRINUSE
            else (exc.strerror or str(exc))
        )
        raise ListenError(f"cannot listen for {name} on port {port} ({host}): {reason}") from None
    return sock
