"""Who is calling: the :class:`Caller` every service method takes, made once per request.

A transport hands the core what it was given — the key presented (or the
``Authorization`` header value), the client's request id if it sent one, the
address of the peer that opened the connection and the ``X-Forwarded-For``
values it sent (the HTTP header, the WebSocket handshake's header, gRPC
``x-forwarded-for`` metadata) — and :meth:`Callers.caller` returns the
Caller or raises Unauthenticated. No service method has a default caller, so
a handler that forgot to make one fails instead of acting as someone else.

The client's address (:func:`client_address`, what per-client limits count
when API keys are off) follows one rule, the same on every protocol:

- when the peer is not a trusted proxy (``TRUSTED_PROXIES``), the client is
  the peer, whatever ``X-Forwarded-For`` says (anyone can send that header);
- when it is, the client is the right-most ``X-Forwarded-For`` address that
  is not itself a trusted proxy (each proxy appends the address it saw, so
  the entries left of the last untrusted one may be forged); when every entry
  is a trusted proxy, or the header is missing or malformed, the left-most
  valid address is used, else the peer itself.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable

from ..auth import KeyRing, bearer_token
from ..request_ids import accept_request_id
from ..settings import Settings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# openai: the OpenAI-compatible API under /v1 on the HTTP port, streaming or not
PROTOCOLS = frozenset({"http", "sse", "ws", "grpc", "openai", "internal"})


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling, for one request: made by :meth:`Callers.caller`, never by hand."""

    owner: str  # the namespace of the conversations it touches: the key's name, "" without keys
    key_name: str | None  # the key it presented; None when API keys are off
    protocol: str  # http, sse, ws, grpc, openai (internal for the server's own calls)
    request_id: str  # the client's (if acceptable) or a new one: logged and sent back
    client: str  # its address (see client_address); what per-client limits count without keys

    def with_request_id(self, presented: object) -> Caller:
        """The same caller for another request: ``presented`` if acceptable, else a new id."""
        return dataclasses.replace(self, request_id=accept_request_id(presented))

    def with_protocol(self, protocol: str) -> Caller:
        """The same caller on another of its protocols (an HTTP route that streams: ``sse``)."""
        return dataclasses.replace(self, protocol=protocol)


class Callers:
    """Makes the Caller of each request from what its transport presents. One per service."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = KeyRing(settings.api_keys)

    def caller(
        self,
        *,
        protocol: str,
        key: str | None = None,
        authorization: str | None = None,
        request_id: str | None = None,
        peer: object = None,
        forwarded_for: Iterable[str] = (),
    ) -> Caller:
        """The caller that presented ``key`` (or an ``Authorization: Bearer`` value).

        ``request_id`` is the client's, taken if acceptable (else a new one is
        made); ``peer`` and ``forwarded_for`` give the client's address. Raises
        Unauthenticated when API keys are set and the key is missing or wrong;
        with keys off whatever is presented is ignored.
        """
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}")
        presented = key if key is not None else bearer_token(authorization)
        owner = self.keys.owner_for(presented)
        return Caller(
            owner=owner,
            key_name=owner if self.keys.enabled else None,
            protocol=protocol,
            request_id=accept_request_id(request_id),
            client=client_address(peer, forwarded_for, self.settings),
        )


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
