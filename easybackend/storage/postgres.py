"""PostgreSQL storage: several EasyBackend instances share conversations.

psycopg 3's blocking API runs in worker threads (``trio.to_thread``), one
per pooled connection at most, so the event loop never waits on the
database. Migrations run at start-up inside a transaction holding an
advisory lock, so instances starting together apply them once.

Ordering across instances: :meth:`PostgresStorage.conversation_lock` takes a
PostgreSQL advisory lock on the conversation for the whole ask (reading the
context, the answer, storing the turn), on a pooled connection held for that
time. Asks on one conversation are therefore answered one at a time however
many instances serve them, each seeing the turn before it; an instance that
dies releases its locks with its connections. The cost: one database
connection per answer in progress (``PG_POOL_SIZE`` bounds them; asks beyond
wait for a connection), and waiting instances poll the lock every
:data:`LOCK_POLL` seconds, so the order between instances is by polling,
not strictly by arrival (within one instance it is strict).

Failures (server down, pool exhausted for ``PG_POOL_TIMEOUT``) raise
StorageUnavailable; the pool reconnects by itself once the server is back.

The statements and tables are the shared ones (:mod:`easybackend.storage.sql`,
:mod:`easybackend.storage.schema`); this module holds the pool, the
transactions, the locks, the migrations and PostgreSQL's dialect: ``%s``
placeholders, an upsert that locks and returns the conversation row,
``RETURNING pk``, ``COPY`` for bulk turns and a server-side cursor for the
context, so only the tail that is sent is read.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import psycopg
import psycopg_pool
import trio

from ..errors import StorageUnavailable
from . import schema, sql
from .base import ConversationRef, TurnRecord
from .sql_store import Access, SQLStore

T = TypeVar("T")

log = logging.getLogger("easybackend.storage")

SPARE_CONNECTIONS = 4  # pooled connections beyond PG_POOL_SIZE, kept for work outside asks
LOCK_POLL = 0.02  # seconds between two tries of a conversation's advisory lock
MIGRATION_LOCK = 0x45617379_4D696772  # advisory lock key held while migrating

MIGRATIONS: list[str] = [
    schema.CONVERSATIONS.format(**schema.POSTGRES_TYPES)
    + schema.TURNS.format(**schema.POSTGRES_TYPES)
    + "\n    CREATE INDEX conversations_by_activity ON conversations (owner, updated_at DESC, pk DESC);"
    + schema.LEGACY_IMPORTS,
    schema.TREE.format(**schema.POSTGRES_TYPES),
    schema.API_KEYS.format(**schema.POSTGRES_TYPES),
    schema.MEMORY.format(**schema.POSTGRES_TYPES) + schema.MEMORY_POSTGRES_SEARCH,
    schema.USAGE.format(**schema.POSTGRES_TYPES)
    + schema.USAGE_BACKFILL.format(day=schema.USAGE_POSTGRES_DAY),
    schema.RESUME.format(**schema.POSTGRES_TYPES),
    schema.ELSEWHERE,
]


class PostgresDialect(sql.Dialect):
    """PostgreSQL's spelling of the shared statements."""

    name = "postgresql"
    placeholder = "%s"
    greatest = "greatest"
    for_update = " FOR UPDATE"

    def executemany(self, db: Any, query: str, rows: Iterable[Sequence[Any]]) -> None:
        with db.cursor() as cursor:
            cursor.executemany(self.text(query), rows)

    @contextlib.contextmanager
    def streamed(self, db: Any, query: str, params: Sequence[Any]) -> Iterator[Iterable[Any]]:
        with db.cursor(name="context") as cursor:  # server-side: only what is iterated is read
            cursor.itersize = 64
            cursor.execute(self.text(query), params)
            yield cursor

    def after(self, updated_at: float, pk: int) -> tuple[str, list[Any]]:
        return " AND (updated_at, pk) < (?, ?)", [updated_at, pk]

    def conversation_for_append(
        self, db: Any, ref: ConversationRef, created_at: float, updated_at: float
    ) -> tuple[int, int]:
        """One statement, which also locks the conversation row until the transaction ends."""
        return self.execute(
            db,
            "INSERT INTO conversations (owner, conversation_id, created_at, updated_at)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (owner, conversation_id)"
            " DO UPDATE SET last_seq = conversations.last_seq"
            " RETURNING pk, last_seq + 1",
            (ref.owner, ref.conversation_id, created_at, updated_at),
        ).fetchone()

    def insert_returning_pk(self, db: Any, query: str, params: Sequence[Any]) -> int:
        (pk,) = db.execute(self.text(query) + " RETURNING pk", params).fetchone()
        return pk

    def insert_turns(self, db: Any, pk: int, turns: Sequence[TurnRecord]) -> None:
        with db.cursor() as cursor:
            with cursor.copy(
                f"COPY turns (conversation_pk, {sql.TURN_COLUMNS}) FROM STDIN"
            ) as copy:
                for turn in turns:
                    copy.write_row((pk, *sql.record_values(turn)))


class PostgresStorage(SQLStore):
    """The shared store (see :class:`easybackend.storage.base.Storage` and the module docstring)."""

    dialect = PostgresDialect()

    def __init__(self, pool: psycopg_pool.ConnectionPool, pool_size: int) -> None:
        super().__init__()
        self._pool = pool
        # Asks hold a connection each (the one with the conversation's lock); they take turns
        # for the PG_POOL_SIZE slots in arrival order, while SPARE_CONNECTIONS stay free for
        # everything else (listing, readiness, management).
        self._ask_slots = trio.Semaphore(pool_size)
        self._limiter = trio.CapacityLimiter(pool_size + SPARE_CONNECTIONS)
        # The connection holding the current task's conversation lock, if any: the ask's own
        # storage calls run on it, so an ask never needs a second connection.
        self._locked: contextvars.ContextVar[psycopg.Connection | None] = contextvars.ContextVar(
            f"easybackend_pg_locked_{id(self)}", default=None
        )

    @classmethod
    async def open(
        cls, url: str, *, pool_size: int = 20, pool_timeout: float = 5.0
    ) -> PostgresStorage:
        """Connect, migrate under the migration lock, and return the store; raises StorageUnavailable."""

        def connect() -> psycopg_pool.ConnectionPool:
            pool = psycopg_pool.ConnectionPool(
                url,
                min_size=1,
                max_size=pool_size + SPARE_CONNECTIONS,
                timeout=pool_timeout,
                open=False,
                check=psycopg_pool.ConnectionPool.check_connection,
                kwargs={"connect_timeout": max(1, int(pool_timeout))},
            )
            try:
                pool.open(wait=True, timeout=pool_timeout)
                with pool.connection() as connection:
                    _migrate(connection)
            except BaseException:
                pool.close()
                raise
            return pool

        try:
            pool = await trio.to_thread.run_sync(connect)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise StorageUnavailable(
                f"cannot use the PostgreSQL database: {_reason(exc)}"
            ) from None
        return cls(pool, pool_size)

    async def _transaction(self, work: Callable[[psycopg.Connection], T], access: Access) -> T:
        """Run ``work`` in one transaction, in a worker thread (REPEATABLE READ for a snapshot).

        Inside :meth:`conversation_lock` the transaction runs on the connection
        holding the lock; elsewhere on a pooled connection.
        """
        locked = self._locked.get()

        def in_transaction() -> T:
            if locked is not None:
                return _in_transaction(locked, work, access)
            with self._pool.connection() as connection:
                return _in_transaction(connection, work, access)

        try:
            return await trio.to_thread.run_sync(in_transaction, limiter=self._limiter)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise StorageUnavailable(f"conversation storage failed: {_reason(exc)}") from None

    async def _probe(self, work: Callable[[psycopg.Connection], T], access: Access) -> T:
        """A transaction on a pooled connection, in a worker thread left behind on cancellation.

        So a readiness check returns at once when its deadline passes (the thread finishes
        on its own). Raises StorageUnavailable.
        """

        def run() -> T:
            with self._pool.connection() as connection:
                return _in_transaction(connection, work, access)

        try:
            return await trio.to_thread.run_sync(run, abandon_on_cancel=True)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise StorageUnavailable(f"conversation storage failed: {_reason(exc)}") from None

    @contextlib.asynccontextmanager
    async def conversation_lock(self, ref: ConversationRef) -> AsyncIterator[None]:
        """Hold the conversation's advisory lock (see the module docstring). Cancellable while waiting."""
        key = _lock_key(ref)

        def take_connection() -> psycopg.Connection:
            connection = self._pool.getconn()
            connection.autocommit = True
            return connection

        def try_lock(connection: psycopg.Connection) -> bool:
            return bool(connection.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0])

        def release(connection: psycopg.Connection, locked: bool) -> None:
            try:
                if locked:
                    connection.execute("SELECT pg_advisory_unlock(%s)", (key,))
                connection.autocommit = False
            except psycopg.Error:
                pass  # a broken connection: the pool discards it, the server dropped the lock
            finally:
                self._pool.putconn(connection)

        async with self._ask_slots:
            try:
                connection = await trio.to_thread.run_sync(take_connection, limiter=self._limiter)
            except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
                raise StorageUnavailable(f"conversation storage failed: {_reason(exc)}") from None
            locked = False
            token = None
            try:
                while not locked:
                    try:
                        locked = await trio.to_thread.run_sync(try_lock, connection)
                    except psycopg.Error as exc:
                        raise StorageUnavailable(
                            f"conversation storage failed: {_reason(exc)}"
                        ) from None
                    if not locked:
                        await trio.sleep(LOCK_POLL)
                token = self._locked.set(connection)
                yield
            finally:
                if token is not None:
                    self._locked.reset(token)
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(release, connection, locked)

    async def close(self) -> None:
        await trio.to_thread.run_sync(self._pool.close)


def _in_transaction(
    connection: psycopg.Connection, work: Callable[[psycopg.Connection], T], access: Access
) -> T:
    with connection.transaction():
        if access is Access.SNAPSHOT:
            connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        return work(connection)


def _migrate(connection: psycopg.Connection) -> None:
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        connection.execute(
            "CREATE TABLE IF NOT EXISTS easybackend_schema (version INTEGER NOT NULL)"
        )
        row = connection.execute("SELECT version FROM easybackend_schema").fetchone()
        if row is None:
            connection.execute("INSERT INTO easybackend_schema VALUES (0)")
        version = row[0] if row else 0
        if version > len(MIGRATIONS):
            raise psycopg.DatabaseError(
                f"schema version {version} is newer than this EasyBackend understands"
            )
        for number in range(version, len(MIGRATIONS)):
            connection.execute(MIGRATIONS[number])
            connection.execute("UPDATE easybackend_schema SET version = %s", (number + 1,))
        if version >= len(MIGRATIONS):  # an extension installed since is used from now on
            connection.execute(schema.POSTGRES_SEARCH_INDEXES)
        trigrams = connection.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'")
        if trigrams.fetchone() is None:
            log.warning(
                "PostgreSQL's pg_trgm extension is not installed and this user may not create"
                " it: search (GET /conversations?q=) reads every turn. To index it, run"
                " CREATE EXTENSION pg_trgm; as a superuser, then restart"
            )


def _lock_key(ref: ConversationRef) -> int:
    """A signed 64-bit advisory lock key for the conversation."""
    digest = hashlib.sha256(f"{ref.owner}\x00{ref.conversation_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _reason(exc: BaseException) -> str:
    """A one-line reason that never includes the connection string (it may hold a password)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]
