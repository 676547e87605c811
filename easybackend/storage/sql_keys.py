"""The statements of the stored backend keys (table ``api_keys``, see :mod:`.schema`).

Written like :mod:`.sql`: each function runs inside a transaction its store
opened, with ``?`` placeholders a :class:`~.sql.Dialect` turns into its own,
and raises the driver's errors (the store turns them into
StorageUnavailable). Only the SHA-256 of a secret is ever written or read;
what the keys mean (status, validation, the cache) is
:mod:`easybackend.governance.keys`'.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from .sql import Connection, Dialect


@dataclasses.dataclass(frozen=True, slots=True)
class KeyRecord:
    """One stored key: its name, the digest of its secret, its times, its flags and limits."""

    name: str
    secret_sha256: str  # hex; the secret itself is never stored
    created_at: float
    updated_at: float
    expires_at: float | None = None  # epoch seconds from which it no longer works
    revoked_at: float | None = None
    disabled: bool = False
    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens per minute
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    models: tuple[str, ...] | None = None  # None: every model of MODELS


# The columns a change may set (key_changes' keys), in the table's order.
CHANGEABLE = (
    "expires_at",
    "disabled",
    "rpm",
    "tpm",
    "tokens_per_day",
    "tokens_per_month",
    "models",
)
_FIELDS = tuple(field.name for field in dataclasses.fields(KeyRecord))
COLUMNS = ", ".join(_FIELDS)
_SELECT = f"SELECT {COLUMNS} FROM api_keys"


def _values(record: KeyRecord) -> list[Any]:
    """The row of ``record``, in COLUMNS' order (the flag as 0/1, the models as JSON)."""
    row = dataclasses.asdict(record)
    row["disabled"] = int(record.disabled)
    row["models"] = _models_text(record.models)
    return list(row.values())


def _models_text(models: Sequence[str] | None) -> str | None:
    return json.dumps(list(models)) if models is not None else None


def _record(row: Sequence[Any]) -> KeyRecord:
    values = dict(zip(_FIELDS, row, strict=True))
    values["disabled"] = bool(values["disabled"])
    models = values["models"]
    values["models"] = tuple(json.loads(models)) if models is not None else None
    return KeyRecord(**values)


def all_keys(dialect: Dialect, db: Connection) -> list[KeyRecord]:
    """Every stored key, revoked ones too, by name."""
    return [_record(row) for row in dialect.execute(db, _SELECT + " ORDER BY name")]


def find_key(dialect: Dialect, db: Connection, name: str) -> KeyRecord | None:
    row = dialect.execute(db, _SELECT + " WHERE name = ?", (name,)).fetchone()
    return _record(row) if row is not None else None


def insert_key(dialect: Dialect, db: Connection, record: KeyRecord) -> bool:
    """Store a new key; False (nothing written) when a key of that name exists, revoked or not."""
    placeholders = ", ".join("?" * len(_FIELDS))
    cursor = dialect.execute(
        db,
        f"INSERT INTO api_keys ({COLUMNS}) VALUES ({placeholders}) ON CONFLICT DO NOTHING",
        _values(record),
    )
    return cursor.rowcount == 1


def update_key(
    dialect: Dialect, db: Connection, name: str, changes: Mapping[str, Any], now: float
) -> KeyRecord | None:
    """Apply ``changes`` (columns of CHANGEABLE → values) unless the key is revoked; the key after.

    None when there is no such key; a revoked key is returned unchanged.
    """
    unknown = set(changes) - set(CHANGEABLE)
    if unknown:
        raise ValueError(f"not changeable: {sorted(unknown)}")
    assignments = ["updated_at = ?"]
    values: list[Any] = [now]
    for column in CHANGEABLE:
        if column in changes:
            value = changes[column]
            if column == "disabled":
                value = int(bool(value))
            elif column == "models":
                value = _models_text(value)
            assignments.append(f"{column} = ?")
            values.append(value)
    dialect.execute(
        db,
        f"UPDATE api_keys SET {', '.join(assignments)} WHERE name = ? AND revoked_at IS NULL",
        [*values, name],
    )
    return find_key(dialect, db, name)


def revoke_key(dialect: Dialect, db: Connection, name: str, now: float) -> KeyRecord | None:
    """Revoke the key for good (a revoked one stays as it was); the key after, or None."""
    dialect.execute(
        db,
        "UPDATE api_keys SET revoked_at = ?, updated_at = ? WHERE name = ? AND revoked_at IS NULL",
        (now, now, name),
    )
    return find_key(dialect, db, name)
