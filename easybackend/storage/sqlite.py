"""SQLite storage: one database file in WAL mode, schema migrations at open.

All blocking sqlite3 work runs in a worker thread (``trio.to_thread``), one
call at a time on a single connection. A call is not abandoned when the
calling task is cancelled: its transaction finishes first, so a turn is
always either fully stored or absent, also after ``kill -9`` (SQLite's
journal rolls back an unfinished transaction on the next open).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import sqlite3
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TypeVar

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

T = TypeVar("T")

EXPORT_BATCH = 100  # conversations read per transaction by export_all

# Each entry moves the schema from version i to i + 1 (PRAGMA user_version).
MIGRATIONS: list[str] = [
    """
    CREATE TABLE conversations (
        pk INTEGER PRIMARY KEY,
        owner TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        system_prompt TEXT,
        system_tokens INTEGER,
        turn_count INTEGER NOT NULL DEFAULT 0,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        UNIQUE (owner, conversation_id)
    );
    CREATE TABLE turns (
        conversation_pk INTEGER NOT NULL REFERENCES conversations (pk) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        prompt TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        answer TEXT NOT NULL,
        answer_tokens INTEGER NOT NULL,
        model TEXT NOT NULL,
        finish_reason TEXT NOT NULL,
        usage_prompt_tokens INTEGER NOT NULL,
        usage_completion_tokens INTEGER NOT NULL,
        created_at REAL NOT NULL,
        finished_at REAL NOT NULL,
        PRIMARY KEY (conversation_pk, seq)
    ) WITHOUT ROWID;
    CREATE INDEX conversations_by_activity ON conversations (owner, updated_at DESC);
    """,
    """
    CREATE TABLE legacy_imports (
        owner TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        source TEXT NOT NULL,
        entries INTEGER NOT NULL,
        PRIMARY KEY (owner, conversation_id, source)
    );
    """,
]


class SQLiteStorage:
    """The embedded default store (see :class:`easybackend.storage.base.Storage`)."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._db = connection
        self._limiter = trio.CapacityLimiter(1)
        self._writes = WriteHealth()

    @classmethod
    async def open(cls, path: Path) -> SQLiteStorage:
        """Open (creating if needed) the database at ``path`` and migrate it to the current schema."""
        return cls(await trio.to_thread.run_sync(_connect, path))

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return await trio.to_thread.run_sync(work, self._db, limiter=self._limiter)
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"conversation storage failed: {exc}") from exc

    async def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """:meth:`_run` for a call that writes: its outcome is what readiness reports."""
        return await self._writes.record(self._run(work))

    async def load_context(
        self,
        ref: ConversationRef,
        history_budget: Callable[[str | None, int | None], int],
        cost: Callable[[StoredTurn], int],
    ) -> Context:
        def work(db: sqlite3.Connection) -> Context:
            row = db.execute(
                "SELECT pk, system_prompt, system_tokens, turn_count FROM conversations"
                " WHERE owner = ? AND conversation_id = ?",
                (ref.owner, ref.conversation_id),
            ).fetchone()
            pk, system_prompt, system_tokens, turn_count = row or (None, None, None, 0)
            budget = history_budget(system_prompt, system_tokens)
            turns: list[StoredTurn] = []
            if turn_count:
                newest_first = db.execute(
                    "SELECT seq, prompt, prompt_tokens, answer, answer_tokens FROM turns"
                    " WHERE conversation_pk = ? ORDER BY seq DESC",
                    (pk,),
                )
                turns = newest_that_fit(newest_first, budget, cost)
                newest_first.close()
            return Context(system_prompt, system_tokens, turns, turn_count)

        return await self._run(work)

    async def append_turn(self, ref: ConversationRef, turn: NewTurn) -> int:
        def work(db: sqlite3.Connection) -> int:
            with db:  # one transaction: the turn and the conversation's totals together
                db.execute("BEGIN IMMEDIATE")
                return _append(db, ref, turn)

        return await self._write(work)

    async def list_conversations(
        self, owner: str, limit: int, after: str | None
    ) -> list[ConversationSummary]:
        position = decode_cursor(after) if after else None

        def work(db: sqlite3.Connection) -> list[ConversationSummary]:
            query = f"SELECT {_SUMMARY_COLUMNS}, pk FROM conversations WHERE owner = ?"
            args: list[object] = [owner]
            if position is not None:
                query += " AND (updated_at < ? OR (updated_at = ? AND pk < ?))"
                args += [position[0], position[0], position[1]]
            query += " ORDER BY updated_at DESC, pk DESC LIMIT ?"
            rows = db.execute(query, [*args, limit]).fetchall()
            return [_summary(row[:-1], encode_cursor(row[6], row[-1])) for row in rows]

        return await self._run(work)

    async def get_conversation(self, ref: ConversationRef) -> ConversationDetail | None:
        def work(db: sqlite3.Connection) -> ConversationDetail | None:
            row = db.execute(
                f"SELECT {_SUMMARY_COLUMNS}, pk FROM conversations WHERE owner = ? AND conversation_id = ?",
                (ref.owner, ref.conversation_id),
            ).fetchone()
            if row is None:
                return None
            turns = db.execute(
                "SELECT seq, prompt, prompt_tokens, answer, answer_tokens, model, finish_reason,"
                " usage_prompt_tokens, usage_completion_tokens, created_at, finished_at"
                " FROM turns WHERE conversation_pk = ? ORDER BY seq",
                (row[-1],),
            ).fetchall()
            summary = _summary(row[:-1], encode_cursor(row[6], row[-1]))
            return ConversationDetail(summary, [TurnRecord(*turn) for turn in turns])

        return await self._run(work)

    async def delete_conversation(self, ref: ConversationRef) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            with db:
                db.execute("BEGIN IMMEDIATE")
                deleted = db.execute(
                    "DELETE FROM conversations WHERE owner = ? AND conversation_id = ?",
                    (ref.owner, ref.conversation_id),
                ).rowcount
                db.execute(
                    "DELETE FROM legacy_imports WHERE owner = ? AND conversation_id = ?",
                    (ref.owner, ref.conversation_id),
                )
            return deleted > 0

        return await self._write(work)

    async def rollback(self, ref: ConversationRef, turns: int) -> tuple[int, int] | None:
        def work(db: sqlite3.Connection) -> tuple[int, int] | None:
            with db:
                db.execute("BEGIN IMMEDIATE")
                row = db.execute(
                    "SELECT pk, turn_count FROM conversations WHERE owner = ? AND conversation_id = ?",
                    (ref.owner, ref.conversation_id),
                ).fetchone()
                if row is None:
                    return None
                pk, count = row
                keep = max(count - turns, 0)
                db.execute("DELETE FROM turns WHERE conversation_pk = ? AND seq > ?", (pk, keep))
                db.execute(
                    "UPDATE conversations SET turn_count = ?, updated_at = ? WHERE pk = ?",
                    (keep, time.time(), pk),
                )
            return count - keep, keep

        return await self._write(work)

    async def set_system_prompt(
        self, ref: ConversationRef, prompt: str | None, tokens: int | None
    ) -> None:
        def work(db: sqlite3.Connection) -> None:
            now = time.time()
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.execute(
                    "INSERT INTO conversations (owner, conversation_id, system_prompt, system_tokens,"
                    " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (owner, conversation_id) DO UPDATE SET"
                    " system_prompt = excluded.system_prompt, system_tokens = excluded.system_tokens,"
                    " updated_at = excluded.updated_at",
                    (ref.owner, ref.conversation_id, prompt, tokens, now, now),
                )

        await self._write(work)

    async def import_turns(self, ref: ConversationRef, source: str, turns: list[NewTurn]) -> int:
        def work(db: sqlite3.Connection) -> int:
            with db:
                db.execute("BEGIN IMMEDIATE")
                row = db.execute(
                    "SELECT entries FROM legacy_imports"
                    " WHERE owner = ? AND conversation_id = ? AND source = ?",
                    (ref.owner, ref.conversation_id, source),
                ).fetchone()
                done = row[0] if row else 0
                for turn in turns[done:]:
                    _append(db, ref, turn)
                db.execute(
                    "INSERT INTO legacy_imports VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (owner, conversation_id, source) DO UPDATE SET entries = excluded.entries",
                    (ref.owner, ref.conversation_id, source, max(done, len(turns))),
                )
            return max(len(turns) - done, 0)

        return await self._write(work)

    async def totals(self) -> tuple[int, int]:
        def work(db: sqlite3.Connection) -> tuple[int, int]:
            with db:
                db.execute("BEGIN")
                (conversations,) = db.execute("SELECT count(*) FROM conversations").fetchone()
                (turns,) = db.execute("SELECT count(*) FROM turns").fetchone()
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
        def work(db: sqlite3.Connection) -> None:
            with db:
                db.execute("BEGIN IMMEDIATE")
                for conversation in conversations:
                    _import(db, conversation)

        await self._write(work)

    @contextlib.asynccontextmanager
    async def conversation_lock(self, ref: ConversationRef) -> AsyncIterator[None]:
        """Nothing to do: one process owns the database file (the in-process lock suffices)."""
        yield

    async def ping(self) -> None:
        """A trivial query; while the last write failed, a write (see WriteHealth)."""

        def work(db: sqlite3.Connection) -> None:
            db.execute("SELECT count(*) FROM conversations WHERE pk = 0").fetchone()

        if self._writes.failure is None:
            await self._run(work)
            return
        try:
            await self._write(_probe_write)
        except StorageUnavailable as exc:
            raise self._writes.unready(exc) from None

    async def close(self) -> None:
        await self._run(lambda db: db.close())


_SUMMARY_COLUMNS = "conversation_id, system_prompt, turn_count, prompt_tokens, completion_tokens, created_at, updated_at"


def _summary(row: tuple, cursor: str) -> ConversationSummary:
    return ConversationSummary(*row, cursor=cursor)


def encode_cursor(updated_at: float, pk: int) -> str:
    return base64.urlsafe_b64encode(f"{updated_at!r}:{pk}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, int]:
    """Raises ValueError for anything :func:`encode_cursor` did not make."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        updated_at, pk = raw.split(":")
        return float(updated_at), int(pk)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("invalid cursor") from None


def _append(db: sqlite3.Connection, ref: ConversationRef, turn: NewTurn) -> int:
    """Append ``turn`` inside the caller's transaction; returns its seq."""
    db.execute(
        "INSERT INTO conversations (owner, conversation_id, created_at, updated_at)"
        " VALUES (?, ?, ?, ?) ON CONFLICT (owner, conversation_id) DO NOTHING",
        (ref.owner, ref.conversation_id, turn.created_at, turn.finished_at),
    )
    pk, seq = db.execute(
        "SELECT pk, turn_count + 1 FROM conversations WHERE owner = ? AND conversation_id = ?",
        (ref.owner, ref.conversation_id),
    ).fetchone()
    db.execute(
        "INSERT INTO turns VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
    db.execute(
        "UPDATE conversations SET turn_count = ?, updated_at = max(updated_at, ?),"
        " prompt_tokens = prompt_tokens + ?, completion_tokens = completion_tokens + ?"
        " WHERE pk = ?",
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


def _export_batch(db: sqlite3.Connection, after: int) -> tuple[list[ConversationExport], int]:
    """The next EXPORT_BATCH conversations with pk above ``after``, whole, and the last pk read."""
    with db:
        db.execute("BEGIN")  # one snapshot for the batch
        rows = db.execute(
            f"SELECT pk, {_EXPORT_COLUMNS} FROM conversations WHERE pk > ? ORDER BY pk LIMIT ?",
            (after, EXPORT_BATCH),
        ).fetchall()
        if not rows:
            return [], after
        first, last = rows[0][0], rows[-1][0]
        turns: dict[int, list[TurnRecord]] = {row[0]: [] for row in rows}
        for pk, *turn in db.execute(
            f"SELECT conversation_pk, {_TURN_COLUMNS} FROM turns"
            " WHERE conversation_pk BETWEEN ? AND ? ORDER BY conversation_pk, seq",
            (first, last),
        ):
            turns[pk].append(TurnRecord(*turn))
        legacy: dict[int, dict[str, int]] = {row[0]: {} for row in rows}
        for pk, source, entries in db.execute(
            "SELECT c.pk, l.source, l.entries FROM legacy_imports l JOIN conversations c"
            " ON c.owner = l.owner AND c.conversation_id = l.conversation_id"
            " WHERE c.pk BETWEEN ? AND ?",
            (first, last),
        ):
            legacy[pk][source] = entries
    batch = [
        ConversationExport(ConversationRef(owner, cid), *values, turns[pk], legacy[pk])
        for pk, owner, cid, *values in rows
    ]
    return batch, last


def _import(db: sqlite3.Connection, conversation: ConversationExport) -> None:
    """Write one exported conversation inside the caller's transaction, replacing any namesake."""
    ref = conversation.ref
    key = (ref.owner, ref.conversation_id)
    db.execute("DELETE FROM conversations WHERE owner = ? AND conversation_id = ?", key)
    db.execute("DELETE FROM legacy_imports WHERE owner = ? AND conversation_id = ?", key)
    pk = db.execute(
        f"INSERT INTO conversations ({_EXPORT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
    ).lastrowid
    db.executemany(
        f"INSERT INTO turns (conversation_pk, {_TURN_COLUMNS})"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(pk, *dataclasses.astuple(turn)) for turn in conversation.turns],
    )
    db.executemany(
        "INSERT INTO legacy_imports (owner, conversation_id, source, entries) VALUES (?, ?, ?, ?)",
        [(*key, source, entries) for source, entries in conversation.legacy_imports.items()],
    )


def _probe_write(db: sqlite3.Connection) -> None:
    """Write the probe row and delete it again, committed: fails while the file takes no writes."""
    with db:
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "INSERT OR REPLACE INTO legacy_imports (owner, conversation_id, source, entries)"
            " VALUES (?, ?, ?, 0)",
            PROBE_ROW,
        )
        db.execute(
            "DELETE FROM legacy_imports WHERE owner = ? AND conversation_id = ? AND source = ?",
            PROBE_ROW,
        )


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
            for statement in MIGRATIONS[number].split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {number + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
