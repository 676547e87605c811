"""The chat core: one ask, from validation to the stored turn. Transports only adapt it.

:meth:`ChatService.ask` is an async generator of :class:`Delta` events and one
final :class:`End`. Use it as ``async with contextlib.aclosing(service.ask(r))``
so that a consumer that stops early (client gone) closes it at once.

Guarantees (SPEC §3):

- asks on one conversation run one at a time, in arrival order (a fair lock
  per conversation, held until the turn is stored); other conversations run
  in parallel;
- a finished answer is stored as one turn, atomically;
- when the consumer is cancelled or closes the generator mid-answer, the
  upstream call is closed and the partial answer is stored with finish reason
  ``cancelled`` (nothing if no piece was delivered). Only delivered pieces are
  stored: a piece counts once the consumer comes back for the next event, that
  is once the transport's send of it returned; the piece being sent when the
  client went away (or a shutdown cut the answer) is left out;
- an answer is cut after ``MAX_ANSWER_CHARS`` characters: the upstream call is
  closed there and the answer ends with finish reason ``length``, its turn
  holding exactly the text sent;
- when the upstream fails, nothing is stored and the error is raised.

Long texts (a prompt, an answer) are counted in a worker thread, so counting
never holds up the event loop (see :meth:`TokenCounter.text_off_loop`).

Errors are raised as :class:`~easybackend.errors.ChatError` subclasses.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import re
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

import trio

from ..errors import (
    INTERNAL_MESSAGE,
    ChatError,
    InternalError,
    InvalidInput,
    NotFound,
    PromptTooLong,
    StorageUnavailable,
    TooManyRequests,
)
from ..governance.keys import KeyStore
from ..governance.limits import Limits, Ticket, checked_user
from ..governance.models import ModelEntry, ModelList
from ..metrics import Metrics
from ..settings import Settings
from ..storage import (
    AnswerProgress,
    ConversationDetail,
    ConversationHead,
    ConversationRef,
    ConversationSummary,
    NewTurn,
    ServingStore,
    StoredTurn,
    TurnPosition,
    TurnRecord,
)
from ..storage.base import NO_SETTINGS, ROOT, ConversationSettings, MemoryContext
from ..storage.sql import new_turn_id
from ..upstream.openai_client import Answering, Completion, OpenAIUpstream, UpstreamCall
from .accounting import CANCELLED, AskRecord, is_cancellation, record_for, record_refusal
from .answers import CANCELLED as ANSWER_CANCELLED
from .answers import COMPLETED, FAILED, AnswerLog, AnswerLogs, BackgroundAnswers
from .background import Background
from .caller import Caller, Callers
from .context import Budget, build_messages, turn_cost
from .events import Delta, End, Event, Start, Usage, begun, piece_lengths, replay
from .in_progress import AnswersInProgress
from .locks import KeyedLock
from .memory import Memory
from .tokens import TokenCounter
from .tree import validate_turn_id
from .webhooks import Webhooks

log = logging.getLogger("easybackend.answers")
CONVERSATION_ID = re.compile(r"[A-Za-z0-9_\-.:]{1,128}")
READY_TIMEOUT = 2.0  # seconds the store may take to answer a readiness check
MAX_PAGE = 200  # conversations per page of a listing
# How long storing a cancelled turn may take once the ask is already cancelled.
STORE_ON_CANCEL_SECONDS = 5.0
# A background answer on PostgreSQL is marked in progress for at most UPSTREAM_TIMEOUT +
# SHUTDOWN_GRACE + this many seconds; a reattach on another instance reads the store for its
# turn every ELSEWHERE_POLL seconds meanwhile, and the instance generating it reads as often
# the cancels asked of it elsewhere.
MARK_SPARE = 60.0
ELSEWHERE_POLL = 0.5
# Seconds a read of a conversation waits for the answer in progress on it in this process: one
# just cancelled or ended is stored by then (a client that reads right after it left sees it);
# a long one (a background answer) is not waited for, the store is read as it is.
READ_WAIT = 1.0


def _progress(log: AnswerLog) -> tuple[ConversationRef, str, AnswerProgress]:
    """What a background answer's mark holds of it so far (see ChatService.elsewhere_forever)."""
    pieces = [event.text for event in log.events if isinstance(event, Delta)]
    start = log.events[0] if log.events else None
    model = start.model if isinstance(start, Start) else ""
    progress = AnswerProgress("".join(pieces), piece_lengths(pieces), model)
    return ConversationRef(log.owner, log.conversation_id), log.turn_id, progress


def validate_conversation_id(conversation_id: object) -> str:
    """Return the id if it is 1-128 characters of ``A-Z a-z 0-9 _ - . :``, else raise InvalidInput."""
    if not isinstance(conversation_id, str) or not CONVERSATION_ID.fullmatch(conversation_id):
        raise InvalidInput(
            "conversation_id must be 1-128 characters of A-Z, a-z, 0-9, '_', '-', '.', ':'"
        )
    return conversation_id


def _shown_id(conversation_id: object) -> str:
    """The conversation id as the access line shows it: "-" unless it is a valid id."""
    shown = "" if conversation_id is None else str(conversation_id)
    return shown if CONVERSATION_ID.fullmatch(shown) else "-"


# How an answer cut at MAX_ANSWER_CHARS ends: finish reason ``length`` (what OpenAI reports for an
# answer cut by a cap), no model or usage from the provider (the turn gets the requested model and
# our own counts).
ANSWER_CUT = Completion("length", model=None, prompt_tokens=None, completion_tokens=None)


def checked_text(field: str, value: object) -> str:
    """``value`` if it is text the store and the upstream can take, else raise InvalidInput naming ``field``.

    The one rule for every text a client sends (prompt, system prompts, model):
    a string, without NUL (PostgreSQL cannot store it), that UTF-8 can encode
    (no lone surrogates, which a JSON ``\\ud800`` escape can make). Checked
    before any upstream call, so a refused text costs nothing upstream.
    """
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a string")
    if "\x00" in value:
        raise InvalidInput(f"{field} must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(
            f"{field} must be valid Unicode text (it holds a lone surrogate, which UTF-8 cannot encode)"
        ) from None
    return value


# The finish reason of a turn the client gave whole (GivenTurn): no model wrote its answer.
GIVEN = "given"


@dataclasses.dataclass(frozen=True, slots=True)
class GivenTurn:
    """A turn the client gives whole, stored without calling the model: a user message and the
    answer it had, either of which may be empty (a lone message).

    What conversation items and a response's earlier input messages become.
    An empty half is left out of the context sent upstream (see
    :func:`~.context.build_messages`). Stored with model ``""``, finish reason
    :data:`GIVEN` and no usage.
    """

    prompt: str
    answer: str
    turn_id: str | None = None  # its id (storage.sql.new_turn_id) when the caller must know it
    extra: str | None = None  # JSON kept with it (TurnRecord.extra)


@dataclasses.dataclass(frozen=True, slots=True)
class AskRequest:
    """One ask, as every transport hands it to the core.

    ``caller`` (who asks: owner, key, protocol, request id, address) has no
    default: a transport makes it with :meth:`ChatService.caller`.
    """

    conversation_id: str
    prompt: str
    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    system: str | None = None  # this turn only, instead of the conversation's system prompt
    # Where the new turn goes (SPEC §12): a child of this turn, "root" for a new first turn,
    # None for a child of the head.
    parent_id: str | None = None
    # A regenerate: the turn whose prompt is asked again, as a new sibling of it (``prompt``
    # and ``parent_id`` are then not used: the prompt is that turn's, the parent its parent's).
    regenerate: str | None = None
    # The new turn's id when the transport must name it before the answer ends (a response
    # that can be cancelled while in progress); made with storage.sql.new_turn_id. A new one
    # by default.
    turn_id: str | None = None
    store: bool = True  # False: answer from the conversation's context, keep nothing
    extra: str | None = None  # JSON the transport keeps with the turn (TurnRecord.extra)
    # Turns the client gave before the prompt (a response's earlier input messages): the
    # newest history sent, and (with store) stored as the chain from the parent to the new
    # turn, in the transaction that stores it.
    preceding: tuple[GivenTurn, ...] = ()
    # False: an ask whose whole path (and preceding turns) does not fit the context window is
    # refused with PromptTooLong instead of sent without its oldest turns.
    truncate: bool = True
    top_p: float | None = None  # nucleus sampling, sent to the model when given
    # The end user the ask is for (a bot's user, within its key): what USER_RPM counts apart.
    user: str | None = None
    # Keep answering when the client goes away (SPEC §18): see ChatService.ask_in_background.
    background: bool = False
    caller: Caller = dataclasses.field(kw_only=True)


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    """A whole answer, for non-streaming transports."""

    text: str
    end: End


class ChatService:
    """Answers asks with conversation memory. One instance serves every transport."""

    def __init__(
        self,
        settings: Settings,
        storage: ServingStore,
        upstream: OpenAIUpstream,
        counter: TokenCounter,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.storage = storage
        self.upstream = upstream
        self.counter = counter
        # The stored keys' in-process copy (app.py runs its refresh) and the model allow-list.
        self.keys = KeyStore(storage, env_names=settings.api_keys)  # type: ignore[arg-type]
        self.callers = Callers(settings, self.keys)
        self.models = ModelList(settings.models, settings.model)
        # The keys' windows, budgets and usage (governance/limits.py; app.py runs its task).
        self.limits = Limits(
            storage,  # type: ignore[arg-type]
            metrics,
            user_rpm=settings.user_rpm,
            shared=settings.database.is_postgres,
        )
        # Who is calling, from what a transport was given; raises Unauthenticated
        # (see Callers.caller). Every other method takes the Caller it returns.
        self.caller = self.callers.caller
        self._locks = KeyedLock()
        # Answers another request may cancel by their turn id (see chat/in_progress.py).
        self.in_progress = AnswersInProgress()
        # The numbered events of the answers in progress, which clients may follow, and the
        # nursery of the background answers app.py runs (see chat/answers.py).
        self.answer_logs = AnswerLogs()
        self.background_answers = BackgroundAnswers()
        self.webhooks = Webhooks(settings)  # told when a background answer ends; app.py runs it
        self._streams: collections.Counter[str] = (
            collections.Counter()
        )  # answers in progress per key or client address (see _admitted)
        self.first_prompt_tokens = (
            counter.text(settings.first_prompt) if settings.first_prompt is not None else None
        )
        # Work off the critical path (summaries, titles, the expiry sweep), in a nursery app.py
        # runs (Background.run); the memory policy (settings per conversation, summaries, expiry).
        self.background = Background(settings.background_jobs)
        self.memory = Memory(self)
        self.background.add_loop(self.memory.sweep_forever)
        self.background.add_loop(self.memory.index_forever)
        if settings.database.is_postgres:  # the cancels another instance was asked for
            self.background.add_loop(self.elsewhere_forever)

    def refused(
        self,
        error: ChatError,
        *,
        protocol: str,
        request_id: str,
        conversation_id: object = None,
        caller: Caller | None = None,
    ) -> None:
        """Account for an ask a transport refused before :meth:`ask` took it.

        The one call every transport makes for such a refusal (a wrong key, a
        full queue, a shutdown, a body it could not read): the ask gets its
        access line and its metrics, as one :meth:`ask` refuses does.
        ``caller`` is given when it was made (its key name is logged).
        """
        record_refusal(
            self.metrics,
            error,
            protocol=protocol,
            request_id=request_id,
            conversation_id=_shown_id(conversation_id),
            key_name=caller.key_name if caller is not None else None,
        )

    def model_for(self, requested: str | None, *, caller: Caller) -> str:
        """The provider model an ask naming ``requested`` (None: none) calls for ``caller``.

        The one check of a model, for every protocol, before anything is sent
        upstream: a name outside MODELS, or outside the caller's key's own list,
        raises ModelNotAllowed; an alias gives its provider model. The key is
        taken as it stands now (see :meth:`Callers.current`): one revoked,
        disabled or expired since the caller was made raises Unauthenticated.
        """
        grant = self.callers.current(caller).grant
        return self.models.choose(requested, grant.models if grant is not None else None)

    async def admit(self, caller: Caller, user: object = None) -> Ticket:
        """Take the ask's place in the limits of ``caller``'s key and of its end user ``user``.

        The one check of the limits, for every protocol (asks and the /v1 relay), after
        the input and the model are checked and before anything is sent upstream. Raises
        InvalidInput (``user`` is no end-user id), RateLimited, BudgetExhausted,
        Unauthenticated (the key no longer works) or StorageUnavailable (the shared
        windows cannot be read). Cancelled on PostgreSQL, the windows may have been taken.
        """
        user = checked_user(user)
        grant = self.callers.current(caller).grant
        return await self.limits.admit(grant, caller.key_name, user)

    async def charge(self, ticket: Ticket, model: str, prompt: int, completion: int) -> None:
        """Count the tokens of an ask that ended (answered, or cancelled with a partial answer)
        in its key's usage, budgets and tokens window. Shielded from cancellation, bounded by
        STORE_ON_CANCEL_SECONDS; never raises for the database (see Limits.charge)."""
        with trio.CancelScope(shield=True), trio.move_on_after(STORE_ON_CANCEL_SECONDS):
            await self.limits.charge(ticket, model, prompt, completion)

    def allowed_models(self, *, caller: Caller) -> list[ModelEntry]:
        """The models ``caller`` may name: MODELS and its key's own list together, in order (the
        key as it stands now; raises Unauthenticated when it no longer works)."""
        grant = self.callers.current(caller).grant
        return self.models.allowed(grant.models if grant is not None else None)

    def default_model(self, *, caller: Caller) -> ModelEntry | None:
        """The model an ask of ``caller`` that names none gets; None if it may use none (the key
        as it stands now; raises Unauthenticated when it no longer works)."""
        grant = self.callers.current(caller).grant
        return self.models.default_for(grant.models if grant is not None else None)

    @staticmethod
    def _check_overrides(request: AskRequest) -> None:
        """The per-ask overrides, whichever transport they came from; raises InvalidInput."""
        if request.model is not None and not checked_text("model", request.model).strip():
            raise InvalidInput("model must be a non-empty string")
        temperature = request.temperature
        if temperature is not None and (
            isinstance(temperature, bool)
            or not isinstance(temperature, int | float)
            or not 0 <= temperature <= 2
        ):
            raise InvalidInput("temperature must be a number between 0 and 2")
        max_tokens = request.max_tokens
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0
        ):
            raise InvalidInput("max_tokens must be a positive whole number")
        if request.system is not None:
            checked_text("system", request.system)
        top_p = request.top_p
        if top_p is not None and (
            isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 <= top_p <= 1
        ):
            raise InvalidInput("top_p must be a number between 0 and 1")

    def _checked_prompt(self, prompt: object) -> str:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidInput("prompt must be a non-empty string")
        if len(prompt) > self.settings.max_prompt_chars:
            raise PromptTooLong(
                f"the prompt has {len(prompt)} characters; the limit is {self.settings.max_prompt_chars}"
            )
        checked_text("prompt", prompt)
        if self.settings.strip_blank_lines:
            prompt = "\n".join(line for line in prompt.splitlines() if line.strip())
        return prompt

    async def ask(self, request: AskRequest) -> AsyncIterator[Event]:
        """Answer one ask: yields one Start once the model took the call, Delta events, then
        one End once the turn is stored, numbered from 1 (``seq``); a client may follow them
        from elsewhere meanwhile (:meth:`follow`).

        Raises ChatError subclasses. Cancellation or an early close stores the
        partial answer as ``cancelled`` (see the module docstring). Every ask,
        whatever its end, gets one access log line and its metrics.
        """
        record = record_for(self.metrics, request.caller, _shown_id(request.conversation_id))
        bill = _Bill()
        answer: AnswerLog | None = None  # its numbered events, from its Start on
        try:
            async with contextlib.aclosing(self._answer(request, record, bill)) as events:
                async for event in events:
                    if answer is None:  # the Start: from now on the answer can be followed
                        answer = self.answer_logs.open(
                            request.caller.owner, event.conversation_id, event.turn_id,
                            request.background,
                        )  # fmt: skip
                    answer.add(event)
                    if isinstance(event, Delta):
                        record.first_piece()
                    elif isinstance(event, End):
                        record.answered(event.usage.prompt_tokens, event.usage.completion_tokens)
                        await self._bill(bill, event.model, record)  # before the client sees it
                        answer.end(COMPLETED)
                    yield event
        except BaseException as exc:
            record.failed(exc)
            await self._bill(bill, bill.model, record)  # a cancelled answer's partial turn
            if answer is not None and not answer.ended:
                if is_cancellation(exc):
                    if bill.cut is not None:  # its partial turn is stored: followers see its end
                        answer.add(dataclasses.replace(bill.cut, seq=len(answer.events) + 1))
                    answer.end(ANSWER_CANCELLED)
                else:
                    failure = exc if isinstance(exc, ChatError) else InternalError(INTERNAL_MESSAGE)
                    answer.end(FAILED, failure)
            raise
        finally:
            if answer is not None:
                self.answer_logs.close(answer, stored=bill.stored or not request.store)
            record.close()

    async def _bill(self, bill: _Bill, model: str, record: AskRecord) -> None:
        """Charge the ask's tokens once, if it was admitted and cost any (see :meth:`charge`)."""
        if bill.ticket is None or bill.charged:
            return
        if not (record.prompt_tokens or record.completion_tokens):
            return
        bill.charged = True
        await self.charge(bill.ticket, model, record.prompt_tokens, record.completion_tokens)

    async def _answer(
        self, request: AskRequest, record: AskRecord, bill: _Bill
    ) -> AsyncIterator[Event]:
        ref = ConversationRef(
            request.caller.owner, validate_conversation_id(request.conversation_id)
        )
        regenerate = request.regenerate
        if regenerate is None:
            prompt = self._checked_prompt(request.prompt)
            if request.parent_id is not None:
                validate_turn_id(request.parent_id, "parent_id", root=True)
        else:
            validate_turn_id(regenerate, "turn_id")
            if request.parent_id is not None:
                raise InvalidInput("a regenerate takes no parent_id: its parent is the turn's")
        self._check_overrides(request)
        user = checked_user(request.user)
        model = self.model_for(request.model, caller=request.caller)
        turn_id = request.turn_id
        turn_id = new_turn_id() if turn_id is None else validate_turn_id(turn_id, "turn_id")
        prompt_tokens = await self.counter.text_off_loop(prompt) if regenerate is None else 0
        created_at = time.time()
        given = await self._counted_turns(request.preceding, created_at)

        with self._admitted(request):
            # The key's and the end user's limits, before the conversation's lock: an ask they
            # refuse is refused at once (it never waits for another answer of the conversation)
            # and never reaches the upstream.
            bill.ticket = await self.admit(request.caller, user)
            async with self._hold(ref, live=False):
                try:
                    # Read under the conversation's lock: its head and the new turn's parent,
                    # then the newest turns of the path to the parent that fit.
                    head = await self.storage.conversation_head(
                        ref, request.parent_id, sibling_of=regenerate
                    )
                    named = regenerate if regenerate is not None else request.parent_id
                    if head is not None and self.memory.expired(head.settings, head.updated_at):
                        # Idle past its expiry: gone. A turn of it cannot be named; an ask
                        # starts anew.
                        memory = self.memory
                        await self.storage.forget_if_expired(ref, memory.now(), memory.ttl)
                        head = ConversationHead(None, None, None) if named in (None, ROOT) else None
                    if head is None:
                        raise NotFound(f"no turn {named!r} in conversation {ref.conversation_id!r}")
                    if request.model is None and head.settings.model is not None:
                        model = self.model_for(head.settings.model, caller=request.caller)
                    if regenerate is not None:
                        original = await self.storage.find_turn(ref, regenerate)
                        assert original is not None  # found by conversation_head, under the lock
                        prompt, prompt_tokens = original.prompt, original.prompt_tokens
                    parent = head.parent
                    plan = await _ContextPlan.choose(self, request, prompt_tokens, head)
                    summarize = self.memory.policy(head.settings) == "summarize"
                    history, remembered = await self._history(
                        ref, request, parent, plan.budget.history, given, summarize=summarize
                    )
                    summary = remembered.summary if remembered is not None else None
                    messages = build_messages(
                        plan.system,
                        history,
                        prompt,
                        summary=self.memory.summary_text(summary) if summary else None,
                    )
                    call = self._upstream_call(request, messages, model, head.settings)
                except ChatError:  # refused by the conversation's own checks: it costs nothing
                    await self.limits.give_back(bill.ticket)
                    raise
                bill.model = model
                sent_tokens = plan.budget.fixed + sum(turn_cost(t) for t in history)
                if summary is not None:
                    sent_tokens += self.memory.summary_cost(summary.tokens)

                pieces: list[str] = []
                completion: Completion | None = None
                upstream = ""  # the upstream that answers, once one does
                seq = 0  # the last event's number (SPEC §18): the Start is 1
                try:
                    room = self.settings.max_answer_chars  # characters the answer may still take
                    async with contextlib.aclosing(self.upstream.stream(call)) as stream:
                        async for item in stream:
                            if type(item) is not str:
                                if isinstance(item, Answering):
                                    upstream = item.upstream
                                    record.answered_by(upstream)
                                    if not seq:  # the model took the call: the answer begins
                                        seq = 1
                                        yield Start(ref.conversation_id, turn_id, model=call.model)
                                else:
                                    completion = item
                                continue
                            if not seq:
                                seq = 1
                                yield Start(ref.conversation_id, turn_id, model=call.model)
                            if len(item) > room:  # cut at the cap; leaving closes the upstream
                                if room:
                                    seq += 1
                                    yield Delta(item[:room], seq)
                                    pieces.append(item[:room])
                                completion = ANSWER_CUT
                                break
                            room -= len(item)
                            seq += 1
                            yield Delta(item, seq)
                            pieces.append(item)  # delivered: the transport's send returned
                except BaseException:
                    if pieces and completion is None and is_cancellation(sys.exception()):
                        turn = await self._store_cancelled(
                            _Keep(ref, parent, turn_id, request, given),
                            call,
                            prompt,
                            prompt_tokens,
                            pieces,
                            sent_tokens,
                            created_at,
                            upstream,
                        )
                        record.tokens(turn.usage_prompt_tokens, turn.usage_completion_tokens)
                        bill.model = turn.model
                        bill.stored = request.store
                        bill.cut = End(  # what the answer's followers get as its end
                            ref.conversation_id,
                            turn.model,
                            CANCELLED,
                            Usage(turn.usage_prompt_tokens, turn.usage_completion_tokens),
                            turn_id,
                            (parent.depth if parent else 0) + len(given) + 1,
                        )
                    raise
                assert completion is not None
                if not seq:
                    seq = 1
                    yield Start(ref.conversation_id, turn_id, model=call.model)
                answer = "".join(pieces)
                turn = self._new_turn(
                    call,
                    prompt,
                    prompt_tokens,
                    pieces,
                    completion.finish_reason,
                    sent_tokens,
                    created_at,
                    completion,
                    answer_tokens=await self.counter.text_off_loop(answer),
                    upstream=upstream,
                )
                stored = await self._keep(_Keep(ref, parent, turn_id, request, given), turn)
                bill.stored = stored is not None
        if stored is not None:  # what the new turn makes due, off the critical path
            pending = None
            if remembered is not None:
                new_cost = turn_cost(
                    StoredTurn(0, prompt, prompt_tokens, answer, turn.answer_tokens)
                )
                spent = sent_tokens - plan.budget.fixed
                pending = remembered.dropped_tokens + max(0, spent + new_cost - plan.budget.history)
            self.memory.after_turn(
                ref,
                head,
                stored,
                pending,
                caller=request.caller,
                model=call.model,
                first=(prompt, answer) if parent is None and not given else None,
            )
        yield End(
            conversation_id=ref.conversation_id,
            model=turn.model,
            finish_reason=turn.finish_reason,
            usage=Usage(turn.usage_prompt_tokens, turn.usage_completion_tokens),
            turn_id=turn_id,
            turn=(parent.depth if parent else 0) + len(given) + 1,
            seq=seq + 1,
        )

    async def _keep(self, keep: _Keep, turn: NewTurn) -> TurnPosition | None:
        """Store ``turn`` where ``keep`` says (nothing for an ask that keeps nothing), after the
        ask's preceding turns, in one transaction; its position (None: not stored)."""
        if not keep.request.store:
            return None
        if keep.given:
            chain = [(new, given.turn_id, given.extra) for given, new in keep.given]
            chain.append((turn, keep.turn_id, keep.request.extra))
            return (await self.storage.append_turns(keep.ref, chain, keep.parent))[-1]
        return await self.storage.append_turn(
            keep.ref, turn, keep.parent, turn_id=keep.turn_id, extra=keep.request.extra
        )

    async def _counted_turns(
        self, turns: Sequence[GivenTurn], created_at: float
    ) -> list[tuple[GivenTurn, NewTurn]]:
        """Each given turn with the NewTurn it is stored as (texts checked and counted).

        Raises InvalidInput for a text the store cannot take or a turn with neither half.
        """
        counted = []
        for given in turns:
            checked_text("input", given.prompt)
            checked_text("input", given.answer)
            if not given.prompt and not given.answer:
                raise InvalidInput("a message must not be empty")
            if given.turn_id is not None:
                validate_turn_id(given.turn_id, "turn_id")
            new = NewTurn(
                prompt=given.prompt,
                prompt_tokens=await self.counter.text_off_loop(given.prompt),
                answer=given.answer,
                answer_tokens=await self.counter.text_off_loop(given.answer),
                model="",
                finish_reason=GIVEN,
                usage_prompt_tokens=0,
                usage_completion_tokens=0,
                created_at=created_at,
                finished_at=created_at,
                upstream="",
                pieces="",
            )
            counted.append((given, new))
        return counted

    async def _history(
        self,
        ref: ConversationRef,
        request: AskRequest,
        parent: TurnPosition | None,
        budget: int,
        given: list[tuple[GivenTurn, NewTurn]],
        *,
        summarize: bool = False,
    ) -> tuple[list[StoredTurn], MemoryContext | None]:
        """The turns sent before the prompt, oldest first: the newest that fit ``budget`` of the
        path to ``parent`` followed by the ask's preceding turns (the newest of all); with
        ``summarize``, the stored turns are those after the path's newest summary (which the
        MemoryContext returned holds, with what was left out), read in the same one query.

        Raises PromptTooLong when the request does not ``truncate`` and some turn is left out
        (a turn a summary covers is not left out).
        """
        fitting: list[StoredTurn] = []
        left = budget
        for _, new in reversed(given):
            turn = StoredTurn(0, new.prompt, new.prompt_tokens, new.answer, new.answer_tokens)
            if turn_cost(turn) > left:
                break
            left -= turn_cost(turn)
            fitting.append(turn)
        fitting.reverse()
        stored: list[StoredTurn] = []
        remembered: MemoryContext | None = None
        if parent is not None and len(fitting) == len(given):
            if summarize:
                remembered = await self.storage.memory_context(
                    ref, parent, left, turn_cost, self.memory.summary_cost
                )
                stored = remembered.turns
            else:
                stored = await self.storage.newest_turns(ref, parent, left, turn_cost)
        path = (parent.depth if parent else 0) + len(given)
        covered = remembered.summary.end.depth if remembered and remembered.summary else 0
        if not request.truncate and len(stored) + len(fitting) + covered < path:
            raise PromptTooLong(
                f"the conversation's {path} turns and the prompt do not fit the context window"
                f" (MAX_CONTEXT_TOKENS {self.settings.max_context_tokens}), and truncation is"
                " disabled"
            )
        return stored + fitting, remembered

    def _upstream_call(
        self,
        request: AskRequest,
        messages: list[dict[str, str]],
        model: str,
        own: ConversationSettings = NO_SETTINGS,
    ) -> UpstreamCall:
        """The call to ``model`` (the provider's, see :meth:`model_for`): the request's
        overrides, else the conversation's ``own`` settings, else the server's."""
        settings = self.settings
        temperature = request.temperature if request.temperature is not None else own.temperature
        return UpstreamCall(
            messages=messages,
            model=model,
            temperature=settings.temperature if temperature is None else temperature,
            max_tokens=request.max_tokens or settings.max_response_tokens,
            top_p=request.top_p,
        )

    @contextlib.contextmanager
    def _admitted(self, request: AskRequest) -> Iterator[None]:
        """Count an answer in progress for the asking client; raises TooManyRequests beyond the limit.

        The client is the request's key when keys are on (API_KEYS or stored keys),
        else its address (so one address cannot hold every slot). The slot is given
        back when the block ends, however it ends (cancellation included).
        """
        caller = request.caller
        if caller.key_name is not None:
            counted, who = f"key:{caller.owner}", "this key"
        else:
            counted, who = f"address:{caller.client}", f"the address {caller.client or '-'}"
        limit = self.settings.max_streams_per_key
        if self._streams[counted] >= limit:
            raise TooManyRequests(
                f"{who} already has {limit} answers in progress; retry when one ends"
            )
        self._streams[counted] += 1
        try:
            yield
        finally:
            self._streams[counted] -= 1
            if not self._streams[counted]:
                del self._streams[counted]

    async def ask_in_background(self, request: AskRequest) -> AnswerLog:
        """Start ``request`` as a background answer; its log, once the answer began (its Start).

        The answer runs in the service's nursery (chat/answers.py), not in the
        caller's task: it goes on, and is stored whole, when the caller is
        cancelled or its client goes away; the caller follows the log. It can be
        cancelled by :meth:`cancel_answer` (stored as ``cancelled``), and a
        shutdown cancels it after SHUTDOWN_GRACE. When it ends, the webhook is
        told (chat/webhooks.py). An error before the Start (a refused ask, the
        upstream refusing the call) is raised here, as :meth:`ask` raises it;
        ShuttingDown once a shutdown began; TooManyRequests beyond the
        background answers one process runs.
        """
        try:  # refused here, the ask is accounted as one a transport refuses
            self.background_answers.check()
            if not request.store:
                raise InvalidInput("a background ask is stored: it cannot have store false")
        except ChatError as exc:
            caller = request.caller
            self.refused(
                exc,
                protocol=caller.protocol,
                request_id=caller.request_id,
                conversation_id=request.conversation_id,
                caller=caller,
            )
            raise
        turn_id = request.turn_id
        turn_id = new_turn_id() if turn_id is None else validate_turn_id(turn_id, "turn_id")
        request = dataclasses.replace(request, turn_id=turn_id, background=True)
        owner = request.caller.owner
        ref = ConversationRef(owner, validate_conversation_id(request.conversation_id))
        # With several instances (PostgreSQL), the others learn that it is in progress.
        marked = self.settings.database.is_postgres

        async def answer(started: Callable[[AnswerLog], None]) -> None:
            log: AnswerLog | None = None
            if marked:
                bound = self.settings.upstream_timeout + self.settings.shutdown_grace
                await self.storage.mark_answer(ref, turn_id, time.time() + bound + MARK_SPARE)
            try:
                with self.in_progress.cancellable(owner, turn_id):
                    async with contextlib.aclosing(self.ask(request)) as events:
                        async for _ in events:
                            if log is None:
                                log = self.answer_logs.find(owner, turn_id)
                                assert log is not None  # opened by ask() at the Start
                                started(log)
            except ChatError:
                if log is None:
                    raise  # refused before it began: the caller reports it
                # else it is in the log, which its followers see
            finally:
                if marked:  # stored by now (or ended unstored): a late follower reads the store
                    with trio.CancelScope(shield=True), trio.move_on_after(STORE_ON_CANCEL_SECONDS):
                        await self.storage.unmark_answer(ref, turn_id)
                if log is not None:
                    self.background_ended(log, request.caller.key_name)

        return await self.background_answers.start(answer)

    def background_ended(self, log: AnswerLog, key_name: str | None) -> None:
        """A background answer ended (see :meth:`ask_in_background`): the webhook is told
        (queued, never waited for; nothing when WEBHOOK_URL is not set)."""
        end = log.events[-1] if log.events else None
        event: dict[str, object] = {
            "type": f"answer.{log.state}",
            "conversation_id": log.conversation_id,
            "turn_id": log.turn_id,
            "key": key_name,  # whose conversation: ids are per key
            "status": log.state,
            "finish_reason": end.finish_reason if isinstance(end, End) else log.state,
            "model": end.model if isinstance(end, End) else None,
            "usage": end.usage.as_dict() if isinstance(end, End) else None,
            "created_at": int(log.ended_at or time.time()),
            "text": log.text,
        }
        if log.error is not None:
            event["error"] = {"code": log.error.code, "message": log.error.message}
        self.webhooks.notify(event)

    async def follow(
        self,
        conversation_id: str,
        turn_id: str,
        *,
        after: int = 0,
        caller: Caller,
        live_elsewhere: bool = True,
    ) -> AsyncIterator[Event]:
        """The events of the answer of turn ``turn_id`` after seq ``after``: live while it is
        in progress (until its end), else replayed from the stored turn (SPEC §18).

        A background answer another instance generates (PostgreSQL) is followed from what
        that instance writes on its mark every :data:`ELSEWHERE_POLL` seconds, then from
        its stored turn, with the same numbers; without ``live_elsewhere``, only once it is
        stored. Raises InvalidInput, NotFound (no such turn of the caller's in this process
        or the store; or the answer elsewhere ended unstored), or the answer's own
        ChatError if it failed here (after its events). Cancelling the follower changes
        nothing for the answer.
        """
        ref = self._ref(conversation_id, caller)
        validate_turn_id(turn_id, "turn_id")
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise InvalidInput("after must be a whole number of at least 0")
        live = self.answer_logs.find(caller.owner, turn_id)
        if live is not None and live.conversation_id == ref.conversation_id:
            async for event in live.follow(after):
                yield event
            return
        given = after  # the seq of the last event the follower has
        while True:
            found = await self._stored_or_elsewhere(ref, turn_id)
            if isinstance(found, TurnRecord):
                for event in replay(ref.conversation_id, found)[given:]:
                    yield event
                return
            if live_elsewhere:
                for event in self._elsewhere(ref, turn_id, found)[given:]:
                    yield event
                    given = event.seq
            await trio.sleep(ELSEWHERE_POLL)

    async def _stored_or_elsewhere(
        self, ref: ConversationRef, turn_id: str
    ) -> TurnRecord | AnswerProgress:
        """The stored turn ``turn_id``; else (PostgreSQL) the progress of its answer that
        another instance marks in progress. Raises NotFound when neither is there (read once
        more after the mark: the turn may have been stored between the two reads)."""
        turn = await self.storage.find_turn(ref, turn_id, **self._alive())
        if turn is not None:
            return turn
        if self.settings.database.is_postgres:
            progress = await self.storage.answer_progress(ref, turn_id, time.time())
            if progress is not None:
                return progress
            turn = await self.storage.find_turn(ref, turn_id, **self._alive())
            if turn is not None:
                return turn
        raise NotFound(f"no turn {turn_id!r} in conversation {ref.conversation_id!r}")

    @staticmethod
    def _elsewhere(ref: ConversationRef, turn_id: str, progress: AnswerProgress) -> list[Event]:
        """The events so far of an answer another instance generates, from its mark."""
        return begun(ref.conversation_id, turn_id, progress.text, progress.pieces, progress.model)

    async def answer_state(
        self, conversation_id: str, turn_id: str, *, caller: Caller
    ) -> tuple[AnswerLog | None, TurnRecord | None]:
        """The answer of turn ``turn_id`` as it stands: its log while it is in progress (or
        if it ended with nothing stored, lately), else its stored turn. Raises InvalidInput
        or NotFound."""
        ref = self._ref(conversation_id, caller)
        validate_turn_id(turn_id, "turn_id")
        live = self.answer_logs.find(caller.owner, turn_id)
        if live is not None and live.conversation_id == ref.conversation_id:
            return live, None
        found = await self._stored_or_elsewhere(ref, turn_id)
        if isinstance(found, TurnRecord):
            return None, found
        elsewhere = AnswerLog(caller.owner, ref.conversation_id, turn_id, True)  # so far
        for event in self._elsewhere(ref, turn_id, found):
            elsewhere.add(event)
        return elsewhere, None

    async def conversation_of_answer(self, turn_id: str, *, caller: Caller) -> str | None:
        """The conversation of the caller's answer ``turn_id`` that another instance generates
        (marked in progress, PostgreSQL only; see :meth:`ask_in_background`), or None. For a
        transport that names an answer by its turn alone (a response id). Raises InvalidInput."""
        validate_turn_id(turn_id, "turn_id")
        if not self.settings.database.is_postgres:
            return None
        return await self.storage.conversation_of_answer(caller.owner, turn_id, time.time())

    async def ended_answer(
        self, conversation_id: str, turn_id: str, *, caller: Caller
    ) -> End | str:
        """How the answer of turn ``turn_id`` ended, for a follower whose events stopped without
        an end (it asked for those after the last, or the answer was cancelled with nothing
        stored): the stored turn's End, else its log's, else the state it ended in
        (``cancelled`` when nothing is known of it any more). Raises InvalidInput."""
        try:
            live, turn = await self.answer_state(conversation_id, turn_id, caller=caller)
        except NotFound:
            return ANSWER_CANCELLED
        if turn is not None:
            events = replay(conversation_id, turn)
        else:
            assert live is not None
            events = live.events
        last = events[-1] if events else None
        if isinstance(last, End):
            return last
        return live.state if live is not None and live.ended else ANSWER_CANCELLED

    async def cancel_answer(self, conversation_id: str, turn_id: str, *, caller: Caller) -> bool:
        """Cancel the caller's answer in progress under ``turn_id`` (a background answer, or
        any the transport made cancellable): it is stored as ``cancelled`` with what it has.

        In this process it is cancelled at once. With several instances (PostgreSQL), a
        background answer another instance generates is asked to stop through its mark,
        and that instance cancels it within :data:`ELSEWHERE_POLL` seconds
        (:meth:`elsewhere_forever`). False if no answer is in progress under that turn,
        here or (PostgreSQL) marked elsewhere. Raises InvalidInput, or StorageUnavailable
        when the mark cannot be written; a cancelled call may have written it.
        """
        ref = self._ref(conversation_id, caller)
        validate_turn_id(turn_id, "turn_id")
        live = self.answer_logs.find(caller.owner, turn_id)
        if live is not None and live.conversation_id == ref.conversation_id:  # answered here
            return self.in_progress.cancel(caller.owner, turn_id)
        if not self.settings.database.is_postgres:
            return False
        return await self.storage.request_cancel(ref, turn_id, time.time())

    async def elsewhere_forever(self) -> None:
        """PostgreSQL: every :data:`ELSEWHERE_POLL` seconds while this process runs background
        answers, write on each one's mark what it has so far (for followers on other
        instances, see :meth:`follow`), and cancel those whose cancel another instance noted
        there (see :meth:`cancel_answer`). A store failure is logged and tried again at the
        next poll; cancellation stops it."""
        written: dict[tuple[str, str], int] = {}  # (owner, turn id) → events written
        while True:
            await trio.sleep(ELSEWHERE_POLL)
            running = self.answer_logs.background_running()
            written = {key: count for key, count in written.items() if key in running}
            if not running:
                continue
            changed = [log for key, log in running.items() if written.get(key) != len(log.events)]
            try:
                if changed:
                    await self.storage.write_progress([_progress(log) for log in changed])
                requested = await self.storage.cancels_requested(time.time())
            except StorageUnavailable as exc:
                log.warning("the marks of background answers failed: %s", exc.message)
                continue
            written.update(((log.owner, log.turn_id), len(log.events)) for log in changed)
            for owner, turn_id in requested:
                self.in_progress.cancel(owner, turn_id)  # False: not one of this process's

    async def complete(self, request: AskRequest) -> Answer:
        """The whole answer at once (non-streaming transports). Same guarantees as :meth:`ask`."""
        pieces: list[str] = []
        async with contextlib.aclosing(self.ask(request)) as events:
            async for event in events:
                if isinstance(event, Delta):
                    pieces.append(event.text)
                elif isinstance(event, End):
                    return Answer("".join(pieces), event)
        raise AssertionError("ask() ended without an End event")

    @contextlib.asynccontextmanager
    async def _hold(self, ref: ConversationRef, *, live: bool = True) -> AsyncIterator[None]:
        """The conversation to oneself: in this process (fair), then across processes (storage).

        With ``live`` (every change but an ask, which reads its expiry with its head), an
        expired conversation is deleted first, so the change finds none (see chat/memory.py).
        """
        async with self._locks.hold(ref), self.storage.conversation_lock(ref):
            if live:
                await self.storage.forget_if_expired(ref, self.memory.now(), self.memory.ttl)
            yield

    async def ready(self) -> bool:
        """True when the conversation store answers within READY_TIMEOUT seconds.

        After a failed write the store must also take a write (see
        :class:`~easybackend.storage.base.WriteHealth`), so a store that reads
        but cannot write is not ready.
        """
        with trio.move_on_after(READY_TIMEOUT):
            try:
                await self.storage.ping()
            except StorageUnavailable:
                return False
            return True
        return False

    # Conversation management. Each takes the conversation's lock, so it waits for an
    # answer in progress on that conversation and never sees half of one.

    async def list_conversations(
        self,
        *,
        caller: Caller,
        limit: int = 50,
        after: str | None = None,
        query: str | None = None,
    ) -> list[ConversationSummary]:
        """A page of the caller's conversations, most recently active first; with ``query``,
        those whose title, prompts or answers hold every word of it, best first (see
        chat/memory.py). Expired ones are left out. Raises InvalidInput."""
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"limit must be between 1 and {MAX_PAGE}")
        now, ttl = self.memory.now(), self.memory.ttl
        try:
            if query is not None:
                terms = self.memory.query_terms(query)
                return await self.storage.search_conversations(
                    caller.owner, terms, limit, after, now=now, ttl=ttl
                )
            return await self.storage.list_conversations(
                caller.owner, limit, after, now=now, ttl=ttl
            )
        except ValueError:
            raise InvalidInput("cursor is not one this server handed out") from None

    async def get_conversation(self, conversation_id: str, *, caller: Caller) -> ConversationDetail:
        """The whole conversation, as stored once the answer in progress on it here (if any)
        ended, or after READ_WAIT seconds without it. Raises InvalidInput or NotFound."""
        ref = ConversationRef(caller.owner, validate_conversation_id(conversation_id))
        await self._settled(ref)
        detail = await self.storage.get_conversation(ref)
        if detail is None or self.memory.expired(
            detail.summary.settings, detail.summary.updated_at
        ):
            raise NotFound(f"no conversation {conversation_id!r}")
        return detail

    def _alive(self) -> dict[str, float | None]:
        """What a storage read is given to find nothing of an expired conversation (``now``
        and ``ttl``, as the listing takes them)."""
        return {"now": self.memory.now(), "ttl": self.memory.ttl}

    async def _settled(self, ref: ConversationRef) -> None:
        """Wait, at most :data:`READ_WAIT` seconds, until no answer is in progress on the
        conversation in this process (see READ_WAIT). Cancelled, it leaves the queue."""
        with trio.move_on_after(READ_WAIT):
            async with self._locks.hold(ref):
                pass

    async def delete_conversation(self, conversation_id: str, *, caller: Caller) -> None:
        """Forget a conversation. Raises InvalidInput or NotFound."""
        ref = ConversationRef(caller.owner, validate_conversation_id(conversation_id))
        async with self._hold(ref):
            if not await self.storage.delete_conversation(ref):
                raise NotFound(f"no conversation {conversation_id!r}")

    async def rollback(
        self, conversation_id: str, turns: int, *, caller: Caller
    ) -> tuple[int, int, str | None]:
        """Move the head ``turns`` turns up its path, deleting nothing.

        Returns (turns moved past, turns left on the path, the new head's id or
        None). Raises InvalidInput or NotFound.
        """
        ref = ConversationRef(caller.owner, validate_conversation_id(conversation_id))
        if isinstance(turns, bool) or not isinstance(turns, int) or turns < 1:
            raise InvalidInput("turns must be a whole number of at least 1")
        async with self._hold(ref):
            result = await self.storage.rollback(ref, turns)
        if result is None:
            raise NotFound(f"no conversation {conversation_id!r}")
        moved, left, head = result
        return moved, left, head.turn_id if head else None

    async def set_head(self, conversation_id: str, turn_id: str, *, caller: Caller) -> None:
        """Make ``turn_id`` (or no turn, for "root") the head: the next ask continues from it.

        Raises InvalidInput or NotFound (no such conversation or turn).
        """
        ref = ConversationRef(caller.owner, validate_conversation_id(conversation_id))
        validate_turn_id(turn_id, "turn_id", root=True)
        async with self._hold(ref):
            if not await self.storage.set_head(ref, turn_id):
                raise NotFound(f"no turn {turn_id!r} in conversation {conversation_id!r}")

    async def delete_turn(
        self, conversation_id: str, turn_id: str, *, caller: Caller
    ) -> tuple[int, str | None]:
        """Delete a turn and its descendants; (turns deleted, the head's id after, or None).

        The head moves to the deleted turn's parent when it was among them.
        Raises InvalidInput or NotFound.
        """
        ref = ConversationRef(caller.owner, validate_conversation_id(conversation_id))
        validate_turn_id(turn_id, "turn_id")
        async with self._hold(ref):
            result = await self.storage.delete_turn(ref, turn_id)
        if result is None:
            raise NotFound(f"no turn {turn_id!r} in conversation {conversation_id!r}")
        deleted, head = result
        return deleted, head.turn_id if head else None

    async def set_system_prompt(
        self, conversation_id: str, prompt: str | None, *, caller: Caller
    ) -> None:
        """Set the conversation's own system prompt (creating the conversation); None or "" clears it."""
        ref = ConversationRef(caller.owner, validate_conversation_id(conversation_id))
        if prompt is not None:
            checked_text("prompt", prompt)
        prompt = prompt or None
        tokens = await self.counter.text_off_loop(prompt) if prompt is not None else None
        async with self._hold(ref):
            await self.storage.set_system_prompt(ref, prompt, tokens)

    # The stateful OpenAI API (transports/openai_api): empty conversations with metadata, turns
    # given whole, the conversation that holds a turn, turns removed alone, messages cleared.

    def _ref(self, conversation_id: str, caller: Caller) -> ConversationRef:
        return ConversationRef(caller.owner, validate_conversation_id(conversation_id))

    async def create_conversation(
        self, conversation_id: str, metadata: str | None, *, caller: Caller
    ) -> bool:
        """Create an empty conversation holding ``metadata`` (JSON text); False if it exists
        (it is then left as it is). Raises InvalidInput or StorageUnavailable; cancelled, the
        write once started still finishes."""
        ref = self._ref(conversation_id, caller)
        async with self._hold(ref):
            return await self.storage.create_conversation(ref, metadata)

    async def conversation_summary(
        self, conversation_id: str, *, caller: Caller
    ) -> ConversationSummary:
        """The conversation as listed, without its turns. Raises InvalidInput or NotFound
        (StorageUnavailable); a cancelled read changes nothing."""
        ref = self._ref(conversation_id, caller)
        async with self._locks.hold(ref):
            summary = await self.storage.conversation_summary(ref)
        if summary is None or self.memory.expired(summary.settings, summary.updated_at):
            raise NotFound(f"no conversation {conversation_id!r}")
        return summary

    async def set_metadata(
        self, conversation_id: str, metadata: str | None, *, caller: Caller
    ) -> None:
        """Replace the conversation's metadata (JSON text). Raises InvalidInput or NotFound
        (StorageUnavailable); cancelled, the write once started still finishes."""
        ref = self._ref(conversation_id, caller)
        async with self._hold(ref):
            if not await self.storage.set_metadata(ref, metadata):
                raise NotFound(f"no conversation {conversation_id!r}")

    async def conversation_of_turn(self, turn_id: str, *, caller: Caller) -> str:
        """The id of the caller's conversation that holds the turn ``turn_id``.

        Raises InvalidInput (not a turn id) or NotFound (no such turn among the caller's:
        another key's turn is not found either, nor one of an expired conversation). A
        cancelled read changes nothing.
        """
        validate_turn_id(turn_id, "turn_id")
        conversation_id = await self.storage.conversation_of_turn(
            caller.owner, turn_id, **self._alive()
        )
        if conversation_id is None:
            raise NotFound(f"no turn {turn_id!r}")
        return conversation_id

    async def find_turn(self, conversation_id: str, turn_id: str, *, caller: Caller) -> TurnRecord:
        """The conversation's turn ``turn_id``, whole. Raises InvalidInput or NotFound; a
        cancelled read changes nothing."""
        ref = self._ref(conversation_id, caller)
        validate_turn_id(turn_id, "turn_id")
        await self._settled(ref)
        turn = await self.storage.find_turn(ref, turn_id, **self._alive())
        if turn is None:
            raise NotFound(f"no turn {turn_id!r} in conversation {conversation_id!r}")
        return turn

    async def add_turns(
        self, conversation_id: str, turns: Sequence[GivenTurn], *, caller: Caller
    ) -> list[TurnPosition]:
        """Append turns the client gives whole after the head, without calling the model.

        One transaction: each turn the parent of the next, the last the new head;
        their positions. The conversation must exist. Raises InvalidInput or
        NotFound. On cancellation the transaction, once started, still finishes.
        """
        ref = self._ref(conversation_id, caller)
        given = await self._counted_turns(turns, time.time())
        async with self._hold(ref):
            if await self.storage.conversation_summary(ref) is None:
                raise NotFound(f"no conversation {conversation_id!r}")
            head = await self.storage.conversation_head(ref)
            assert head is not None  # no turn named: an existing conversation has a head row
            chain = [(new, given_turn.turn_id, given_turn.extra) for given_turn, new in given]
            return await self.storage.append_turns(ref, chain, head.parent)

    async def splice_turns(
        self, conversation_id: str, turn_ids: Sequence[str], *, caller: Caller
    ) -> str | None:
        """Remove each turn of ``turn_ids`` alone: its children become its parent's, the head
        moves to its parent if it was the head. Returns the head's id after (None: no turn).

        Every turn must be in the conversation, else nothing is removed.
        Raises InvalidInput or NotFound. One transaction: cancelled, it still
        finishes once started (all the turns are removed, or none).
        """
        ref = self._ref(conversation_id, caller)
        for turn_id in turn_ids:
            validate_turn_id(turn_id, "turn_id")
        async with self._hold(ref):
            for turn_id in turn_ids:
                if await self.storage.find_turn(ref, turn_id) is None:
                    raise NotFound(f"no turn {turn_id!r} in conversation {conversation_id!r}")
            result = await self.storage.splice_turns(ref, turn_ids)
        if result is None:
            raise NotFound(f"no conversation {conversation_id!r}")
        _, head = result
        return head.turn_id if head else None

    async def clear_message(
        self, conversation_id: str, turn_id: str, role: str, *, caller: Caller
    ) -> None:
        """Remove one message of a turn: its prompt (``role`` "user") or its answer ("assistant").

        The other half stays, as a lone message; a turn left with neither is
        removed alone (:meth:`splice_turns`). Raises InvalidInput, or NotFound
        when the turn does not exist or that message is already empty. One
        write: cancelled, it still finishes once started.
        """
        ref = self._ref(conversation_id, caller)
        validate_turn_id(turn_id, "turn_id")
        if role not in ("user", "assistant"):
            raise InvalidInput("role must be user or assistant")
        async with self._hold(ref):
            turn = await self.storage.find_turn(ref, turn_id)
            text = turn.prompt if role == "user" and turn else turn.answer if turn else ""
            if turn is None or not text:
                raise NotFound(f"no {role} message in turn {turn_id!r}")
            prompt, prompt_tokens = (turn.prompt, turn.prompt_tokens) if role != "user" else ("", 0)
            answer, answer_tokens = (turn.answer, turn.answer_tokens) if role == "user" else ("", 0)
            if prompt or answer:
                texts = (prompt, prompt_tokens, answer, answer_tokens)
                await self.storage.set_turn_text(ref, turn_id, texts)
            else:
                await self.storage.splice_turns(ref, [turn_id])

    def _new_turn(
        self,
        call: UpstreamCall,
        prompt: str,
        prompt_tokens: int,
        pieces: list[str],
        finish_reason: str,
        sent_tokens: int,
        created_at: float,
        completion: Completion | None,
        *,
        answer_tokens: int,
        upstream: str,
    ) -> NewTurn:
        reported = completion if completion and completion.prompt_tokens is not None else None
        return NewTurn(
            prompt=prompt,
            prompt_tokens=prompt_tokens,
            answer="".join(pieces),
            answer_tokens=answer_tokens,
            model=(completion.model if completion and completion.model else call.model),
            finish_reason=finish_reason,
            usage_prompt_tokens=reported.prompt_tokens if reported else sent_tokens,  # type: ignore[misc]
            usage_completion_tokens=(
                reported.completion_tokens
                if reported and reported.completion_tokens is not None
                else answer_tokens
            ),
            created_at=created_at,
            finished_at=time.time(),
            upstream=upstream,
            pieces=piece_lengths(pieces),
        )

    async def _store_cancelled(
        self,
        keep: _Keep,
        call: UpstreamCall,
        prompt: str,
        prompt_tokens: int,
        pieces: list[str],
        sent_tokens: int,
        created_at: float,
        upstream: str,
    ) -> NewTurn:
        """Store the partial answer of a cancelled ask, shielded from the cancellation.

        Counting the answer is shielded too and not bounded in time (a thread
        cannot be interrupted; the answer is at most MAX_ANSWER_CHARS long);
        storing it may take STORE_ON_CANCEL_SECONDS.
        """
        answer = "".join(pieces)
        with trio.CancelScope(shield=True):
            answer_tokens = await self.counter.text_off_loop(answer)
        turn = self._new_turn(
            call,
            prompt,
            prompt_tokens,
            pieces,
            CANCELLED,
            sent_tokens,
            created_at,
            None,
            answer_tokens=answer_tokens,
            upstream=upstream,
        )
        with trio.CancelScope(shield=True), trio.move_on_after(STORE_ON_CANCEL_SECONDS):
            await self._keep(keep, turn)
        return turn


@dataclasses.dataclass(slots=True)
class _Bill:
    """What an ask is charged once it ends: its place in the limits, the model its usage is
    counted under, and whether it was charged (once); and whether its turn was stored."""

    ticket: Ticket | None = None
    model: str = ""
    charged: bool = False
    stored: bool = False
    cut: End | None = None  # the end of a cancelled answer whose partial turn was stored


@dataclasses.dataclass(frozen=True, slots=True)
class _Keep:
    """Where an ask's turn is stored: its conversation, its parent, its id, the ask, and the
    turns the ask gave before it (stored between the parent and it)."""

    ref: ConversationRef
    parent: TurnPosition | None
    turn_id: str
    request: AskRequest
    given: list[tuple[GivenTurn, NewTurn]]


@dataclasses.dataclass(frozen=True, slots=True)
class _ContextPlan:
    """The system prompt an ask sends and how its context window is shared out."""

    system: str | None
    budget: Budget

    @classmethod
    async def choose(
        cls, service: ChatService, request: AskRequest, prompt_tokens: int, head: ConversationHead
    ) -> _ContextPlan:
        """The plan for ``request`` on the conversation read as ``head``; raises PromptTooLong.

        A per-ask system prompt wins over the conversation's, which wins over
        FIRST_PROMPT. A system prompt stored without its count (or given per
        ask) is counted here, off the event loop when long.
        """
        counter, settings = service.counter, service.settings
        if request.system is not None:
            system, system_tokens = request.system, await counter.text_off_loop(request.system)
        elif head.system_prompt is not None:
            system, system_tokens = head.system_prompt, head.system_tokens
            if system_tokens is None:
                system_tokens = await counter.text_off_loop(system)
        else:
            system, system_tokens = settings.first_prompt, service.first_prompt_tokens
        budget = Budget.plan(
            max_context_tokens=head.settings.max_context_tokens or settings.max_context_tokens,
            reserved_for_answer=request.max_tokens or settings.max_response_tokens or 0,
            system_tokens=system_tokens,
            prompt_tokens=prompt_tokens,
        )
        return cls(system, budget)
