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
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import psycopg
import psycopg_pool
import trio

from ..errors import StorageUnavailable
from .base import (
    PROBE_ROW,
    Context,
    ConversationDetail,
    ConversationExport,
    ConversationRef,
    ConversationSummary,
    NewTurn,
    StoredTurn,
    TurnRecord,
    WriteHealth,
    newest_that_fit,
)
from .sqlite import decode_cursor, encode_cursor

T = TypeVar("T")

SPARE_CONNECTIONS = 4  # pooled connections beyond PG_POOL_SIZE, kept for work outside asks
LOCK_POLL = 0.02  # seconds between two tries of a conversation's advisory lock
MIGRATION_LOCK = 0x45617379_4D696772  # advisory lock key held while migrating
EXPORT_BATCH = 100  # conversations read per transaction by export_all

MIGRATIONS: list[str] = [
    """
    CREATE TABLE conversations (
        pk BIGSERIAL PRIMARY KEY,
        owner TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        system_prompt TEXT,
        system_tokens INTEGER,
        turn_count INTEGER NOT NULL DEFAULT 0,
        prompt_tokens BIGINT NOT NULL DEFAULT 0,
        completion_tokens BIGINT NOT NULL DEFAULT 0,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        UNIQUE (owner, conversation_id)
    );
    CREATE TABLE turns (
        conversation_pk BIGINT NOT NULL REFERENCES conversations (pk) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        prompt TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        answer TEXT NOT NULL,
        answer_tokens INTEGER NOT NULL,
        model TEXT NOT NULL,
        finish_reason TEXT NOT NULL,
        usage_prompt_tokens INTEGER NOT NULL,
        usage_completion_tokens INTEGER NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        finished_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (conversation_pk, seq)
    );
    CREATE INDEX conversations_by_activity ON conversations (owner, updated_at DESC, pk DESC);
    CREATE TABLE legacy_imports (
        owner TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        source TEXT NOT NULL,
        entries INTEGER NOT NULL,
        PRIMARY KEY (owner, conversation_id, source)
    );
    """,
]

_SUMMARY_COLUMNS = (
    "conversation_id, system_prompt, turn_count, prompt_tokens, completion_tokens,"
    " created_at, updated_at"
)


class PostgresStorage:
    """The shared store (see :class:`easybackend.storage.base.Storage` and the module docstring)."""

    def __init__(self, pool: psycopg_pool.ConnectionPool, pool_size: int) -> None:
        self._pool = pool
        # Asks hold a connection each (the one with the conversation's lock); they take turns
        # for the PG_POOL_SIZE slots in arrival order, while SPARE_CONNECTIONS stay free for
        # everything else (listing, readiness, management).
        self._ask_slots = trio.Semaphore(pool_size)
        self._writes = WriteHealth()
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

    async def _run(self, work: Callable[[psycopg.Connection], T]) -> T:
        """Run ``work`` in one transaction, in a worker thread.

        Inside :meth:`conversation_lock` the transaction runs on the connection
        holding the lock; elsewhere on a pooled connection.
        """
        locked = self._locked.get()

        def in_transaction() -> T:
            if locked is not None:
                with locked.transaction():
                    return work(locked)
            with self._pool.connection() as connection, connection.transaction():
                return work(connection)

        try:
            return await trio.to_thread.run_sync(in_transaction, limiter=self._limiter)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise StorageUnavailable(f"conversation storage failed: {_reason(exc)}") from None

    async def _write(self, work: Callable[[psycopg.Connection], T]) -> T:
        """:meth:`_run` for a call that writes: its outcome is what readiness reports."""
        return await self._writes.record(self._run(work))

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

    async def ping(self) -> None:
        """A trivial query; while the last write failed, a write (see WriteHealth).

        On cancellation it returns at once (the thread finishes on its own).
        """
        if self._writes.failure is None:
            await self._abandoned_on_cancel(lambda c: c.execute("SELECT 1").fetchone())
            return
        try:
            await self._writes.record(self._abandoned_on_cancel(_probe_write))
        except StorageUnavailable as exc:
            raise self._writes.unready(exc) from None

    async def _abandoned_on_cancel(self, work: Callable[[psycopg.Connection], object]) -> None:
        """``work`` on a pooled connection, in a worker thread left behind on cancellation.

        Raises StorageUnavailable.
        """

        def run() -> None:
            with self._pool.connection() as connection:
                work(connection)

        try:
            await trio.to_thread.run_sync(run, abandon_on_cancel=True)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise StorageUnavailable(f"conversation storage failed: {_reason(exc)}") from None

    async def load_context(
        self,
        ref: ConversationRef,
        history_budget: Callable[[str | None, int | None], int],
        cost: Callable[[StoredTurn], int],
    ) -> Context:
        def work(connection: psycopg.Connection) -> Context:
            row = connection.execute(
                "SELECT pk, system_prompt, system_tokens, turn_count FROM conversations"
                " WHERE owner = %s AND conversation_id = %s",
                (ref.owner, ref.conversation_id),
            ).fetchone()
            pk, system_prompt, system_tokens, turn_count = row or (None, None, None, 0)
            budget = history_budget(system_prompt, system_tokens)
            turns: list[StoredTurn] = []
            if turn_count:
                cursor = connection.cursor(name="context")  # server-side: only the tail is read
                cursor.itersize = 64
                cursor.execute(
                    "SELECT seq, prompt, prompt_tokens, answer, answer_tokens FROM turns"
                    " WHERE conversation_pk = %s ORDER BY seq DESC",
                    (pk,),
                )
                turns = newest_that_fit(cursor, budget, cost)
                cursor.close()
            return Context(system_prompt, system_tokens, turns, turn_count)

        return await self._run(work)

    async def append_turn(self, ref: ConversationRef, turn: NewTurn) -> int:
        return await self._write(lambda connection: _append(connection, ref, turn))

    async def list_conversations(
        self, owner: str, limit: int, after: str | None
    ) -> list[ConversationSummary]:
        position = decode_cursor(after) if after else None

        def work(connection: psycopg.Connection) -> list[ConversationSummary]:
            query = f"SELECT {_SUMMARY_COLUMNS}, pk FROM conversations WHERE owner = %s"
            args: list[Any] = [owner]
            if position is not None:
                query += " AND (updated_at, pk) < (%s, %s)"
                args += [position[0], position[1]]
            query += " ORDER BY updated_at DESC, pk DESC LIMIT %s"
            rows = connection.execute(query, [*args, limit]).fetchall()
            return [
                ConversationSummary(*row[:-1], cursor=encode_cursor(row[6], row[-1]))
                for row in rows
            ]

        return await self._run(work)

    async def get_conversation(self, ref: ConversationRef) -> ConversationDetail | None:
        def work(connection: psycopg.Connection) -> ConversationDetail | None:
            row = connection.execute(
                f"SELECT {_SUMMARY_COLUMNS}, pk FROM conversations"
                " WHERE owner = %s AND conversation_id = %s",
                (ref.owner, ref.conversation_id),
            ).fetchone()
            if row is None:
                return None
            turns = connection.execute(
                "SELECT seq, prompt, prompt_tokens, answer, answer_tokens, model, finish_reason,"
                " usage_prompt_tokens, usage_completion_tokens, created_at, finished_at"
                " FROM turns WHERE conversation_pk = %s ORDER BY seq",
                (row[-1],),
            ).fetchall()
            summary = ConversationSummary(*row[:-1], cursor=encode_cursor(row[6], row[-1]))
            return ConversationDetail(summary, [TurnRecord(*turn) for turn in turns])

        return await self._run(work)

    async def delete_conversation(self, ref: ConversationRef) -> bool:
        def work(connection: psycopg.Connection) -> bool:
            deleted = connection.execute(
                "DELETE FROM conversations WHERE owner = %s AND conversation_id = %s",
                (ref.owner, ref.conversation_id),
            ).rowcount
            connection.execute(
                "DELETE FROM legacy_imports WHERE owner = %s AND conversation_id = %s",
                (ref.owner, ref.conversation_id),
            )
            return deleted > 0

        return await self._write(work)

    async def rollback(self, ref: ConversationRef, turns: int) -> tuple[int, int] | None:
        def work(connection: psycopg.Connection) -> tuple[int, int] | None:
            row = connection.execute(
                "SELECT pk, turn_count FROM conversations"
                " WHERE owner = %s AND conversation_id = %s FOR UPDATE",
                (ref.owner, ref.conversation_id),
            ).fetchone()
            if row is None:
                return None
            pk, count = row
            keep = max(count - turns, 0)
            connection.execute(
                "DELETE FROM turns WHERE conversation_pk = %s AND seq > %s", (pk, keep)
            )
            connection.execute(
                "UPDATE conversations SET turn_count = %s, updated_at = %s WHERE pk = %s",
                (keep, time.time(), pk),
            )
            return count - keep, keep

        return await self._write(work)

    async def set_system_prompt(
        self, ref: ConversationRef, prompt: str | None, tokens: int | None
    ) -> None:
        def work(connection: psycopg.Connection) -> None:
            now = time.time()
            connection.execute(
                "INSERT INTO conversations (owner, conversation_id, system_prompt, system_tokens,"
                " created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (owner, conversation_id) DO UPDATE SET"
                " system_prompt = excluded.system_prompt, system_tokens = excluded.system_tokens,"
                " updated_at = excluded.updated_at",
                (ref.owner, ref.conversation_id, prompt, tokens, now, now),
            )

        await self._write(work)

    async def import_turns(self, ref: ConversationRef, source: str, turns: list[NewTurn]) -> int:
        def work(connection: psycopg.Connection) -> int:
            row = connection.execute(
                "SELECT entries FROM legacy_imports"
                " WHERE owner = %s AND conversation_id = %s AND source = %s FOR UPDATE",
                (ref.owner, ref.conversation_id, source),
            ).fetchone()
            done = row[0] if row else 0
            for turn in turns[done:]:
                _append(connection, ref, turn)
            connection.execute(
                "INSERT INTO legacy_imports VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (owner, conversation_id, source) DO UPDATE SET entries = excluded.entries",
                (ref.owner, ref.conversation_id, source, max(done, len(turns))),
            )
            return max(len(turns) - done, 0)

        return await self._write(work)

    async def totals(self) -> tuple[int, int]:
        def work(connection: psycopg.Connection) -> tuple[int, int]:
            connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            (conversations,) = connection.execute("SELECT count(*) FROM conversations").fetchone()
            (turns,) = connection.execute("SELECT count(*) FROM turns").fetchone()
            return conversations, turns

        return await self._run(work)

    async def export_all(self) -> AsyncGenerator[ConversationExport, None]:
        after = 0
        while True:
            batch, after = await self._run(functools.partial(_export_batch, after=after))
            for conversation in batch:
                yield conversation
            if len(batch) < EXPORT_BATCH:
                return

    async def import_conversations(self, conversations: Sequence[ConversationExport]) -> None:
        def work(connection: psycopg.Connection) -> None:
            for conversation in conversations:
                _import(connection, conversation)

        await self._write(work)

    async def close(self) -> None:
        await trio.to_thread.run_sync(self._pool.close)


def _append(connection: psycopg.Connection, ref: ConversationRef, turn: NewTurn) -> int:
    """Append ``turn`` inside the caller's transaction (the conversation row locked); returns its seq."""
    pk, seq = connection.execute(
        "INSERT INTO conversations (owner, conversation_id, created_at, updated_at)"
        " VALUES (%s, %s, %s, %s) ON CONFLICT (owner, conversation_id)"
        " DO UPDATE SET turn_count = conversations.turn_count"
        " RETURNING pk, turn_count + 1",
        (ref.owner, ref.conversation_id, turn.created_at, turn.finished_at),
    ).fetchone()
    connection.execute(
        "INSERT INTO turns VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            pk,
            seq,
            turn.prompt,
            turn.prompt_tokens,
            turn.answer,
            turn.answer_tokens,
            turn.model,
            turn.finish_reason,
            turn.usage_prompt_tokens,
            turn.usage_completion_tokens,
            turn.created_at,
            turn.finished_at,
        ),
    )
    connection.execute(
        "UPDATE conversations SET turn_count = %s, updated_at = greatest(updated_at, %s),"
        " prompt_tokens = prompt_tokens + %s, completion_tokens = completion_tokens + %s"
        " WHERE pk = %s",
        (seq, turn.finished_at, turn.usage_prompt_tokens, turn.usage_completion_tokens, pk),
    )
    return seq


_EXPORT_COLUMNS = (
    "owner, conversation_id, system_prompt, system_tokens, turn_count, prompt_tokens,"
    " completion_tokens, created_at, updated_at"
)
_TURN_COLUMNS = (
    "seq, prompt, prompt_tokens, answer, answer_tokens, model, finish_reason,"
    " usage_prompt_tokens, usage_completion_tokens, created_at, finished_at"
)


def _export_batch(
    connection: psycopg.Connection, after: int
) -> tuple[list[ConversationExport], int]:
    """The next EXPORT_BATCH conversations with pk above ``after``, whole, and the last pk read.

    Runs inside the caller's transaction, made REPEATABLE READ: one snapshot for the batch.
    """
    connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    rows = connection.execute(
        f"SELECT pk, {_EXPORT_COLUMNS} FROM conversations WHERE pk > %s ORDER BY pk LIMIT %s",
        (after, EXPORT_BATCH),
    ).fetchall()
    if not rows:
        return [], after
    pks = [row[0] for row in rows]
    turns: dict[int, list[TurnRecord]] = {pk: [] for pk in pks}
    for pk, *turn in connection.execute(
        f"SELECT conversation_pk, {_TURN_COLUMNS} FROM turns"
        " WHERE conversation_pk = ANY(%s) ORDER BY conversation_pk, seq",
        (pks,),
    ):
        turns[pk].append(TurnRecord(*turn))
    legacy: dict[int, dict[str, int]] = {pk: {} for pk in pks}
    for pk, source, entries in connection.execute(
        "SELECT c.pk, l.source, l.entries FROM legacy_imports l JOIN conversations c"
        " ON c.owner = l.owner AND c.conversation_id = l.conversation_id"
        " WHERE c.pk = ANY(%s)",
        (pks,),
    ):
        legacy[pk][source] = entries
    batch = [
        ConversationExport(ConversationRef(owner, cid), *values, turns[pk], legacy[pk])
        for pk, owner, cid, *values in rows
    ]
    return batch, pks[-1]


def _import(connection: psycopg.Connection, conversation: ConversationExport) -> None:
    """Write one exported conversation inside the caller's transaction, replacing any namesake."""
    ref = conversation.ref
    key = (ref.owner, ref.conversation_id)
    connection.execute("DELETE FROM conversations WHERE owner = %s AND conversation_id = %s", key)
    connection.execute("DELETE FROM legacy_imports WHERE owner = %s AND conversation_id = %s", key)
    (pk,) = connection.execute(
        f"INSERT INTO conversations ({_EXPORT_COLUMNS})"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING pk",
        (
            *key,
            conversation.system_prompt,
            conversation.system_tokens,
            conversation.turn_count,
            conversation.prompt_tokens,
            conversation.completion_tokens,
            conversation.created_at,
            conversation.updated_at,
        ),
    ).fetchone()
    with connection.cursor() as cursor:
        with cursor.copy(f"COPY turns (conversation_pk, {_TURN_COLUMNS}) FROM STDIN") as copy:
            for turn in conversation.turns:
                copy.write_row((pk, *dataclasses.astuple(turn)))
        cursor.executemany(
            "INSERT INTO legacy_imports (owner, conversation_id, source, entries)"
            " VALUES (%s, %s, %s, %s)",
            [(*key, source, entries) for source, entries in conversation.legacy_imports.items()],
        )


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


def _probe_write(connection: psycopg.Connection) -> None:
    """Write the probe row and delete it again, committed: fails while the database takes no writes."""
    with connection.transaction():
        connection.execute(
            "INSERT INTO legacy_imports (owner, conversation_id, source, entries)"
            " VALUES (%s, %s, %s, 0) ON CONFLICT DO NOTHING",
            PROBE_ROW,
        )
        connection.execute(
            "DELETE FROM legacy_imports WHERE owner = %s AND conversation_id = %s AND source = %s",
            PROBE_ROW,
        )


def _lock_key(ref: ConversationRef) -> int:
    """A signed 64-bit advisory lock key for the conversation."""
    digest = hashlib.sha256(f"{ref.owner}\x00{ref.conversation_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _reason(exc: BaseException) -> str:
    """A one-line reason that never includes the connection string (it may hold a password)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]
