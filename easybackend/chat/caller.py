"""Who is calling: the :class:`Caller` every service method takes, made once per request.

A transport hands the core what it was given — the key presented (or the
``Authorization`` header value), the client's request id if it sent one, the
address of the peer that opened the connection and the ``X-Forwarded-For``
values it sent (the HTTP header, the WebSocket handshake's header, gRPC
``x-forwarded-for`` metadata) — and :meth:`Callers.caller` returns the
Caller or raises Unauthenticated. No service method has a default caller, so
a handler that forgot to make one fails instead of acting as someone else.

A key is one of ``API_KEYS`` or one of the stored keys
(:mod:`easybackend.governance.keys`, read from the in-process copy of the
key table: no database read); authentication is on when either holds a key.
The Caller carries the key's :class:`~easybackend.governance.keys.Grant`
(its name, models and limits), which the core checks. A Caller lives as long
as its request, or as its WebSocket connection: :meth:`Callers.current` says
whether its key still works (revoked, disabled, expired since, or keys
turned on since an anonymous connection opened) and gives its grant as the
table stands now, which the core asks before each ask.

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
import hashlib
import hmac
import ipaddress
from collections.abc import Iterable

from ..auth import KeyRing, bearer_token
from ..errors import Forbidden, NotFound, Unauthenticated
from ..governance.keys import Grant, KeyStore
from ..request_ids import accept_request_id
from ..settings import Settings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# openai: the OpenAI-compatible API under /v1 on the HTTP port, streaming or not; summary and
# title: the server's own calls for a conversation's memory (chat/memory.py), made for the
# caller whose turn made them due
PROTOCOLS = frozenset({"http", "sse", "ws", "grpc", "openai", "internal", "summary", "title"})


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling, for one request: made by :meth:`Callers.caller`, never by hand."""

    owner: str  # the namespace of the conversations it touches: the key's name, "" without keys
    key_name: str | None  # the key it presented; None when API keys are off
    protocol: str  # http, sse, ws, grpc, openai (internal, summary, title: the server's own)
    request_id: str  # the client's (if acceptable) or a new one: logged and sent back
    client: str  # its address (see client_address); what per-client limits count without keys
    grant: Grant | None = None  # what its key allows (models, limits); None when keys are off

    def with_request_id(self, presented: object) -> Caller:
        """The same caller for another request: ``presented`` if acceptable, else a new id."""
        return dataclasses.replace(self, request_id=accept_request_id(presented))

    def with_protocol(self, protocol: str) -> Caller:
        """The same caller on another of its protocols (an HTTP route that streams: ``sse``)."""
        return dataclasses.replace(self, protocol=protocol)


class Callers:
    """Makes the Caller of each request from what its transport presents. One per service."""

    def __init__(self, settings: Settings, stored: KeyStore | None = None) -> None:
        self.settings = settings
        self.keys = KeyRing(settings.api_keys)
        self.stored = stored  # the stored keys' copy, if this service has a store
        self._env_grants = {name: Grant(name) for name in settings.api_keys}
        admin = settings.admin_key
        self._admin_digest = hashlib.sha256(admin.encode()).digest() if admin else None

    @property
    def enabled(self) -> bool:
        """Keys are required: API_KEYS is set, or the key table holds a key."""
        return self.keys.enabled or (self.stored is not None and self.stored.enabled)

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
        Unauthenticated when keys are on and the key is missing, wrong, or a
        stored key that is revoked, disabled or expired; with keys off whatever
        is presented is ignored.
        """
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}")
        presented = key if key is not None else bearer_token(authorization)
        grant = self._grant(presented)
        return Caller(
            owner=grant.name if grant is not None else "",
            key_name=grant.name if grant is not None else None,
            protocol=protocol,
            request_id=accept_request_id(request_id),
            client=client_address(peer, forwarded_for, self.settings),
            grant=grant,
        )

    def _grant(self, presented: str | None) -> Grant | None:
        """The grant of the key ``presented``, None with keys off; raises Unauthenticated."""
        if not self.enabled:
            return None
        if not presented:
            raise Unauthenticated("an API key is required: send Authorization: Bearer <key>")
        name = self.keys.name_for(presented) if self.keys.enabled else None
        if name is not None:
            return self._env_grants[name]
        found = self.stored.find(presented) if self.stored is not None else None
        if found is None:
            raise Unauthenticated("the API key is not valid")
        return self.stored.usable(*found)  # type: ignore[union-attr]

    def current(self, caller: Caller) -> Caller:
        """``caller`` with its key as it stands now; raises Unauthenticated if it no longer works.

        A stored key revoked, disabled or expired since the caller was made no
        longer works, and one whose models or limits changed gives its new
        grant; a caller made while keys were off no longer works once they are
        on. Reads the in-process copy only.
        """
        grant = caller.grant
        if grant is None:
            if self.enabled and caller.protocol != "internal":
                raise Unauthenticated("an API key is required: send Authorization: Bearer <key>")
            return caller
        if not grant.stored:
            return caller
        found = self.stored.named(grant.name) if self.stored is not None else None
        if found is None:
            raise Unauthenticated("the API key is not valid")
        fresh = self.stored.usable(*found)  # type: ignore[union-attr]
        return caller if fresh is grant else dataclasses.replace(caller, grant=fresh)

    def check_admin(self, authorization: str | None) -> None:
        """Let an admin request through, or refuse it.

        NotFound when ADMIN_KEY is not set (the admin API is off);
        Unauthenticated when no key or a wrong one is presented; Forbidden when
        the key presented is an ordinary key that works (API_KEYS or stored).
        The admin key is compared in constant time.
        """
        if self._admin_digest is None:
            raise NotFound("the admin API is off: set ADMIN_KEY to use it")
        presented = bearer_token(authorization)
        if not presented:
            raise Unauthenticated("the admin API needs ADMIN_KEY: send Authorization: Bearer <key>")
        if hmac.compare_digest(hashlib.sha256(presented.encode()).digest(), self._admin_digest):
            return
        try:
            ordinary = self._grant(presented) is not None
        except Unauthenticated:
            ordinary = False
        if ordinary:
            raise Forbidden("the admin API needs ADMIN_KEY, not an API key")
        raise Unauthenticated("the admin key is not valid")


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
