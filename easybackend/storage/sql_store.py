"""The storage protocols over the shared SQL layer: what both backends do alike.

:class:`SQLStore` implements every serving and transfer method with the
statements of :mod:`easybackend.storage.sql`; a backend adds only how a
transaction runs (:meth:`SQLStore._transaction`: its connections, its worker
threads, its error translation), its :class:`~easybackend.storage.sql.Dialect`,
its conversation lock, its migrations and ``open``/``close``.
"""

from __future__ import annotations

import enum
import functools
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from ..errors import StorageUnavailable
from . import sql, sql_keys, sql_memory, sql_usage
from .base import (
    AnswerProgress,
    ConversationDetail,
    ConversationExport,
    ConversationHead,
    ConversationRef,
    ConversationSummary,
    MemoryContext,
    MemorySummary,
    NewTurn,
    StoredTurn,
    TurnPosition,
    TurnRecord,
    WriteHealth,
)

T = TypeVar("T")

# Turns of the searching owner indexed before a search at most (the background indexes the rest).
INDEX_BEFORE_SEARCH = 100_000


class Access(enum.Enum):
    """What a transaction does, so the backend can open the right kind."""

    READ = "read"  # reads that need no common snapshot
    SNAPSHOT = "snapshot"  # reads that must agree with each other (counts, export batches)
    WRITE = "write"  # changes; their outcome is what readiness reports


class SQLStore:
    """A conversation store over :mod:`~easybackend.storage.sql` (see the module docstring).

    Implements :class:`~easybackend.storage.base.ServingStore` and
    :class:`~easybackend.storage.base.TransferStore`.
    """

    dialect: sql.Dialect

    def __init__(self) -> None:
        self._writes = WriteHealth()

    async def _transaction(self, work: Callable[[Any], T], access: Access) -> T:
        """Run ``work(connection)`` in one transaction of kind ``access``, off the event loop.

        Once started the transaction finishes even if the caller is cancelled
        (the result is then dropped). Raises StorageUnavailable for a failure
        of the database.
        """
        raise NotImplementedError

    async def _probe(self, work: Callable[[Any], T], access: Access) -> T:
        """:meth:`_transaction` for the readiness check; a backend may let it be abandoned."""
        return await self._transaction(work, access)

    def _run(self, step: Callable[..., T], access: Access, *args: Any) -> Awaitable[T]:
        """``step(dialect, connection, *args)`` in a transaction; a write is recorded in WriteHealth."""
        work = functools.partial(_bound, step, self.dialect, args)
        if access is Access.WRITE:
            return self._writes.record(self._transaction(work, access))
        return self._transaction(work, access)

    # serving

    async def conversation_head(
        self, ref: ConversationRef, parent_id: str | None = None, *, sibling_of: str | None = None
    ) -> ConversationHead | None:
        return await self._run(sql.head, Access.READ, ref, parent_id, sibling_of)

    async def newest_turns(
        self,
        ref: ConversationRef,
        last: TurnPosition,
        budget: int,
        cost: Callable[[StoredTurn], int],
    ) -> list[StoredTurn]:
        return await self._run(sql.newest_turns, Access.READ, ref, last, budget, cost)

    async def append_turn(
        self,
        ref: ConversationRef,
        turn: NewTurn,
        parent: TurnPosition | None,
        *,
        turn_id: str | None = None,
        extra: str | None = None,
    ) -> TurnPosition:
        return await self._run(sql.append, Access.WRITE, ref, turn, parent, turn_id, extra)

    async def append_turns(
        self,
        ref: ConversationRef,
        turns: Sequence[tuple[NewTurn, str | None, str | None]],
        parent: TurnPosition | None,
    ) -> list[TurnPosition]:
        return await self._run(sql.append_chain, Access.WRITE, ref, turns, parent)

    async def splice_turns(
        self, ref: ConversationRef, turn_ids: Sequence[str]
    ) -> tuple[int, TurnPosition | None] | None:
        return await self._run(sql.splice_turns, Access.WRITE, ref, turn_ids, time.time())

    async def set_turn_text(
        self, ref: ConversationRef, turn_id: str, texts: tuple[str, int, str, int]
    ) -> bool:
        return await self._run(sql.set_turn_text, Access.WRITE, ref, turn_id, texts)

    async def conversation_summary(self, ref: ConversationRef) -> ConversationSummary | None:
        return await self._run(sql.summary, Access.READ, ref)

    async def conversation_of_turn(
        self, owner: str, turn_id: str, *, now: float | None = None, ttl: float | None = None
    ) -> str | None:
        where = sql_memory.alive(now, ttl) if now is not None else ("", ())
        return await self._run(sql.conversation_of_turn, Access.READ, owner, turn_id, where)

    async def create_conversation(self, ref: ConversationRef, metadata: str | None) -> bool:
        return await self._run(sql.create_conversation, Access.WRITE, ref, metadata, time.time())

    async def set_metadata(self, ref: ConversationRef, metadata: str | None) -> bool:
        return await self._run(sql.set_metadata, Access.WRITE, ref, metadata, time.time())

    async def find_turn(
        self,
        ref: ConversationRef,
        turn_id: str,
        *,
        now: float | None = None,
        ttl: float | None = None,
    ) -> TurnRecord | None:
        where = sql_memory.alive(now, ttl) if now is not None else ("", ())
        return await self._run(sql.find_turn, Access.READ, ref, turn_id, where)

    async def mark_answer(self, ref: ConversationRef, turn_id: str, until: float) -> None:
        await self._run(sql.mark_answer, Access.WRITE, ref, turn_id, until)

    async def unmark_answer(self, ref: ConversationRef, turn_id: str) -> None:
        await self._run(sql.unmark_answer, Access.WRITE, ref, turn_id)

    async def request_cancel(self, ref: ConversationRef, turn_id: str, now: float) -> bool:
        return await self._run(sql.request_cancel, Access.WRITE, ref, turn_id, now)

    async def cancels_requested(self, now: float) -> list[tuple[str, str]]:
        return await self._run(sql.cancels_requested, Access.READ, now)

    async def answer_progress(
        self, ref: ConversationRef, turn_id: str, now: float
    ) -> AnswerProgress | None:
        return await self._run(sql.answer_progress, Access.READ, ref, turn_id, now)

    async def write_progress(
        self, answers: Sequence[tuple[ConversationRef, str, AnswerProgress]]
    ) -> None:
        await self._run(sql.write_progress, Access.WRITE, answers)

    async def conversation_of_answer(self, owner: str, turn_id: str, now: float) -> str | None:
        return await self._run(sql.conversation_of_answer, Access.READ, owner, turn_id, now)

    async def set_head(self, ref: ConversationRef, turn_id: str) -> bool:
        return await self._run(sql.set_head, Access.WRITE, ref, turn_id, time.time())

    async def delete_turn(
        self, ref: ConversationRef, turn_id: str
    ) -> tuple[int, TurnPosition | None] | None:
        return await self._run(sql.delete_turn, Access.WRITE, ref, turn_id, time.time())

    async def list_conversations(
        self,
        owner: str,
        limit: int,
        after: str | None,
        *,
        now: float | None = None,
        ttl: float | None = None,
    ) -> list[ConversationSummary]:
        position = sql.decode_cursor(after) if after else None  # ValueError for a bad one
        where = sql_memory.alive(now, ttl) if now is not None else ("", ())
        return await self._run(sql.list_page, Access.READ, owner, limit, position, where)

    async def get_conversation(self, ref: ConversationRef) -> ConversationDetail | None:
        return await self._run(sql.detail, Access.READ, ref)

    async def delete_conversation(self, ref: ConversationRef) -> bool:
        return await self._run(sql.delete, Access.WRITE, ref)

    async def rollback(
        self, ref: ConversationRef, turns: int
    ) -> tuple[int, int, TurnPosition | None] | None:
        return await self._run(sql.rollback, Access.WRITE, ref, turns, time.time())

    async def set_system_prompt(
        self, ref: ConversationRef, prompt: str | None, tokens: int | None
    ) -> None:
        await self._run(sql.set_system_prompt, Access.WRITE, ref, prompt, tokens, time.time())

    async def ping(self) -> None:
        """A trivial query; while the last write failed, a write (see WriteHealth)."""
        if self._writes.failure is None:
            await self._probe(functools.partial(sql.alive, self.dialect), Access.READ)
            return
        try:
            await self._writes.record(
                self._probe(functools.partial(sql.probe_write, self.dialect), Access.WRITE)
            )
        except StorageUnavailable as exc:
            raise self._writes.unready(exc) from None

    # memory beyond the window (easybackend.chat.memory; see sql_memory)

    async def set_settings(
        self, ref: ConversationRef, changes: Mapping[str, Any]
    ) -> ConversationSummary:
        return await self._run(sql_memory.set_settings, Access.WRITE, ref, changes, time.time())

    async def set_title(self, ref: ConversationRef, title: str, usage: tuple[int, int]) -> bool:
        return await self._run(sql_memory.set_title, Access.WRITE, ref, title, usage)

    async def forget_if_expired(self, ref: ConversationRef, now: float, ttl: float | None) -> bool:
        return await self._run(sql_memory.forget_if_expired, Access.WRITE, ref, now, ttl)

    async def sweep_expired(
        self, now: float, ttl: float | None, limit: int, busy: Callable[[str, str], bool]
    ) -> int:
        return await self._run(sql_memory.sweep, Access.WRITE, now, ttl, limit, busy)

    async def memory_context(
        self,
        ref: ConversationRef,
        last: TurnPosition,
        budget: int,
        cost: Callable[[StoredTurn], int],
        summary_cost: Callable[[int], int],
    ) -> MemoryContext:
        return await self._run(
            sql_memory.memory_context, Access.READ, ref, last, budget, cost, summary_cost
        )

    async def path_since_summary(
        self, ref: ConversationRef, last: TurnPosition, limit: int
    ) -> tuple[MemorySummary | None, list[sql_memory.PathTurn]]:
        return await self._run(sql_memory.path_since_summary, Access.SNAPSHOT, ref, last, limit)

    async def newest_summary(
        self, ref: ConversationRef, last: TurnPosition
    ) -> MemorySummary | None:
        return await self._run(sql_memory.newest_summary, Access.READ, ref, last)

    async def store_summary(
        self, ref: ConversationRef, made: MemorySummary, usage: tuple[int, int]
    ) -> bool:
        return await self._run(sql_memory.store_summary, Access.WRITE, ref, made, usage)

    async def index_pending(self, owner: str | None, limit: int) -> int:
        if self.dialect.name != "sqlite":
            return 0  # PostgreSQL's indexes follow every write
        return await self._run(sql_memory.index_pending, Access.WRITE, owner, limit)

    async def search_conversations(
        self,
        owner: str,
        terms: Sequence[str],
        limit: int,
        after: str | None,
        *,
        now: float,
        ttl: float | None,
    ) -> list[ConversationSummary]:
        offset = sql_memory.decode_search_cursor(after) if after else 0  # ValueError
        where = sql_memory.alive(now, ttl)
        await self.index_pending(owner, INDEX_BEFORE_SEARCH)  # what the background has not yet
        return await self._run(sql_memory.search, Access.READ, owner, terms, limit, offset, where)

    # stored backend keys (easybackend.governance.keys.KeyTable)

    async def keys(self) -> list[sql_keys.KeyRecord]:
        return await self._run(sql_keys.all_keys, Access.READ)

    async def create_key(self, record: sql_keys.KeyRecord) -> bool:
        return await self._run(sql_keys.insert_key, Access.WRITE, record)

    async def update_key(
        self, name: str, changes: Mapping[str, Any]
    ) -> sql_keys.KeyRecord | None:
        return await self._run(sql_keys.update_key, Access.WRITE, name, changes, time.time())

    async def revoke_key(self, name: str) -> sql_keys.KeyRecord | None:
        return await self._run(sql_keys.revoke_key, Access.WRITE, name, time.time())

    # usage and the shared rate windows (easybackend.governance.limits.UsageTable)

    async def add_usage(self, rows: Sequence[sql_usage.UsageRow]) -> None:
        await self._run(sql_usage.add_usage, Access.WRITE, rows)

    async def import_usage(self, rows: Sequence[sql_usage.UsageRow]) -> int:
        return await self._run(sql_usage.import_usage, Access.WRITE, rows)

    async def usage_rows(
        self, key_name: str | None, first_day: str, last_day: str
    ) -> list[sql_usage.UsageRow]:
        return await self._run(sql_usage.usage_rows, Access.READ, key_name, first_day, last_day)

    async def spent(self, key_name: str | None, day: str, month: str) -> list[tuple[str, int, int]]:
        return await self._run(sql_usage.spent, Access.READ, key_name, day, month)

    async def admit_windows(
        self,
        peek: Sequence[str],
        budget: tuple[str, str, str] | None,
        go_on: Callable[[dict[str, float | None], tuple[int, int] | None], bool],
        take: Sequence[tuple[str, float, float]],
        now: float,
    ) -> sql_usage.Reads | None:
        return await self._run(sql_usage.admit, Access.WRITE, peek, budget, go_on, take, now)

    async def charge_usage(
        self, rows: Sequence[sql_usage.UsageRow], windows: Sequence[tuple[str, float]], now: float
    ) -> None:
        await self._run(_charge, Access.WRITE, rows, windows, now)

    async def give_back_windows(self, windows: Sequence[tuple[str, float]]) -> None:
        await self._run(sql_usage.give_back_windows, Access.WRITE, windows)

    async def prune_windows(self, now: float) -> int:
        return await self._run(sql_usage.prune_windows, Access.WRITE, now)

    # transfer

    async def import_turns(self, ref: ConversationRef, source: str, turns: list[NewTurn]) -> int:
        return await self._run(sql.import_turns, Access.WRITE, ref, source, turns)

    async def totals(self) -> tuple[int, int]:
        return await self._run(sql.totals, Access.SNAPSHOT)

    async def export_all(self) -> AsyncGenerator[ConversationExport, None]:
        after = 0
        while True:
            batch, after = await self._run(sql_memory.export_batch, Access.SNAPSHOT, after)
            for conversation in batch:
                yield conversation
            if len(batch) < sql.EXPORT_BATCH:
                return

    async def import_conversations(self, conversations: Sequence[ConversationExport]) -> None:
        await self._run(_import_all, Access.WRITE, conversations)


def _bound(step: Callable[..., T], dialect: sql.Dialect, args: tuple[Any, ...], db: Any) -> T:
    return step(dialect, db, *args)


def _charge(
    dialect: sql.Dialect,
    db: Any,
    rows: Sequence[sql_usage.UsageRow],
    windows: Sequence[tuple[str, float]],
    now: float,
) -> None:
    sql_usage.add_usage(dialect, db, rows)
    for name, cost in windows:
        sql_usage.charge_window(dialect, db, name, cost, now)


def _import_all(dialect: sql.Dialect, db: Any, conversations: Sequence[ConversationExport]) -> None:
    for conversation in conversations:
        sql.import_conversation(dialect, db, conversation)
        sql_memory.import_memory(dialect, db, conversation)
