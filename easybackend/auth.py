"""Backend API keys: who is asking, checked the same way on every protocol.

``API_KEYS=name:secret,name2:secret2``. A request presents a secret (HTTP
``Authorization: Bearer``, the same header or an ``api_key`` query parameter
on the WebSocket handshake, gRPC ``authorization`` metadata); the key's
*name* becomes the owner of the conversations it touches, so two keys asking
on conversation ``"1"`` get two different conversations. Secrets are compared
in constant time (digests of equal length, every key compared) and never
logged. With no keys configured everyone is the anonymous owner ``""``.

The transports do not call this module: they hand what they were given to
:meth:`easybackend.chat.caller.Callers.caller`, which uses it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping

from .errors import Unauthenticated

KEY_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


class KeyRing:
    """The configured keys; :meth:`owner_for` turns a presented secret into an owner name."""

    def __init__(self, keys: Mapping[str, str]) -> None:
        self._digests = [(name, _digest(secret)) for name, secret in keys.items()]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def owner_for(self, presented: str | None) -> str:
        """The name of the key whose secret is ``presented``; raises Unauthenticated.

        With authentication off, returns ``""`` whatever is presented.
        """
        if not self._digests:
            return ""
        if not presented:
            raise Unauthenticated("an API key is required: send Authorization: Bearer <key>")
        owner = self.name_for(presented)
        if owner is None:
            raise Unauthenticated("the API key is not valid")
        return owner

    def name_for(self, presented: str) -> str | None:
        """The name of the key whose secret is ``presented``, or None (no key matches)."""
        candidate = _digest(presented)
        owner = None
        for (
            name,
            digest,
        ) in self._digests:  # no early exit: the time does not depend on which matched
            if hmac.compare_digest(candidate, digest):
                owner = name
        return owner


def bearer_token(authorization: str | None) -> str | None:
    """The token of ``Bearer <token>`` (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def parse_api_keys(value: str) -> dict[str, str]:
    """``name:secret,…`` → {name: secret}; raises ValueError without echoing any secret."""
    keys: dict[str, str] = {}
    for number, item in enumerate((part.strip() for part in value.split(",")), 1):
        if not item:
            continue
        name, separator, secret = item.partition(":")
        name, secret = name.strip(), secret.strip()
        if not separator or not secret:
            raise ValueError(
                f"must be name:secret pairs separated by commas (entry {number} is not)"
            )
        if not KEY_NAME.fullmatch(name):
            raise ValueError(f"must use key names of A-Z a-z 0-9 _ . - (entry {number} does not)")
        if name in keys:
            raise ValueError(f"must name each key once ({name!r} appears twice)")
        if secret in keys.values():
            raise ValueError(f"must give each key its own secret (entry {number} repeats one)")
        keys[name] = secret
    return keys


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()
