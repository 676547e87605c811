"""The storage protocols (serving and transfer), and the records they speak in.

A conversation is addressed by :class:`ConversationRef`: the owner (the name
of the backend API key that asked, ``""`` when authentication is off) and the
client's conversation id. Turns are written whole: a prompt and its answer in
one transaction, so a crash leaves each turn either fully stored or absent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol, TypeVar

from ..errors import StorageUnavailable

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class ConversationRef:
    """Which conversation: the owning key's name and the client's id."""

    owner: str
    conversation_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class NewTurn:
    """A finished (or cancelled) turn, ready to be appended."""

    prompt: str
    prompt_tokens: int
    answer: str
    answer_tokens: int
    model: str
    finish_reason: str
    usage_prompt_tokens: int
    usage_completion_tokens: int
    created_at: float
    finished_at: float


@dataclasses.dataclass(frozen=True, slots=True)
class StoredTurn:
    """One turn as read back for the context window (content token counts included)."""

    seq: int
    prompt: str
    prompt_tokens: int
    answer: str
    answer_tokens: int


@dataclasses.dataclass(frozen=True, slots=True)
class ConversationHead:
    """What an ask reads of its conversation before its turns: the own system prompt and the size."""

    system_prompt: str | None  # None: the conversation has none (or does not exist yet)
    system_tokens: int | None
    turn_count: int  # all turns the conversation holds; 0 for a new conversation


@dataclasses.dataclass(frozen=True, slots=True)
class ConversationSummary:
    """One conversation as listed: sizes, usage totals and activity times (epoch seconds)."""

    conversation_id: str
    system_prompt: str | None
    turn_count: int
    prompt_tokens: int
    completion_tokens: int
    created_at: float
    updated_at: float
    cursor: str  # opaque position for the next page, after this conversation


@dataclasses.dataclass(frozen=True, slots=True)
class TurnRecord(NewTurn):
    """One stored turn, in full: the turn as appended and its place in the conversation."""

    seq: int


@dataclasses.dataclass(frozen=True, slots=True)
class ConversationDetail:
    summary: ConversationSummary
    turns: list[TurnRecord]


@dataclasses.dataclass(frozen=True, slots=True)
class ConversationExport:
    """One conversation whole, as moved from store to store (``easybackend migrate-storage``).

    Everything the store keeps about it: the counters and times are copied as
    they are, not recomputed (a rollback drops turns but not their usage).
    """

    ref: ConversationRef
    system_prompt: str | None
    system_tokens: int | None
    turn_count: int
    prompt_tokens: int
    completion_tokens: int
    created_at: float
    updated_at: float
    turns: list[TurnRecord]  # seq order
    legacy_imports: dict[str, int]  # legacy file name -> entries imported from it (import-json)


class WriteHealth:
    """The outcome of a store's last write, which its readiness check reports.

    A store records every write here. While the last one failed, ``ping()``
    does not trust a read: it writes for real (the probe row, inserted and
    deleted in one transaction), so readiness reports the fault until writes
    work again, and then recovers by itself.
    """

    def __init__(self) -> None:
        self.failure: str | None = None  # why the last write failed; None once one worked

    async def record(self, write: Awaitable[T]) -> T:
        """Await ``write``, remembering whether it worked; its StorageUnavailable propagates."""
        try:
            result = await write
        except StorageUnavailable as exc:
            self.failure = exc.message
            raise
        self.failure = None
        return result

    def unready(self, probe_error: StorageUnavailable) -> StorageUnavailable:
        """The readiness error when the probe write failed too."""
        return StorageUnavailable(f"writes fail: {probe_error.message}")


class ServingStore(Protocol):
    """What the chat core asks of a conversation store while it serves.

    Methods run their blocking work off the event loop. On cancellation a call
    that already started its transaction finishes it (the result is then
    dropped), so the store never holds half a turn. Failures raise
    :class:`easybackend.errors.StorageUnavailable`.
    """

    async def conversation_head(self, ref: ConversationRef) -> ConversationHead:
        """The conversation's own system prompt, its token count and its number of turns.

        A conversation that does not exist reads as ``ConversationHead(None, None, 0)``.
        """
        ...

    async def newest_turns(
        self, ref: ConversationRef, budget: int, cost: Callable[[StoredTurn], int]
    ) -> list[StoredTurn]:
        """The newest whole turns whose summed ``cost`` stays within ``budget``, oldest first.

        Turns are read newest first and reading stops at the first that does
        not fit, so a long conversation costs only the tail that is sent.
        ``cost`` runs in the store's worker thread: it must be a pure function.
        """
        ...

    async def append_turn(self, ref: ConversationRef, turn: NewTurn) -> int:
        """Store one turn atomically after the last one, creating the conversation; returns its seq."""
        ...

    async def list_conversations(
        self, owner: str, limit: int, after: str | None
    ) -> list[ConversationSummary]:
        """The owner's conversations, most recently active first, starting after cursor ``after``.

        Raises ValueError for a cursor this store did not hand out.
        """
        ...

    async def get_conversation(self, ref: ConversationRef) -> ConversationDetail | None:
        """The whole conversation, or None if it does not exist."""
        ...

    async def delete_conversation(self, ref: ConversationRef) -> bool:
        """Forget the conversation and its turns; False if it did not exist."""
        ...

    async def rollback(self, ref: ConversationRef, turns: int) -> tuple[int, int] | None:
        """Drop the last ``turns`` turns (all, if there are fewer).

        Returns (turns dropped, turns left), or None for an unknown conversation.
        """
        ...

    async def set_system_prompt(
        self, ref: ConversationRef, prompt: str | None, tokens: int | None
    ) -> None:
        """Set (or clear, with None) the conversation's own system prompt, creating the conversation."""
        ...

    def conversation_lock(self, ref: ConversationRef) -> AbstractAsyncContextManager[None]:
        """Held around a whole ask (and changes of a conversation) on top of the in-process lock.

        Serialises the conversation across processes sharing the store; a store
        only one process uses returns a context that does nothing.
        """
        ...

    async def ping(self) -> None:
        """Raise StorageUnavailable unless the store answers a trivial query.

        While the last write failed, the store must take a write: the check
        writes and deletes the probe row (see :class:`WriteHealth`).
        """
        ...

    async def close(self) -> None:
        """Release connections; further calls fail."""
        ...


class TransferStore(Protocol):
    """Whole conversations into and out of a store: ``migrate-storage`` and ``import-json``.

    The whole-store copies are meant for a store no server is using: they take
    no conversation locks. Failures raise StorageUnavailable.
    """

    async def import_turns(self, ref: ConversationRef, source: str, turns: list[NewTurn]) -> int:
        """Append the turns of ``source`` not imported before (by position); returns how many were added.

        ``turns`` is everything ``source`` holds now: the first ones already
        imported from the same source are skipped, so importing twice adds nothing.
        """
        ...

    async def totals(self) -> tuple[int, int]:
        """(conversations, turns) the store holds, all owners together."""
        ...

    def export_all(self) -> AsyncGenerator[ConversationExport, None]:
        """Every conversation, whole, in the order the store created them.

        Read a batch of conversations per transaction, so each one's counters
        match its turns. Bookkeeping of an empty legacy file (zero entries, no
        conversation) is left out: it changes nothing.
        """
        ...

    async def import_conversations(self, conversations: Sequence[ConversationExport]) -> None:
        """Write the conversations exactly as given, all in one transaction.

        A conversation already held under the same owner and id is replaced
        (its turns and legacy bookkeeping with it); the others are left alone.
        """
        ...

    async def close(self) -> None:
        """Release connections; further calls fail."""
        ...


class Storage(ServingStore, TransferStore, Protocol):
    """A conversation store: what every backend implements (serving and transfer)."""
