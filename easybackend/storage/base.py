"""The storage protocols (serving and transfer), and the records they speak in.

A conversation is addressed by :class:`ConversationRef`: the owner (the name
of the backend API key that asked, ``""`` when authentication is off) and the
client's conversation id. Turns are written whole: a prompt and its answer in
one transaction, so a crash leaves each turn either fully stored or absent.

A conversation is a tree of turns (SPEC §12). Each turn has a ``seq`` (its
place in creation order, the store's own key, never reused), an opaque
``turn_id`` (unique in the store, what clients see), the ``parent_seq`` of the
turn it answers after (None for a first turn) and its ``depth`` (1 for a first
turn: its position on its path). The conversation's **head** is the turn the
next ask continues from; it moves with the insert of every turn, in the same
transaction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ..errors import StorageUnavailable

if TYPE_CHECKING:
    from .sql_keys import KeyRecord
    from .sql_usage import UsageRow

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class ConversationRef:
    """Which conversation: the owning key's name and the client's id."""

    owner: str
    conversation_id: str


ROOT = "root"  # the parent_id that names no turn: the ask starts a new first turn


@dataclasses.dataclass(frozen=True, slots=True)
class TurnPosition:
    """Where a turn sits in its conversation's tree."""

    seq: int  # creation order within the conversation, from 1; the store's key
    turn_id: str  # opaque, unique in the store
    depth: int  # turns on the path from the root to it, itself included (1 for a first turn)


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
    upstream: str  # the upstream (its configured name) that answered; "" when none did
    # The lengths of the answer's pieces as they were streamed, comma-separated ("" when it was
    # not streamed): a reattached client's replay numbers its events as the live stream did.
    pieces: str


@dataclasses.dataclass(frozen=True, slots=True)
class StoredTurn:
    """One turn as read back for the context window (content token counts included)."""

    seq: int
    prompt: str
    prompt_tokens: int
    answer: str
    answer_tokens: int


@dataclasses.dataclass(frozen=True, slots=True)
class ConversationSettings:
    """A conversation's own settings (SPEC §15); None: the server's setting applies.

    The system prompt is kept apart (``system_prompt``), as it always was.
    """

    model: str | None = None
    temperature: float | None = None
    max_context_tokens: int | None = None
    memory: str | None = None  # "truncate" or "summarize"
    title: str | None = None
    expires_in: float | None = None  # seconds idle before it is forgotten; 0: never


NO_SETTINGS = ConversationSettings()


@dataclasses.dataclass(frozen=True, slots=True)
class AnswerProgress:
    """A background answer another instance generates, as it last wrote it on its mark: the
    text so far, the lengths of its pieces (as ``TurnRecord.pieces``), the model it calls."""

    text: str = ""
    pieces: str = ""
    model: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class ConversationHead:
    """What an ask reads of its conversation before its turns: the own system prompt and the parent."""

    system_prompt: str | None  # None: the conversation has none (or does not exist yet)
    system_tokens: int | None
    parent: TurnPosition | None  # the turn the ask continues from; None: a new first turn
    settings: ConversationSettings = NO_SETTINGS
    updated_at: float | None = None  # its last activity (epoch seconds); None: no conversation


@dataclasses.dataclass(frozen=True, slots=True)
class MemorySummary:
    """A running summary of a path of the tree: the turns from the root to ``end`` folded in.

    A summary belongs to the turn it ends at, so each branch has the summaries
    of its own path; the newest on an ask's path is the one sent.
    """

    text: str
    tokens: int  # of the text (tiktoken)
    end: TurnPosition  # the last turn it covers; it covers end.depth turns
    model: str  # what wrote it; "" when it was given (edited) by a client
    updated_at: float


@dataclasses.dataclass(frozen=True, slots=True)
class MemoryContext:
    """What an ask under ``memory=summarize`` sends of its path: the newest summary on the path
    (if it fits) and the newest turns after it that fit, and what was left out of neither."""

    summary: MemorySummary | None
    turns: list[StoredTurn]  # oldest first, all after the summary's end
    dropped_tokens: int  # cost of the turns after the summary's end that did not fit
    dropped_turns: int


@dataclasses.dataclass(frozen=True, slots=True)
class ConversationSummary:
    """One conversation as listed: sizes, usage totals and activity times (epoch seconds)."""

    conversation_id: str
    system_prompt: str | None
    turn_count: int  # every turn the tree holds
    prompt_tokens: int
    completion_tokens: int
    created_at: float
    updated_at: float
    head_id: str | None  # the head's turn_id; None: the next ask starts a new first turn
    head_depth: int  # turns on the active path (root to head)
    metadata: str | None  # JSON an API keeps with the conversation (see TurnRecord.extra)
    cursor: str  # opaque position for the next page, after this conversation
    settings: ConversationSettings = NO_SETTINGS  # its own settings (title included)


@dataclasses.dataclass(frozen=True, slots=True)
class TurnRecord(NewTurn):
    """One stored turn, in full: the turn as appended and its place in the tree."""

    seq: int
    turn_id: str
    parent_seq: int | None  # None: a first turn
    depth: int
    # JSON the API that made the turn keeps with it (a response's settings and metadata); the
    # store keeps it as it is given and never reads it.
    extra: str | None

    @property
    def position(self) -> TurnPosition:
        return TurnPosition(self.seq, self.turn_id, self.depth)


@dataclasses.dataclass(frozen=True, slots=True)
class ConversationDetail:
    """A whole conversation: its summary, every turn of the tree (seq order) and the head's seq."""

    summary: ConversationSummary
    turns: list[TurnRecord]
    head_seq: int | None


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
    head_seq: int | None
    last_seq: int  # the highest seq ever given (seqs are never reused)
    metadata: str | None
    turns: list[TurnRecord]  # seq order
    legacy_imports: dict[str, int]  # legacy file name -> entries imported from it (import-json)
    settings: ConversationSettings = NO_SETTINGS  # its own settings (title included)
    summaries: tuple[MemorySummary, ...] = ()  # its paths' summaries (chat/memory.py)


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

    async def conversation_head(
        self, ref: ConversationRef, parent_id: str | None = None, *, sibling_of: str | None = None
    ) -> ConversationHead | None:
        """The conversation's own system prompt, its token count and the parent of the next turn.

        The parent is the head when ``parent_id`` is None, no turn for
        :data:`ROOT`, else the conversation's turn of that id; with
        ``sibling_of`` (a regenerate), the parent of the turn of that id. None
        is returned when the turn named does not exist. A conversation that
        does not exist reads as ``ConversationHead(None, None, None)`` (when no
        turn is named).
        """
        ...

    async def newest_turns(
        self,
        ref: ConversationRef,
        last: TurnPosition,
        budget: int,
        cost: Callable[[StoredTurn], int],
    ) -> list[StoredTurn]:
        """The newest whole turns of the path from the root to ``last`` whose summed ``cost``
        stays within ``budget``, oldest first.

        The path is walked from ``last`` up its parents and reading stops at the
        first turn that does not fit, so a long conversation (or a big tree)
        costs only the tail that is sent. ``cost`` runs in the store's worker
        thread: it must be a pure function.
        """
        ...

    async def append_turn(
        self,
        ref: ConversationRef,
        turn: NewTurn,
        parent: TurnPosition | None,
        *,
        turn_id: str | None = None,
        extra: str | None = None,
    ) -> TurnPosition:
        """Store one turn atomically as a child of ``parent`` (None: a first turn), creating the
        conversation, and make it the head in the same transaction; returns its position.

        ``turn_id`` is the id to give it (one the caller made with
        :func:`~easybackend.storage.sql.new_turn_id` before the answer, so it could
        be named while in progress); a new one by default. ``extra``: see
        :attr:`TurnRecord.extra`.
        """
        ...

    async def append_turns(
        self,
        ref: ConversationRef,
        turns: Sequence[tuple[NewTurn, str | None, str | None]],
        parent: TurnPosition | None,
    ) -> list[TurnPosition]:
        """Store ``turns`` (each a turn, its id or None for a new one, its extra) in one
        transaction as a chain below ``parent``: each turn the parent of the next, the last
        the head; their positions. Creates the conversation, as :meth:`append_turn` does."""
        ...

    async def splice_turns(
        self, ref: ConversationRef, turn_ids: Sequence[str]
    ) -> tuple[int, TurnPosition | None] | None:
        """Remove each turn of ``turn_ids`` alone, in one transaction: its children become
        children of its parent (their subtrees one level shallower), and the head moves to its
        parent if it was the head. Usage totals keep the turns. Ids the conversation does not
        hold are skipped. Returns (turns removed, the head after); None for an unknown
        conversation."""
        ...

    async def set_turn_text(
        self, ref: ConversationRef, turn_id: str, texts: tuple[str, int, str, int]
    ) -> bool:
        """Replace the turn's (prompt, prompt tokens, answer, answer tokens); False if no such turn."""
        ...

    async def conversation_summary(self, ref: ConversationRef) -> ConversationSummary | None:
        """The conversation as listed (no turns read), or None if it does not exist."""
        ...

    async def conversation_of_turn(
        self, owner: str, turn_id: str, *, now: float | None = None, ttl: float | None = None
    ) -> str | None:
        """The id of the owner's conversation holding the turn ``turn_id``, or None; with
        ``now``, None too when that conversation is expired then (``ttl``: see
        :meth:`forget_if_expired`)."""
        ...

    async def create_conversation(self, ref: ConversationRef, metadata: str | None) -> bool:
        """Create an empty conversation with ``metadata``; False (nothing changed) if it exists."""
        ...

    async def set_metadata(self, ref: ConversationRef, metadata: str | None) -> bool:
        """Replace the conversation's metadata; False if the conversation does not exist."""
        ...

    async def find_turn(
        self,
        ref: ConversationRef,
        turn_id: str,
        *,
        now: float | None = None,
        ttl: float | None = None,
    ) -> TurnRecord | None:
        """The conversation's turn of that id, or None; with ``now``, None too when the
        conversation is expired then (``ttl``: see :meth:`forget_if_expired`)."""
        ...

    async def mark_answer(self, ref: ConversationRef, turn_id: str, until: float) -> None:
        """Note that the answer of turn ``turn_id`` is in progress (in some instance) until it
        is unmarked, or at the latest until ``until`` (unix time): what another instance's
        reattach waits for (chat/answers.py)."""
        ...

    async def unmark_answer(self, ref: ConversationRef, turn_id: str) -> None:
        """The answer of turn ``turn_id`` is no longer in progress (stored, or ended unstored)."""
        ...

    async def request_cancel(self, ref: ConversationRef, turn_id: str, now: float) -> bool:
        """Note on the mark of turn ``turn_id``'s answer that its cancel was asked for, for the
        instance generating it (:meth:`cancels_requested`); False if no mark not past its
        bound says it is in progress."""
        ...

    async def cancels_requested(self, now: float) -> list[tuple[str, str]]:
        """(owner, turn id) of the marked answers, not past their bound, whose cancel was
        asked for."""
        ...

    async def answer_progress(
        self, ref: ConversationRef, turn_id: str, now: float
    ) -> AnswerProgress | None:
        """The answer of turn ``turn_id`` as its mark holds it, if it is marked in progress and
        not past its bound; else None."""
        ...

    async def write_progress(
        self, answers: Sequence[tuple[ConversationRef, str, AnswerProgress]]
    ) -> None:
        """Write each (conversation, turn id, progress) on the answer's mark, if it still has
        one, in one transaction: what a follower on another instance reads."""
        ...

    async def conversation_of_answer(self, owner: str, turn_id: str, now: float) -> str | None:
        """The conversation of the owner's answer ``turn_id`` if it is marked in progress and
        not past its bound (known by its turn id alone, as a response id names it), else None."""
        ...

    async def set_head(self, ref: ConversationRef, turn_id: str) -> bool:
        """Make the turn of that id (or no turn, for :data:`ROOT`) the head.

        False when the conversation or the turn does not exist.
        """
        ...

    async def delete_turn(
        self, ref: ConversationRef, turn_id: str
    ) -> tuple[int, TurnPosition | None] | None:
        """Delete the turn and its descendants; (turns deleted, the head after).

        The head moves to the deleted turn's parent when it was among them.
        Usage totals keep the deleted turns. None when the turn does not exist.
        """
        ...

    async def list_conversations(
        self,
        owner: str,
        limit: int,
        after: str | None,
        *,
        now: float | None = None,
        ttl: float | None = None,
    ) -> list[ConversationSummary]:
        """The owner's conversations, most recently active first, starting after cursor ``after``;
        with ``now``, only those not expired then (``ttl``: see :meth:`forget_if_expired`).

        Raises ValueError for a cursor this store did not hand out.
        """
        ...

    async def get_conversation(self, ref: ConversationRef) -> ConversationDetail | None:
        """The whole conversation, or None if it does not exist."""
        ...

    async def delete_conversation(self, ref: ConversationRef) -> bool:
        """Forget the conversation and its turns; False if it did not exist."""
        ...

    async def rollback(
        self, ref: ConversationRef, turns: int
    ) -> tuple[int, int, TurnPosition | None] | None:
        """Move the head ``turns`` turns up its path (to no turn, if the path is shorter).

        Deletes nothing: the turns left behind stay a branch. Returns (turns
        moved past, turns left on the path, the new head), or None for an
        unknown conversation.
        """
        ...

    async def set_system_prompt(
        self, ref: ConversationRef, prompt: str | None, tokens: int | None
    ) -> None:
        """Set (or clear, with None) the conversation's own system prompt, creating the conversation."""
        ...

    # Memory beyond the window (SPEC §15): see easybackend.chat.memory and storage.sql_memory.

    async def set_settings(
        self, ref: ConversationRef, changes: Mapping[str, Any]
    ) -> ConversationSummary:
        """Set the settings ``changes`` names (columns: model, temperature, max_context_tokens,
        memory, title, expires_in, system_prompt, system_tokens; None: the server's), creating
        the conversation; the conversation after. Counts as activity."""
        ...

    async def set_title(self, ref: ConversationRef, title: str, usage: tuple[int, int]) -> bool:
        """Give the conversation ``title`` unless it has one, adding ``usage`` (prompt and
        completion tokens of the call that made it) to its totals; False if it had one."""
        ...

    async def forget_if_expired(self, ref: ConversationRef, now: float, ttl: float | None) -> bool:
        """Delete the conversation if it is expired at ``now`` (its own expires_in, else
        ``ttl``; see storage.sql_memory); True if it was."""
        ...

    async def sweep_expired(
        self, now: float, ttl: float | None, limit: int, busy: Callable[[str, str], bool]
    ) -> int:
        """Delete up to ``limit`` expired conversations, none that is being asked (``busy``:
        owner, conversation id; see sql_memory.sweep); how many were deleted."""
        ...

    async def memory_context(
        self,
        ref: ConversationRef,
        last: TurnPosition,
        budget: int,
        cost: Callable[[StoredTurn], int],
        summary_cost: Callable[[int], int],
    ) -> MemoryContext:
        """The newest summary on the path to ``last`` and the newest turns after it that fit
        ``budget`` with it; one read, as :meth:`newest_turns` (pure ``cost`` functions)."""
        ...

    async def path_since_summary(
        self, ref: ConversationRef, last: TurnPosition, limit: int
    ) -> tuple[MemorySummary | None, list[Any]]:
        """The newest summary on the path to ``last`` and the turns after it (sql_memory.PathTurn),
        oldest first, at most ``limit``."""
        ...

    async def newest_summary(
        self, ref: ConversationRef, last: TurnPosition
    ) -> MemorySummary | None:
        """The newest summary on the path to ``last``, or None."""
        ...

    async def store_summary(
        self, ref: ConversationRef, made: MemorySummary, usage: tuple[int, int]
    ) -> bool:
        """Keep ``made`` as the summary ending at its turn, adding ``usage`` to the totals;
        False when the conversation or the turn is gone."""
        ...

    async def index_pending(self, owner: str | None, limit: int) -> int:
        """Index for search the turns stored since (the owner's only, with ``owner``), about
        ``limit`` at most; how many. A store whose index follows every write returns 0."""
        ...

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
        """The owner's live conversations whose title or a turn holds every term, best first,
        after cursor ``after`` (one this method handed out; ValueError otherwise)."""
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
        The new turns are chained after the conversation's head, each becoming the head.
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

    async def keys(self) -> list[KeyRecord]:
        """Every stored key (digests, never secrets), revoked ones too, by name."""
        ...

    async def create_key(self, record: KeyRecord) -> bool:
        """Store the key as given; False (nothing written) when one of that name exists."""
        ...

    async def usage_rows(
        self, key_name: str | None, first_day: str, last_day: str
    ) -> list[UsageRow]:
        """The usage from ``first_day`` to ``last_day`` (``YYYY-MM-DD``, included), by key
        name (None: every key), day and model."""
        ...

    async def import_usage(self, rows: Sequence[UsageRow]) -> int:
        """Store the usage rows whose key, day and model the store does not hold yet (one it
        holds is kept as it is); how many were stored. One transaction."""
        ...

    async def close(self) -> None:
        """Release connections; further calls fail."""
        ...


class Storage(ServingStore, TransferStore, Protocol):
    """A conversation store: what every backend implements (serving and transfer)."""
