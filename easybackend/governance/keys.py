"""Backend keys kept in the database: created, changed and revoked at run time (SPEC §14).

A stored key has a name (``A-Z a-z 0-9 _ . -``, 1-64 characters, like the
names of ``API_KEYS``), a secret, the times it was created and changed, an
optional expiry, a disabled flag, a revocation time and optional limits
(``rpm``, ``tpm``, ``tokens_per_day``, ``tokens_per_month``, ``models``: see
:data:`LIMITS`; this module stores and edits them, the core enforces
``models``). Its name owns the conversations it asks on, as an ``API_KEYS``
name does.

Secrets are ``eb-`` and 43 URL-safe characters (256 random bits). Only the
SHA-256 of a secret is stored; the secret is shown once, when the key is
made (``easybackend keys create``, ``POST /admin/keys``), and never logged.

**Lookup.** A presented secret's SHA-256 is looked up among the digests of
the cached keys, and a hit is confirmed with ``hmac.compare_digest``: the
time taken depends on the digest of what was presented, never on a stored
secret, and a digest tells nothing of a secret.

**The cache.** Every instance holds the whole table in memory
(:class:`KeyStore`) and reads it again every :data:`REFRESH_SECONDS` in a
task of the server's nursery (:meth:`KeyStore.refresh_forever`; a change
made through this instance's admin API is read at once). So a key created,
changed, disabled or revoked anywhere (on another instance, or by the CLI
on the database) takes effect on every instance within about a second, well
inside the 5 seconds promised, and an ask costs no database read for its
key. Expiry is compared with the clock at each use, so it is exact. While
the table cannot be read the last read stays in force (the failure is
logged once): an outage neither locks every key out nor brings a revoked
key back.

**Authentication is on** when ``API_KEYS`` is set or the table holds any key,
revoked ones included (revoking the last key never opens the server to
everyone). A server that creates its first key at run time requires keys
from the next read of the table on.

**Names are given once**: a revoked key keeps its row and its name is never
given again (its conversations stay out of reach of a new key), and a name
of ``API_KEYS`` is refused when a key is created. Should a name end up in
both anyway (``API_KEYS`` changed later), each secret works under its own
rules, both as the same owner, and the server warns once.

Errors are ChatErrors: InvalidInput (a bad name or field), NotFound (no key
of that name), KeyConflict (the name is taken), StorageUnavailable.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Collection, Mapping
from typing import Any, Protocol

import trio

from ..auth import KEY_NAME
from ..errors import InvalidInput, KeyConflict, NotFound, StorageUnavailable, Unauthenticated
from ..storage.sql_keys import KeyRecord
from .models import checked_model_names

log = logging.getLogger("easybackend.keys")

REFRESH_SECONDS = 1.0  # between two reads of the key table, on every instance
SECRET_PREFIX = "eb-"
# The limits a key may hold, as the CLI and the admin API name them (None: no limit).
LIMITS = ("rpm", "tpm", "tokens_per_day", "tokens_per_month")
# What a create or an update may set, as the CLI and the admin API name it.
FIELDS = (*LIMITS, "models", "expires", "disabled")
MAX_PER_MINUTE = 2**31 - 1  # rpm and tpm are 32-bit columns
MAX_TOKENS = 2**62  # budgets are 64-bit columns

ACTIVE, DISABLED, EXPIRED, REVOKED = "active", "disabled", "expired", "revoked"


@dataclasses.dataclass(frozen=True, slots=True)
class Grant:
    """What the key a caller presented allows: its name, its models and its limits (None: none).

    An ``API_KEYS`` key has no limits and every model (``stored`` False).
    """

    name: str
    stored: bool = False
    models: tuple[str, ...] | None = None
    rpm: int | None = None
    tpm: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    expires_at: float | None = None


class KeyTable(Protocol):
    """What the key store needs of a conversation store (:class:`~easybackend.storage.sql_store.SQLStore`).

    Every method raises StorageUnavailable when the database fails.
    """

    async def keys(self) -> list[KeyRecord]:
        """Every stored key, revoked ones too, by name."""
        ...

    async def create_key(self, record: KeyRecord) -> bool:
        """Store a new key; False when a key of that name exists (revoked or not)."""
        ...

    async def update_key(self, name: str, changes: Mapping[str, Any]) -> KeyRecord | None:
        """Change the key unless it is revoked; the key after, or None if there is none."""
        ...

    async def revoke_key(self, name: str) -> KeyRecord | None:
        """Revoke the key (once); the key after, or None if there is none."""
        ...


def new_secret() -> str:
    """A new secret: ``eb-`` and 43 URL-safe characters (256 random bits)."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def secret_digest(secret: str) -> bytes:
    """The SHA-256 of a secret (what is stored, in hex, and what a lookup compares)."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def key_status(record: KeyRecord, now: float) -> str:
    """active, disabled, expired or revoked (the first that applies of revoked, disabled, expired)."""
    if record.revoked_at is not None:
        return REVOKED
    if record.disabled:
        return DISABLED
    if record.expires_at is not None and now >= record.expires_at:
        return EXPIRED
    return ACTIVE


def grant_of(record: KeyRecord) -> Grant:
    return Grant(
        name=record.name,
        stored=True,
        models=record.models,
        rpm=record.rpm,
        tpm=record.tpm,
        tokens_per_day=record.tokens_per_day,
        tokens_per_month=record.tokens_per_month,
        expires_at=record.expires_at,
    )


def iso(timestamp: float | None) -> str | None:
    """ISO 8601 in UTC with seconds (``2026-12-31T00:00:00Z``), None for None."""
    if timestamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def key_view(record: KeyRecord, now: float | None = None) -> dict[str, object]:
    """The JSON form of a key (admin API, ``keys list --json``): never its secret or its digest."""
    return {
        "name": record.name,
        "status": key_status(record, time.time() if now is None else now),
        "created_at": iso(record.created_at),
        "updated_at": iso(record.updated_at),
        "expires_at": iso(record.expires_at),
        "revoked_at": iso(record.revoked_at),
        "disabled": record.disabled,
        **{limit: getattr(record, limit) for limit in LIMITS},
        "models": list(record.models) if record.models is not None else None,
    }


def checked_name(name: object) -> str:
    """``name`` if it can name a key, else InvalidInput."""
    if not isinstance(name, str) or not KEY_NAME.fullmatch(name):
        raise InvalidInput("a key's name must be 1-64 characters of A-Z, a-z, 0-9, '_', '.', '-'")
    return name


def parse_expiry(value: object) -> float | None:
    """``YYYY-MM-DD`` (the key stops working at 00:00 UTC that day) or an ISO 8601 date and
    time (without a zone: UTC) → epoch seconds; None stays None. Raises InvalidInput."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            if len(text) == 10:
                day = datetime.date.fromisoformat(text)
                moment = datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC)
            else:
                moment = datetime.datetime.fromisoformat(text)
                if moment.tzinfo is None:
                    moment = moment.replace(tzinfo=datetime.UTC)
            return moment.timestamp()
        except (ValueError, OverflowError):
            pass
    raise InvalidInput(
        "expires must be a date YYYY-MM-DD (the key stops working at 00:00 UTC that day),"
        " an ISO 8601 date and time, or null for never"
    )


def key_changes(fields: Mapping[str, object]) -> dict[str, object]:
    """The columns to set (:data:`~easybackend.storage.sql_keys.CHANGEABLE`) for ``fields``
    (:data:`FIELDS` → values; None clears a limit, the expiry or the models). Raises InvalidInput."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise InvalidInput(f"unknown field {unknown[0]!r}: a key has {', '.join(FIELDS)}")
    changes: dict[str, object] = {}
    for limit in LIMITS:
        if limit in fields:
            changes[limit] = _limit(limit, fields[limit])
    if "models" in fields:
        models = fields["models"]
        try:
            changes["models"] = None if models is None else checked_model_names(models)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
    if "expires" in fields:
        changes["expires_at"] = parse_expiry(fields["expires"])
    if "disabled" in fields:
        if not isinstance(fields["disabled"], bool):
            raise InvalidInput("disabled must be true or false")
        changes["disabled"] = fields["disabled"]
    return changes


def _limit(name: str, value: object) -> int | None:
    if value is None:
        return None
    top = MAX_PER_MINUTE if name in ("rpm", "tpm") else MAX_TOKENS
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
        raise InvalidInput(f"{name} must be a whole number from 1 to {top}, or null for no limit")
    return value


# -- the operations, on a table (the CLI's, and KeyStore's for the admin API) ---------------------


async def create_key(
    table: KeyTable, name: object, fields: Mapping[str, object], *, reserved: Collection[str] = ()
) -> tuple[str, KeyRecord]:
    """Make a key: (its secret, to show once; its record). ``reserved``: the names of API_KEYS.

    Raises InvalidInput, KeyConflict (the name is taken, by a key of the table
    or of ``reserved``) or StorageUnavailable.
    """
    name = checked_name(name)
    changes = key_changes(fields)
    if name in reserved:
        raise KeyConflict(f"the name {name!r} is one of API_KEYS; choose another")
    secret = new_secret()
    now = time.time()
    record = KeyRecord(
        name=name,
        secret_sha256=secret_digest(secret).hex(),
        created_at=now,
        updated_at=now,
        **changes,  # type: ignore[arg-type]
    )
    if not await table.create_key(record):
        raise KeyConflict(
            f"a key named {name!r} exists or was revoked (a name is never given twice)"
        )
    return secret, record


async def update_key(table: KeyTable, name: object, fields: Mapping[str, object]) -> KeyRecord:
    """Change a key's limits, models, expiry or flag. Raises InvalidInput, NotFound, KeyConflict
    (a revoked key cannot change) or StorageUnavailable."""
    name = checked_name(name)
    changes = key_changes(fields)
    record = await table.update_key(name, changes)
    if record is None:
        raise NotFound(f"no key named {name!r}")
    if record.revoked_at is not None:
        raise KeyConflict(f"the key {name!r} is revoked: it cannot be changed")
    return record


async def revoke_key(table: KeyTable, name: object) -> KeyRecord:
    """Revoke a key for good (again: nothing changes). Raises InvalidInput, NotFound or
    StorageUnavailable."""
    name = checked_name(name)
    record = await table.revoke_key(name)
    if record is None:
        raise NotFound(f"no key named {name!r}")
    return record


# -- the cache ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Cached:
    record: KeyRecord
    grant: Grant
    digest: bytes


class KeyStore:
    """Every instance's copy of the key table (see the module docstring), and the admin operations.

    :meth:`find` and :meth:`named` read the copy only: no database, no await.
    """

    def __init__(self, table: KeyTable, *, env_names: Collection[str] = ()) -> None:
        self.table = table
        self._env_names = frozenset(env_names)  # the names of API_KEYS
        self._rows: list[KeyRecord] | None = None  # the last read of the table
        self._by_digest: dict[bytes, _Cached] = {}
        self._by_name: dict[str, _Cached] = {}
        self._warned: set[str] = set()  # names in API_KEYS too, warned about
        self._reads = 0  # reads of the table started
        self._applied = 0  # the number of the read the copy holds (a later one wins)
        self.failures = 0  # reads of the refresh that failed in a row (the first is logged)

    @property
    def enabled(self) -> bool:
        """True when the table holds any key (revoked ones count: see the module docstring)."""
        return bool(self._by_name)

    def find(self, presented: str) -> tuple[KeyRecord, Grant] | None:
        """The stored key whose secret is ``presented`` (whatever its status), or None."""
        digest = secret_digest(presented)
        cached = self._by_digest.get(digest)
        if cached is None or not hmac.compare_digest(cached.digest, digest):
            return None
        return cached.record, cached.grant

    def named(self, name: str) -> tuple[KeyRecord, Grant] | None:
        """The stored key of that name (whatever its status), or None."""
        cached = self._by_name.get(name)
        return (cached.record, cached.grant) if cached is not None else None

    def usable(self, record: KeyRecord, grant: Grant, now: float | None = None) -> Grant:
        """``grant`` if its key works now, else Unauthenticated saying why (to its holder only)."""
        status = key_status(record, time.time() if now is None else now)
        if status == ACTIVE:
            return grant
        raise Unauthenticated(f"the API key is {status}")

    async def load(self) -> None:
        """Read the table into the copy. Raises StorageUnavailable (the copy stays as it was).

        Of two reads under way at once (the refresh's, and one after a change), the one
        that started last is the one kept, whichever ends first: it saw the newer table.
        """
        self._reads += 1
        number = self._reads
        rows = await self.table.keys()
        if number < self._applied:
            return
        self._applied = number
        if rows == self._rows:
            return
        cached = [_Cached(row, grant_of(row), bytes.fromhex(row.secret_sha256)) for row in rows]
        self._by_name = {entry.record.name: entry for entry in cached}
        self._by_digest = {entry.digest: entry for entry in cached}
        self._rows = rows
        for name in sorted((self._by_name.keys() & self._env_names) - self._warned):
            self._warned.add(name)
            log.warning(
                "the key name %r is in API_KEYS and in the key table: both secrets work, "
                "as the same owner, each with its own limits",
                name,
            )

    async def refresh_forever(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Read the table now (raising StorageUnavailable), report started, then read it again
        every REFRESH_SECONDS until cancelled.

        A failed read keeps the copy as it was; the first failure of a run of them
        is logged (and the recovery), not every one. Cancellation ends the loop at
        once (a read in progress finishes in its worker thread).
        """
        await self.load()
        task_status.started()
        while True:
            await trio.sleep(REFRESH_SECONDS)
            try:
                await self.load()
            except StorageUnavailable as exc:
                if not self.failures:
                    log.warning(
                        "cannot read the key table (the last read stays in force): %s", exc.message
                    )
                self.failures += 1
                continue
            except Exception:
                if not self.failures:
                    log.exception("reading the key table failed (the last read stays in force)")
                self.failures += 1
                continue
            if self.failures:
                log.info("the key table can be read again")
                self.failures = 0

    # the admin API's operations: each writes, then reads the table again at once

    async def records(self) -> list[KeyRecord]:
        """Every key as the table holds it now (not the copy). Raises StorageUnavailable."""
        return await self.table.keys()

    async def create(self, name: object, fields: Mapping[str, object]) -> tuple[str, KeyRecord]:
        """:func:`create_key`, names of API_KEYS reserved; the copy is read again."""
        made = await create_key(self.table, name, fields, reserved=self._env_names)
        await self._reload()
        return made

    async def update(self, name: object, fields: Mapping[str, object]) -> KeyRecord:
        record = await update_key(self.table, name, fields)
        await self._reload()
        return record

    async def revoke(self, name: object) -> KeyRecord:
        record = await revoke_key(self.table, name)
        await self._reload()
        return record

    async def _reload(self) -> None:
        """Read the table after a change; a failure is left to the next refresh (the change is made)."""
        try:
            await self.load()
        except StorageUnavailable:
            pass
