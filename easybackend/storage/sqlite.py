"""SQLite storage: one database file in WAL mode, schema migrations at open.

All blocking sqlite3 work runs in a worker thread (``trio.to_thread``), one
call at a time on a single connection. A call is not abandoned when the
calling task is cancelled: its transaction finishes first, so a turn is
always either fully stored or absent, also after ``kill -9`` (SQLite's
journal rolls back an unfinished transaction on the next open).

The statements are the shared ones (:mod:`easybackend.storage.sql`, whose
default spelling is SQLite's) and so are the tables
(:mod:`easybackend.storage.schema`); this module holds the connection, the
transactions (``BEGIN IMMEDIATE`` for writes: the write lock first, so a
transaction never has to upgrade; plain reads in autocommit mode) and the
migrations.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

import trio

from ..errors import StorageUnavailable
from . import schema, sql
from .base import ConversationRef
from .sql_store import Access, SQLStore

T = TypeVar("T")

# Each entry moves the schema from version i to i + 1 (PRAGMA user_version).
MIGRATIONS: list[str] = [
    schema.CONVERSATIONS.format(**schema.SQLITE_TYPES)
    + schema.TURNS.format(**schema.SQLITE_TYPES)
    + "\n    CREATE INDEX conversations_by_activity ON conversations (owner, updated_at DESC);",
    schema.LEGACY_IMPORTS,
    schema.TREE.format(**schema.SQLITE_TYPES),
    schema.API_KEYS.format(**schema.SQLITE_TYPES),
    schema.MEMORY.format(**schema.SQLITE_TYPES) + schema.MEMORY_SQLITE_SEARCH,
    schema.USAGE.format(**schema.SQLITE_TYPES)
    + schema.USAGE_BACKFILL.format(day=schema.USAGE_SQLITE_DAY),
    schema.RESUME.format(**schema.SQLITE_TYPES),
    schema.ELSEWHERE,
]


class SQLiteDialect(sql.Dialect):
    """SQLite is the layer's default spelling; only the readiness read differs."""

    alive_query = "SELECT count(*) FROM conversations WHERE pk = 0"  # reads the file itself


_BEGIN = {Access.SNAPSHOT: "BEGIN", Access.WRITE: "BEGIN IMMEDIATE"}


class SQLiteStorage(SQLStore):
    """The embedded default store (see :class:`easybackend.storage.base.Storage`)."""

    dialect = SQLiteDialect()

    def __init__(self, connection: sqlite3.Connection) -> None:
        super().__init__()
        self._db = connection
        self._limiter = trio.CapacityLimiter(1)

    @classmethod
    async def open(cls, path: Path) -> SQLiteStorage:
        """Open (creating if needed) the database at ``path`` and migrate it to the current schema."""
        return cls(await trio.to_thread.run_sync(_connect, path))

    async def _transaction(self, work: Callable[[sqlite3.Connection], T], access: Access) -> T:
        """``work`` on the one connection, in the worker thread; a plain read in autocommit mode.

        Not abandoned on cancellation (the transaction finishes first).
        """

        def run(db: sqlite3.Connection) -> T:
            begin = _BEGIN.get(access)
            if begin is None:
                return work(db)
            with db:  # commits, or rolls back on any exception
                db.execute(begin)
                return work(db)

        return await self._in_thread(run)

    async def _in_thread(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return await trio.to_thread.run_sync(work, self._db, limiter=self._limiter)
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"conversation storage failed: {exc}") from exc

    @contextlib.asynccontextmanager
    async def conversation_lock(self, ref: ConversationRef) -> AsyncIterator[None]:
        """Nothing to do: one process owns the database file (the in-process lock suffices)."""
        yield

    async def close(self) -> None:
        await self._in_thread(lambda db: db.close())


def _connect(path: Path) -> sqlite3.Connection:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(
            "PRAGMA synchronous = NORMAL"
        )  # WAL + NORMAL: durable across crashes of the process
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("PRAGMA busy_timeout = 5000")
        _migrate(db)
    except (sqlite3.Error, OSError) as exc:
        raise StorageUnavailable(f"cannot open the SQLite database {str(path)!r}: {exc}") from exc
    return db


def _migrate(db: sqlite3.Connection) -> None:
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version > len(MIGRATIONS):
        raise sqlite3.DatabaseError(
            f"schema version {version} is newer than this EasyBackend understands"
        )
    for number in range(version, len(MIGRATIONS)):
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(MIGRATIONS[number]):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {number + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


def _statements(script: str) -> list[str]:
    """The statements of a migration, each whole (a trigger's body holds semicolons of its own)."""
    statements, statement = [], ""
    for part in script.split(";"):
        statement += part + ";"
        if sqlite3.complete_statement(statement):
            if statement.strip(" \n;"):
                statements.append(statement)
            statement = ""
    if statement.strip(" \n;"):
        statements.append(statement)
    return statements
