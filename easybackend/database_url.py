"""The one type for a database URL: parsed once, and the only code that knows where its secrets sit.

Two kinds are served: ``sqlite:///PATH`` (a file) and ``postgresql://…`` or
``postgres://…`` (libpq's URL form). A PostgreSQL URL can carry a password in
two places, the user part (``user:secret@host``, percent-encoded or not) and a
``password=`` query parameter (any case, as libpq reads it); :attr:`secrets`
finds both, as written and decoded, and :meth:`redacted` hides both.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from pathlib import Path

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
SQLITE_PREFIX = "sqlite:///"
UNPARSABLE = "(a database URL that cannot be parsed)"


@dataclasses.dataclass(frozen=True)
class DatabaseURL:
    """A checked database URL (build it with :meth:`parse`). ``text`` is the URL as given."""

    text: str = dataclasses.field(repr=False)

    @classmethod
    def parse(cls, text: str, *, name: str = "DATABASE_URL") -> DatabaseURL:
        """The URL ``text`` names; raises ValueError (its message names ``name``, never a secret)."""
        if text.startswith(POSTGRES_SCHEMES):
            return cls(text)
        if text.startswith(SQLITE_PREFIX) and text != SQLITE_PREFIX:
            return cls(text)
        scheme = text.partition("://")[0]
        named = f"(scheme {scheme!r}) " if "://" in text and scheme.isalnum() else ""
        raise ValueError(
            f"{name} {named}is not a supported database URL: use sqlite:///PATH or postgresql://…"
        )

    @property
    def is_postgres(self) -> bool:
        return self.text.startswith(POSTGRES_SCHEMES)

    @property
    def sqlite_path(self) -> Path:
        """The SQLite database file (meaningless for a PostgreSQL URL)."""
        return Path(self.text.removeprefix(SQLITE_PREFIX))

    @property
    def secrets(self) -> list[str]:
        """Every password the URL holds, as written and decoded, longest first."""
        if not self.is_postgres:
            return []
        found: list[str] = []
        try:
            parts = urllib.parse.urlsplit(self.text)
        except ValueError:
            return []
        userinfo = parts.netloc.rpartition("@")[0]
        if ":" in userinfo:
            found.append(userinfo.partition(":")[2])
        for pair in parts.query.split("&"):
            key, _, value = pair.partition("=")
            if urllib.parse.unquote(key).strip().lower() == "password":
                found.append(value)
        found += [urllib.parse.unquote(secret) for secret in found]
        found += [urllib.parse.unquote_plus(secret) for secret in found]
        return sorted({secret for secret in found if secret}, key=len, reverse=True)

    def redacted(self) -> str:
        """The URL fit to print: every password replaced by ``***``."""
        if not self.is_postgres:
            return self.text
        try:
            parts = urllib.parse.urlsplit(self.text)
        except ValueError:
            return UNPARSABLE
        netloc = parts.netloc
        user, at, host = netloc.rpartition("@")
        if at and ":" in user:
            netloc = f"{user.partition(':')[0]}:***@{host}"
        query = "&".join(
            f"{key}=***" if urllib.parse.unquote(key).strip().lower() == "password" else pair
            for pair in parts.query.split("&")
            if pair
            for key in [pair.partition("=")[0]]
        )
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))

    def scrub(self, text: str) -> str:
        """``text`` with every password of this URL replaced by ``***``."""
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def same_store(self, other: DatabaseURL) -> bool:
        """Whether the two URLs obviously name the same database."""
        if self.is_postgres or other.is_postgres:
            return self.text == other.text
        return self.sqlite_path.resolve() == other.sqlite_path.resolve()

    def __str__(self) -> str:
        return self.redacted()
