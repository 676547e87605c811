"""Who is asking: the client address that per-client limits count when API keys are off.

Every transport hands the core what it was given: the address of the peer
that opened the connection and the ``X-Forwarded-For`` values it sent (the
HTTP header, the WebSocket handshake's header, gRPC ``x-forwarded-for``
metadata). :func:`client_address` turns them into the client's address by
one rule, the same on every protocol:

- when the peer is not a trusted proxy (``TRUSTED_PROXIES``), the client is
  the peer, whatever ``X-Forwarded-For`` says (anyone can send that header);
- when it is, the client is the right-most ``X-Forwarded-For`` address that
  is not itself a trusted proxy (each proxy appends the address it saw, so
  the entries left of the last untrusted one may be forged); when every entry
  is a trusted proxy, or the header is missing or malformed, the left-most
  valid address is used, else the peer itself.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from contextvars import ContextVar

from ..settings import Settings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# The client of the connection or call being served, for transports whose handlers cannot
# hand it to each AskRequest explicitly (WebSocket per connection, gRPC per call).
CURRENT: ContextVar[str] = ContextVar("easybackend_client", default="")
# The remote address of the gRPC connection being served (its calls read it).
PEER: ContextVar[str] = ContextVar("easybackend_peer", default="")


def current_client() -> str:
    """The client address the transport set for this task; "" when none did."""
    return CURRENT.get()


def client_address(peer: object, forwarded_for: Iterable[str], settings: Settings) -> str:
    """The client's address from the peer's and the ``X-Forwarded-For`` values (in order).

    ``peer`` is whatever the transport knows of the remote end (an address
    string, an ``ipaddress`` object, an object with an ``address``, ``None``
    when unknown). Never raises:
    unparsable entries are skipped.
    """
    peer = getattr(peer, "address", peer)  # a trio-websocket Endpoint
    peer_ip = _parse(str(peer) if peer is not None else "")
    shown_peer = str(peer_ip) if peer_ip is not None else (str(peer) if peer else "")
    trusted = settings.trusted_proxies
    if peer_ip is None or not _is_trusted(peer_ip, trusted):
        return shown_peer
    hops = [ip for ip in map(_parse, _entries(forwarded_for)) if ip is not None]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            return str(hop)
    return str(hops[0]) if hops else shown_peer


def forwarded_for_values(headers: Iterable[tuple[bytes, bytes]]) -> list[str]:
    """The ``X-Forwarded-For`` values of raw (name, value) header pairs, in order."""
    return [
        value.decode("latin-1") for name, value in headers if name.lower() == b"x-forwarded-for"
    ]


def stream_peer(stream: object) -> str:
    """The remote address of a trio SocketStream (or an SSLStream over one); "" if unknown."""
    transport = getattr(stream, "transport_stream", stream)
    sock = getattr(transport, "socket", None)
    try:
        address = sock.getpeername() if sock is not None else None
    except OSError:
        return ""
    return str(address[0]) if isinstance(address, tuple) and address else ""


def _entries(values: Iterable[str]) -> list[str]:
    return [entry.strip() for value in values for entry in value.split(",") if entry.strip()]


def _parse(text: str) -> Address | None:
    """An address from ``1.2.3.4``, ``1.2.3.4:5``, ``::1``, ``[::1]:5`` or ``::ffff:1.2.3.4``."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else text[1:]
    elif text.count(":") == 1:  # IPv4 with a port
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_trusted(address: Address, trusted: tuple[Network, ...]) -> bool:
    return any(address.version == network.version and address in network for network in trusted)
