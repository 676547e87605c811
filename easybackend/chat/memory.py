"""Memory beyond the window (SPEC §15): settings per conversation, running summaries, titles,
expiry and search.

**Settings.** A conversation keeps its own ``model``, ``temperature``,
``max_context_tokens``, ``memory`` (``truncate`` or ``summarize``),
``system`` (its system prompt), ``title`` and ``expires_in`` (seconds idle;
0: never); an unset one is the server's (``GPT_ENGINE``, ``TEMPERATURE``,
``MAX_CONTEXT_TOKENS``, ``MEMORY``, ``FIRST_PROMPT``, ``CONVERSATION_TTL``).
An ask's own override beats the conversation's setting, which beats the
server's. The conversation's model passes the one check of a model
(:meth:`ChatService.model_for`) when it is set and at every ask; its budget
may not exceed ``MAX_CONTEXT_TOKENS`` (the operator's bound on what an ask
costs). They are read with the conversation's head, in the read every ask
already makes.

**Summaries** (``memory=summarize``). The turns of an ask's path that no
longer fit are folded into a running summary written by the model
(``SUMMARY_MODEL``, else the model the conversation asks;
``SUMMARY_PROMPT``, else :data:`DEFAULT_SUMMARY_PROMPT`), sent ahead of the
kept turns as a ``system`` message (:data:`SUMMARY_PREFIX` + the summary,
right after the system prompt). A summary belongs to the turn it ends at and
covers the path from the root to it, so a branch has the summaries of its own
path; an ask sends the newest summary on its path and the newest turns after
it that fit. Off the critical path: after a turn is stored, when the turns of
its path that the next ask would leave out and no summary covers cost
``SUMMARY_THRESHOLD`` tokens (default: a quarter of the conversation's
budget), an update is started in the service's nursery
(:mod:`.background`). It takes the conversation's lock (so it is ordered
with the conversation's asks: an ask arriving while it runs waits for it, one
already waiting goes first; other conversations never wait), folds the turns
the next ask would leave out into the newest summary, and stores the new
summary at the last turn folded. A failure (the model's error, a timeout) is
logged and changes nothing: the next turn stored tries again; it never fails
an ask. Each summary call has an access line (protocol ``summary``) and the
metrics of an ask, and its tokens count in the conversation's usage totals.

**Titles.** Settable; with ``AUTO_TITLE`` the model names a conversation that
has none after its first turn, in the background (``TITLE_PROMPT``; protocol
``title``), never replacing a title set meanwhile.

**Expiry.** A conversation idle (no ask, no change) longer than its
``expires_in``, else ``CONVERSATION_TTL``, is gone at once: reads answer
not found, an ask starts a new conversation under the same id, a change
finds nothing (or, for the calls that create one, starts afresh). The sweep
(:meth:`Memory.sweep_forever`, every ``SWEEP_INTERVAL`` seconds in the
nursery) deletes them in batches of :data:`SWEEP_BATCH`, skipping
conversations being asked; safe with several instances on PostgreSQL.

**Search** over the caller's conversations (prompts, answers, titles):
:func:`~easybackend.storage.sql_memory.search`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import trio

from ..errors import (
    ChatError,
    InvalidInput,
    ModelNotAllowed,
    NotFound,
    StorageUnavailable,
    UpstreamError,
)
from ..storage import ConversationRef, ConversationSummary, StoredTurn, TurnPosition
from ..storage.base import ConversationHead, ConversationSettings, MemorySummary
from ..storage.sql_memory import PathTurn
from ..upstream.openai_client import Answering, Completion, UpstreamCall
from .accounting import AskRecord
from .caller import Caller
from .context import turn_cost
from .tokens import MESSAGE_OVERHEAD, REPLY_PRIMING

if TYPE_CHECKING:
    from .service import ChatService

log = logging.getLogger("easybackend.memory")

POLICIES = ("truncate", "summarize")
SETTING_NAMES = (
    "model",
    "temperature",
    "max_context_tokens",
    "memory",
    "system",
    "title",
    "expires_in",
)

DEFAULT_SUMMARY_PROMPT = (
    "You keep the memory of a conversation between a user and an assistant. You are given the"
    " summary so far (it may be empty) and the next part of the conversation. Write the updated"
    " summary: every fact the user gave about themselves and their situation, names, numbers,"
    " dates, decisions, preferences, instructions the assistant must keep following, and open"
    " questions, oldest first; leave out small talk. Write it in the language of the"
    " conversation, in the third person, as plain text, as briefly as the facts allow. Answer"
    " with the summary only."
)
DEFAULT_TITLE_PROMPT = (
    "Give this conversation a title of at most six words, in the language the user writes in,"
    " without quotes or a final full stop. Answer with the title only."
)
# What the model receives ahead of the kept turns, as a system message: this, then the summary.
SUMMARY_PREFIX = "Summary of the earlier part of this conversation:\n"
SUMMARY_TEMPERATURE = 0.2  # summaries and titles: the facts, not a creative writing
DEFAULT_SUMMARY_MAX_TOKENS = 512  # at most; a quarter of the budget when that is less
TITLE_MAX_TOKENS = 24
TITLE_CHARS = 80  # a title's length at most (a longer one is cut)
TITLE_INPUT_CHARS = 2000  # of the first prompt and of the first answer, sent to name it
MAX_TITLE_CHARS = 200  # a title a client sets
MAX_EXPIRES_IN = 10 * 365 * 86400.0  # seconds
SUMMARY_READ_TURNS = 5000  # turns of a path read by one summary update at most
SUMMARY_ROUNDS = 8  # summary calls one update (or compaction) makes at most
SWEEP_BATCH = 200  # conversations deleted per transaction by the sweep
INDEX_DELAY = 0.5  # seconds the search indexer waits after a turn, to index those of a moment
INDEX_BATCH = 32  # turns indexed per transaction (asks' storage calls run between two)
MAX_QUERY_CHARS = 200
MAX_QUERY_TERMS = 10


@dataclasses.dataclass(frozen=True, slots=True)
class _Due:
    """A summary update asked for: the path's last turn, who asked, the model it asks."""

    last: TurnPosition
    caller: Caller
    model: str


class Memory:
    """The memory policy of one chat service (see the module docstring)."""

    def __init__(self, service: ChatService) -> None:
        self._service = service
        settings = service.settings
        self.settings = settings
        self.summary_prompt = settings.summary_prompt or DEFAULT_SUMMARY_PROMPT
        self.title_prompt = settings.title_prompt or DEFAULT_TITLE_PROMPT
        self._prefix_tokens = service.counter.text(SUMMARY_PREFIX)
        self._instruction_tokens = service.counter.message(self.summary_prompt)
        self.now = time.time  # the wall clock of expiry (a test may replace it)
        self._due: dict[ConversationRef, _Due] = {}
        self._index_due = trio.Event()  # a turn was stored: the search indexer has work

    # --- what applies

    @property
    def ttl(self) -> float | None:
        return self.settings.conversation_ttl

    def expired(self, settings: ConversationSettings, updated_at: float | None) -> bool:
        """A conversation with these settings, last active at ``updated_at``, is expired now."""
        if updated_at is None:
            return False
        expiry = settings.expires_in if settings.expires_in is not None else self.ttl
        return bool(expiry) and updated_at + expiry < self.now()  # type: ignore[operator]

    def policy(self, settings: ConversationSettings) -> str:
        return settings.memory or self.settings.memory

    def context_tokens(self, settings: ConversationSettings) -> int:
        return settings.max_context_tokens or self.settings.max_context_tokens

    def threshold(self, settings: ConversationSettings) -> int:
        """Tokens of left-out, unsummarized turns that make a summary due."""
        return self.settings.summary_threshold or max(1, self.context_tokens(settings) // 4)

    def summary_max_tokens(self, settings: ConversationSettings) -> int:
        configured = self.settings.summary_max_tokens
        if configured is not None:
            return configured
        return max(16, min(DEFAULT_SUMMARY_MAX_TOKENS, self.context_tokens(settings) // 4))

    def summary_cost(self, tokens: int) -> int:
        """Tokens the summary message costs in a request (pure: the store's thread runs it)."""
        return self._prefix_tokens + tokens + MESSAGE_OVERHEAD

    @staticmethod
    def summary_text(summary: MemorySummary) -> str:
        """The content of the system message that carries ``summary``."""
        return SUMMARY_PREFIX + summary.text

    # --- after an ask

    def after_turn(
        self,
        ref: ConversationRef,
        head: ConversationHead,
        turn: TurnPosition,
        pending: int | None,
        *,
        caller: Caller,
        model: str,
        first: tuple[str, str] | None,
    ) -> None:
        """Start what a stored turn makes due: a summary update when ``pending`` (tokens the next
        ask would leave out unsummarized; None: not summarizing) reaches the threshold, a
        title for a ``first`` turn (its prompt and answer) of a conversation without one.

        Only starts jobs in the service's nursery (none when it is not running): never
        raises, never waits.
        """
        background = self._service.background
        self._index_due.set()
        if pending is not None and pending >= self.threshold(head.settings):
            self._due[ref] = _Due(turn, caller, model)
            background.spawn(("summary", ref), lambda: self._update_summary(ref), "summary")
        if first is not None and self.settings.auto_title and head.settings.title is None:
            background.spawn(
                ("title", ref), lambda: self._name(ref, *first, caller, model), "title"
            )

    async def _update_summary(self, ref: ConversationRef) -> None:
        """The summary updates of ``ref`` (see the module docstring), the one asked for last
        first, then any asked for while it ran. A failure is logged and ends the job (the
        next turn stored asks again); cancelled, nothing more is stored."""
        while (due := self._due.pop(ref, None)) is not None:
            caller = due.caller.with_protocol("summary")
            model = self._summary_model(due.model)
            try:
                async with self._service._hold(ref):
                    await self._fold(ref, due.last, caller, model, keep=None)
            except ChatError as exc:
                log.warning(
                    "summary of conversation %s failed (%s: %s); retried after its next turn",
                    ref.conversation_id,
                    exc.code,
                    exc.message,
                )
                return

    def _summary_model(self, asked: str) -> str:
        """SUMMARY_MODEL (an alias of MODELS gives its provider model), else ``asked``."""
        configured = self.settings.summary_model
        if configured is None:
            return asked
        try:
            return self._service.models.choose(configured, None)
        except ModelNotAllowed:
            return configured  # the operator's choice, not a client's: not held to MODELS

    # --- summaries

    async def _fold(
        self,
        ref: ConversationRef,
        last: TurnPosition,
        caller: Caller,
        model: str,
        *,
        keep: int | None,
    ) -> MemorySummary | None:
        """Fold the turns of the path to ``last`` into its newest summary, under the
        conversation's lock (the caller holds it); the summary after (None: none).

        ``keep`` None: the turns the next ask would leave out; else all but the
        newest ``keep``. Each model call folds what fits in its own request;
        up to SUMMARY_ROUNDS calls. Raises ChatError (the model's, the store's).
        """
        service = self._service
        head = await service.storage.conversation_head(ref, last.turn_id)
        if head is None or head.parent is None:
            return None  # the turn is gone
        summary: MemorySummary | None = None
        for _ in range(SUMMARY_ROUNDS):
            summary, turns = await service.storage.path_since_summary(ref, last, SUMMARY_READ_TURNS)
            fold = self._to_fold(head, summary, turns, keep)
            if not fold:
                return summary
            summary = await self._summarize(ref, summary, fold, caller, model, head.settings)
        return summary

    def _to_fold(
        self,
        head: ConversationHead,
        summary: MemorySummary | None,
        turns: list[PathTurn],
        keep: int | None,
    ) -> list[PathTurn]:
        """The oldest turns of ``turns`` (those after ``summary``) to fold in one call."""
        settings = head.settings
        if keep is not None:
            folded = turns[: max(len(turns) - keep, 0)]
        else:
            # What the next ask keeps: the newest turns that fit the budget left by the system
            # prompt, an empty prompt and the summary at its largest.
            system = head.system_prompt
            system_tokens = head.system_tokens if system is not None else None
            if system is None and self.settings.first_prompt is not None:
                system_tokens = self._service.first_prompt_tokens
            room = (
                self.context_tokens(settings)
                - (self.settings.max_response_tokens or 0)
                - MESSAGE_OVERHEAD
                - REPLY_PRIMING
                - ((system_tokens or 0) + MESSAGE_OVERHEAD if system_tokens is not None else 0)
                - self.summary_cost(self.summary_max_tokens(settings))
            )
            kept = 0
            for path_turn in reversed(turns):
                room -= turn_cost(path_turn.turn)
                if room < 0:
                    break
                kept += 1
            folded = turns[: len(turns) - kept]
        # One call's material: what fits the server's window with the instruction, the summary
        # so far and the answer (at least one turn).
        room = (
            self.settings.max_context_tokens
            - self._instruction_tokens
            - (summary.tokens if summary else 0)
            - self.summary_max_tokens(settings)
            - 2 * MESSAGE_OVERHEAD
            - REPLY_PRIMING
        )
        chunk: list[PathTurn] = []
        for path_turn in folded:
            room -= turn_cost(path_turn.turn)
            if room < 0 and chunk:
                break
            chunk.append(path_turn)
        return chunk

    def material(self, summary: MemorySummary | None, turns: Sequence[StoredTurn]) -> str:
        """The user message of a summary call: the summary so far, then the turns to fold."""
        parts = ["Summary so far:", summary.text if summary else "(none yet)", ""]
        parts.append("Next part of the conversation:")
        for turn in turns:
            if turn.prompt:
                parts.append(f"User: {turn.prompt}")
            if turn.answer:
                parts.append(f"Assistant: {turn.answer}")
        return "\n".join(parts)

    async def _summarize(
        self,
        ref: ConversationRef,
        summary: MemorySummary | None,
        fold: list[PathTurn],
        caller: Caller,
        model: str,
        settings: ConversationSettings,
    ) -> MemorySummary:
        """One summary call folding ``fold`` into ``summary``; the new summary, stored at the
        last turn folded. Raises ChatError; cancelled, nothing is stored."""
        budget_chars = 4 * self.settings.max_context_tokens  # a single huge turn is cut
        turns = [_cut(path_turn.turn, budget_chars) for path_turn in fold]
        messages = [
            {"role": "system", "content": self.summary_prompt},
            {"role": "user", "content": self.material(summary, turns)},
        ]
        text, usage = await self._call(
            ref, messages, model, self.summary_max_tokens(settings), caller
        )
        text = text.strip()
        if not text:
            raise UpstreamError("the model wrote an empty summary")
        made = MemorySummary(
            text=text,
            tokens=await self._service.counter.text_off_loop(text),
            end=fold[-1].position,
            model=model,
            updated_at=time.time(),
        )
        if not await self._service.storage.store_summary(ref, made, usage):
            raise NotFound("the summarized turns are gone")
        return made

    async def _call(
        self,
        ref: ConversationRef,
        messages: list[dict[str, str]],
        model: str,
        max_tokens: int,
        caller: Caller,
    ) -> tuple[str, tuple[int, int]]:
        """Ask the model for a whole answer, accounted as an ask of ``caller``'s protocol
        (summary, title): its access line and metrics, the key's limits and usage. Raises
        ChatError (a refusal of the key's limits included); cancelled, the call is closed and
        nothing is charged."""
        service = self._service
        record = AskRecord(
            service.metrics,
            protocol=caller.protocol,
            request_id=caller.request_id,
            conversation_id=ref.conversation_id,
            key_name=caller.key_name,
        )
        call = UpstreamCall(
            messages=messages, model=model, temperature=SUMMARY_TEMPERATURE, max_tokens=max_tokens
        )
        pieces: list[str] = []
        completion: Completion | None = None
        try:
            # The key's limits and usage, as for an ask: refused (over its rate or budget), the
            # call is not made; its tokens are charged to the key.
            ticket = await service.admit(caller)
            async for item in service.upstream.stream(call):
                if isinstance(item, Completion):
                    completion = item
                elif isinstance(item, Answering):
                    record.answered_by(item.upstream)
                else:
                    record.first_piece()
                    pieces.append(item)
            text = "".join(pieces)
            sent = sum(service.counter.message(m["content"]) for m in messages) + REPLY_PRIMING
            prompt_tokens = (
                completion.prompt_tokens
                if completion is not None and completion.prompt_tokens is not None
                else sent
            )
            completion_tokens = (
                completion.completion_tokens
                if completion is not None and completion.completion_tokens is not None
                else await service.counter.text_off_loop(text)
            )
            record.answered(prompt_tokens, completion_tokens)
            answered = completion.model if completion is not None and completion.model else model
            await service.charge(ticket, answered, prompt_tokens, completion_tokens)
        except BaseException as exc:
            record.failed(exc)
            raise
        finally:
            record.close()
        return text, (prompt_tokens, completion_tokens)

    async def compact(
        self, conversation_id: str, *, caller: Caller, keep: int = 0
    ) -> MemorySummary | None:
        """Fold the head's path, but its newest ``keep`` turns, into its summary now.

        Raises InvalidInput (memory is not summarize, a bad ``keep``), NotFound,
        the model's ChatError (nothing is stored then). Runs in the caller's
        task, holding the conversation's lock: cancelled, the call in progress
        is closed and its summary not stored (earlier rounds stay).
        """
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise InvalidInput("keep must be a whole number of at least 0")
        service = self._service
        ref = service._ref(conversation_id, caller)
        async with service._hold(ref):
            head = await self._live_head(ref)
            self._check_summarizing(head)
            if head.parent is None:
                raise InvalidInput("the conversation has no turn to summarize")
            asking = caller.with_protocol("summary")
            model = self._summary_model(self._conversation_model(head, caller))
            return await self._fold(ref, head.parent, asking, model, keep=keep)

    async def summary(self, conversation_id: str, *, caller: Caller) -> MemorySummary | None:
        """The newest summary on the head's path (None: none yet). Raises InvalidInput, NotFound
        or StorageUnavailable; a cancelled read changes nothing."""
        service = self._service
        ref = service._ref(conversation_id, caller)
        async with service._locks.hold(ref):
            head = await self._live_head(ref)
            if head.parent is None:
                return None
            return await service.storage.newest_summary(ref, head.parent)

    async def set_summary(
        self, conversation_id: str, text: str, *, caller: Caller
    ) -> MemorySummary:
        """Replace the text of the newest summary on the head's path (none: a summary of the
        whole path to the head); the next ask sends it as given. Raises InvalidInput (memory
        is not summarize, no turn, a bad text), NotFound or StorageUnavailable; cancelled,
        the write once started still finishes."""
        from .service import checked_text

        if not isinstance(text, str) or not checked_text("summary", text).strip():
            raise InvalidInput("summary must be a non-empty string")
        service = self._service
        ref = service._ref(conversation_id, caller)
        tokens = await service.counter.text_off_loop(text)
        async with service._hold(ref):
            head = await self._live_head(ref)
            self._check_summarizing(head)
            if head.parent is None:
                raise InvalidInput("the conversation has no turn to summarize")
            newest = await service.storage.newest_summary(ref, head.parent)
            end = newest.end if newest is not None else head.parent
            made = MemorySummary(text, tokens, end, "", time.time())
            await service.storage.store_summary(ref, made, (0, 0))
            return made

    async def _live_head(self, ref: ConversationRef) -> ConversationHead:
        head = await self._service.storage.conversation_head(ref)
        if head is None or head.updated_at is None or self.expired(head.settings, head.updated_at):
            raise NotFound(f"no conversation {ref.conversation_id!r}")
        return head

    def _check_summarizing(self, head: ConversationHead) -> None:
        if self.policy(head.settings) != "summarize":
            raise InvalidInput(
                "this conversation's memory is truncate: set it to summarize"
                " (PUT /conversations/{id}/settings) to keep a summary"
            )

    def _conversation_model(self, head: ConversationHead, caller: Caller) -> str:
        return self._service.model_for(head.settings.model, caller=caller)

    # --- titles

    async def _name(
        self, ref: ConversationRef, prompt: str, answer: str, caller: Caller, model: str
    ) -> None:
        """Ask the model for the conversation's title and keep it unless one was set meanwhile.

        A failure is logged (no title); cancelled, nothing is stored.
        """
        asking = caller.with_protocol("title")
        messages = [
            {"role": "system", "content": self.title_prompt},
            {
                "role": "user",
                "content": f"User: {prompt[:TITLE_INPUT_CHARS]}\n"
                f"Assistant: {answer[:TITLE_INPUT_CHARS]}",
            },
        ]
        try:
            text, usage = await self._call(
                ref, messages, self._summary_model(model), TITLE_MAX_TOKENS, asking
            )
            title = clean_title(text)
            if title is not None:
                await self._service.storage.set_title(ref, title, usage)
        except ChatError as exc:
            log.warning(
                "naming conversation %s failed (%s: %s)", ref.conversation_id, exc.code, exc.message
            )

    # --- settings

    async def set_settings(
        self, conversation_id: str, changes: Mapping[str, Any], *, caller: Caller
    ) -> ConversationSummary:
        """Change the settings named in ``changes`` (SETTING_NAMES; None: back to the server's),
        creating the conversation; the conversation after.

        Raises InvalidInput (an unknown name, a bad value), ModelNotAllowed (a
        model the caller may not ask) or Unauthenticated, before anything is
        written. Cancelled, the write once started still finishes.
        """
        from .service import checked_text

        service = self._service
        ref = service._ref(conversation_id, caller)
        columns: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in SETTING_NAMES:
                raise InvalidInput(
                    f"unknown setting {name!r}; settings: {', '.join(SETTING_NAMES)}"
                )
            columns.update(await self._column(name, value, caller, checked_text))
        async with service._hold(ref):
            return await service.storage.set_settings(ref, columns)

    async def _column(
        self, name: str, value: Any, caller: Caller, checked_text: Any
    ) -> dict[str, Any]:
        """The column(s) a setting is stored as; raises InvalidInput (ModelNotAllowed)."""
        if value is None:
            return (
                {"system_prompt": None, "system_tokens": None} if name == "system" else {name: None}
            )
        if name == "model":
            if not checked_text("model", value).strip():
                raise InvalidInput("model must be a non-empty string")
            self._service.model_for(value, caller=caller)  # refused now, as an ask would be
            return {"model": value}
        if name == "temperature":
            if not _number(value) or not 0 <= value <= 2:
                raise InvalidInput("temperature must be a number between 0 and 2")
            return {"temperature": float(value)}
        if name == "max_context_tokens":
            ceiling = self.settings.max_context_tokens
            floor = (self.settings.max_response_tokens or 0) + 16
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not floor <= value <= ceiling
            ):
                raise InvalidInput(
                    f"max_context_tokens must be a whole number from {floor} to {ceiling}"
                    " (MAX_CONTEXT_TOKENS)"
                )
            return {"max_context_tokens": value}
        if name == "memory":
            if value not in POLICIES:
                raise InvalidInput("memory must be truncate or summarize")
            return {"memory": value}
        if name == "system":
            if not checked_text("system", value):
                return {"system_prompt": None, "system_tokens": None}
            tokens = await self._service.counter.text_off_loop(value)
            return {"system_prompt": value, "system_tokens": tokens}
        if name == "title":
            title = " ".join(checked_text("title", value).split())
            if len(title) > MAX_TITLE_CHARS:
                raise InvalidInput(f"title must be at most {MAX_TITLE_CHARS} characters")
            return {"title": title or None}
        # expires_in
        if not _number(value) or not 0 <= value <= MAX_EXPIRES_IN:
            raise InvalidInput(
                f"expires_in must be a number of seconds from 0 (never) to {MAX_EXPIRES_IN:.0f}"
            )
        return {"expires_in": float(value)}

    # --- search

    @staticmethod
    def query_terms(query: object) -> list[str]:
        """The terms of a search query (split at blanks); raises InvalidInput."""
        if not isinstance(query, str) or "\x00" in query:
            raise InvalidInput("q must be text")
        if len(query) > MAX_QUERY_CHARS:
            raise InvalidInput(f"q must be at most {MAX_QUERY_CHARS} characters")
        terms = query.split()
        if not terms:
            raise InvalidInput("q must hold a word to search for")
        if len(terms) > MAX_QUERY_TERMS:
            raise InvalidInput(f"q may hold at most {MAX_QUERY_TERMS} words")
        return terms

    async def index_forever(self) -> None:
        """Index new turns for search (SQLite; see storage.sql_memory.index_pending) from the
        start and INDEX_DELAY seconds after turns are stored, INDEX_BATCH turns per
        transaction, each followed by a pause as long as it took while a backlog remains
        (turns written from outside: an import, a copied database), so that asks' writes come
        first. A store failure is logged and tried again
        with the next turn; cancellation stops it (a batch once started finishes)."""
        storage = self._service.storage
        while True:
            try:
                while True:
                    started = trio.current_time()
                    if await storage.index_pending(None, INDEX_BATCH) < INDEX_BATCH:
                        break
                    # A backlog (turns stored from outside: an import, a copied database): as
                    # long a pause as the batch took, so the asks' writes come first.
                    await trio.sleep(trio.current_time() - started)
            except StorageUnavailable as exc:
                log.warning("indexing new turns for search failed: %s", exc.message)
            await self._index_due.wait()
            self._index_due = trio.Event()
            await trio.sleep(INDEX_DELAY)

    # --- expiry

    async def sweep_forever(self) -> None:
        """Every SWEEP_INTERVAL seconds, delete the expired conversations, a batch per
        transaction (asks run between batches). A store failure is logged; the next sweep
        tries again. Cancellation stops it between or during a batch (a batch once started
        finishes: the store's transactions do)."""
        while True:
            await trio.sleep(self.settings.sweep_interval)
            await self.sweep()

    async def sweep(self) -> int:
        """One sweep (see :meth:`sweep_forever`); the conversations deleted."""
        service = self._service
        locks = service._locks
        total = 0
        try:
            while True:
                deleted = await service.storage.sweep_expired(
                    self.now(),
                    self.ttl,
                    SWEEP_BATCH,
                    lambda owner, cid: ConversationRef(owner, cid) in locks,
                )
                total += deleted
                if deleted < SWEEP_BATCH:
                    break
                await trio.lowlevel.checkpoint()
        except StorageUnavailable as exc:
            log.warning("the expiry sweep failed: %s", exc.message)
        if total:
            log.info("forgot %d expired conversation%s", total, "" if total == 1 else "s")
        return total


def clean_title(text: str) -> str | None:
    """A generated title: its first non-empty line, without quotes or a final full stop, at
    most TITLE_CHARS characters; None if nothing is left."""
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    line = line.strip("\"'“”‘’「」《》 ").rstrip("。.")
    line = " ".join(line.split())
    if len(line) > TITLE_CHARS:
        line = line[: TITLE_CHARS - 1].rstrip() + "…"
    return line or None


def _cut(turn: StoredTurn, chars: int) -> StoredTurn:
    """``turn`` with its prompt and answer at most ``chars`` characters each (the material)."""
    if len(turn.prompt) <= chars and len(turn.answer) <= chars:
        return turn
    return dataclasses.replace(turn, prompt=turn.prompt[:chars], answer=turn.answer[:chars])


def _number(value: object) -> bool:
    return (
        not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)  # type: ignore[arg-type]
    )
