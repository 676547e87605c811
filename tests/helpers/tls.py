"""TLS on loopback for the tests: a certificate authority and a TLS front for a plain server.

``trusted_authority`` makes a throw-away CA whose certificate file the
upstream client trusts (through ``SSL_CERT_FILE``, which httpx reads);
``tls_front`` serves TLS on a free loopback port and passes each connection
on, in clear, to a server already listening (the fake upstream), so that
``https://127.0.0.1:PORT/v1`` is an HTTPS upstream.
"""

from __future__ import annotations

import functools
import ssl
from pathlib import Path

import pytest
import trio
import trustme

from .proxies import splice


def trusted_authority(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> trustme.CA:
    """A new CA, trusted by this process's HTTP clients made from now on (``SSL_CERT_FILE``)."""
    authority = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    return authority


async def tls_front(nursery: trio.Nursery, backend_port: int, authority: trustme.CA) -> int:
    """Serve TLS for 127.0.0.1 on a free port, relaying each connection to ``backend_port``.

    Returns the port. Each connection is spliced to a new one to the backend
    until either side closes; one the backend refuses is closed at once. The
    server runs until ``nursery`` is cancelled.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)

    async def relay(tls: trio.SSLStream) -> None:
        try:
            backend = await trio.open_tcp_stream("127.0.0.1", backend_port)
        except OSError:
            await trio.aclose_forcefully(tls)
            return
        await splice(tls, backend)

    serve = functools.partial(
        trio.serve_ssl_over_tcp, relay, 0, context, host="127.0.0.1", https_compatible=True
    )
    listeners = await nursery.start(serve)
    return listeners[0].transport_listener.socket.getsockname()[1]
