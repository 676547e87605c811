"""Copy every conversation from one store to another (``easybackend migrate-storage``).

Each conversation goes across whole, through the stores' own
:meth:`~easybackend.storage.base.Storage.export_all` and
:meth:`~easybackend.storage.base.Storage.import_conversations`: owner, id,
system prompt and its token count, counters, times, every turn as stored,
and the bookkeeping of ``import-json`` (so importing the original's files
again into the new store adds nothing twice). The target is written in
transactions of about :data:`BATCH_ROWS` rows; a copy that fails part-way
leaves whole conversations only, and can be run again with ``--force``.

Meant for a deployment whose servers are stopped: it takes no conversation
locks, so an ask answered during the copy may or may not be in it, and
conversations created after the copy started are left out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import urllib.parse
from pathlib import Path

from .base import ConversationExport, Storage

BATCH_ROWS = 5000  # conversations plus turns written per transaction, roughly
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class TargetNotEmpty(Exception):
    """The target already holds conversations and ``force`` was not given."""


@dataclasses.dataclass
class MigrationReport:
    conversations: int = 0
    turns: int = 0
    legacy_imports: int = 0  # import-json bookkeeping records (one per legacy file)

    def add(self, batch: list[ConversationExport]) -> None:
        self.conversations += len(batch)
        self.turns += sum(len(conversation.turns) for conversation in batch)
        self.legacy_imports += sum(len(conversation.legacy_imports) for conversation in batch)

    def summary(self, source: str, target: str) -> str:
        return (
            f"copied {self.conversations} conversations with {self.turns} turns "
            f"({self.legacy_imports} legacy import records) from {source} to {target}"
        )


async def copy_conversations(
    source: Storage, target: Storage, *, force: bool = False
) -> MigrationReport:
    """Copy every conversation of ``source`` into ``target``; see the module docstring.

    Raises TargetNotEmpty when ``target`` holds conversations and ``force`` is
    false (then nothing is written); with ``force`` a conversation in both is
    replaced by the source's and the target's others are kept.
    """
    if not force:
        held, _ = await target.totals()
        if held:
            raise TargetNotEmpty(
                f"the target already holds {held} conversations; nothing was copied. "
                "Use --force to copy into it anyway (a conversation in both is replaced "
                "by the source's copy, the target's other conversations are kept)"
            )
    # Only the conversations the source holds now: should source and target be one database
    # under two URLs, the copies written would otherwise be read back and copied again.
    remaining, _ = await source.totals()
    report = MigrationReport()
    batch: list[ConversationExport] = []
    rows = 0
    async with contextlib.aclosing(source.export_all()) as conversations:
        async for conversation in conversations:
            if not remaining:
                break
            remaining -= 1
            batch.append(conversation)
            rows += 1 + len(conversation.turns)
            if rows >= BATCH_ROWS:
                await target.import_conversations(batch)
                report.add(batch)
                batch, rows = [], 0
    if batch:
        await target.import_conversations(batch)
        report.add(batch)
    return report


def check_url(flag: str, url: str) -> str:
    """``url`` if it names a store (sqlite:///PATH or postgresql://…); raises ValueError."""
    if url.startswith(POSTGRES_SCHEMES) or (url.startswith("sqlite:///") and url != "sqlite:///"):
        return url
    scheme = url.partition("://")[0]
    named = f"(scheme {scheme!r}) " if "://" in url and scheme.isalnum() else ""
    raise ValueError(
        f"{flag} {named}is not a supported database URL: use sqlite:///PATH or postgresql://…"
    )


def same_store(first: str, second: str) -> bool:
    """Whether two store URLs (checked by :func:`check_url`) obviously name the same database."""
    if first.startswith(POSTGRES_SCHEMES) or second.startswith(POSTGRES_SCHEMES):
        return first == second
    return sqlite_path(first).resolve() == sqlite_path(second).resolve()


def sqlite_path(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


def redact(url: str) -> str:
    """``url`` fit to print: the password (in the user part or a ``password=`` parameter) hidden."""
    if not url.startswith(POSTGRES_SCHEMES):
        return url
    try:
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            user, _, host = netloc.rpartition("@")
            netloc = f"{user.partition(':')[0]}:***@{host}"
        query = "&".join(
            f"{name}=***" if name.strip().lower() == "password" else f"{name}={value}"
            for name, value in (pair.partition("=")[::2] for pair in parts.query.split("&") if pair)
        )
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:
        return "(a database URL that cannot be parsed)"


def secrets_of(url: str) -> list[str]:
    """The password(s) in ``url``, as written and decoded, to scrub them from any message."""
    found: list[str] = []
    try:
        parts = urllib.parse.urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        if ":" in userinfo:
            found.append(userinfo.partition(":")[2])
        for pair in parts.query.split("&"):
            name, _, value = pair.partition("=")
            if name.strip().lower() == "password":
                found.append(value)
    except ValueError:
        pass
    found += [urllib.parse.unquote(secret) for secret in found]
    return sorted({secret for secret in found if secret}, key=len, reverse=True)


def scrub(text: str, *urls: str) -> str:
    """``text`` with every password of ``urls`` replaced by ``***``."""
    for url in urls:
        for secret in secrets_of(url):
            text = text.replace(secret, "***")
    return text
