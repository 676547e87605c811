"""``/v1/responses``: OpenAI's Responses API over any chat-completions provider.

A response is one ask of the chat core (:meth:`ChatService.ask`) and the turn
it stores: its id is ``resp_<turn id>`` (see :mod:`.ids`), its output the
turn's answer, and what the turn cannot hold (instructions, metadata, the
sampling settings, ``previous_response_id``…) is kept as the turn's extra
JSON. Where it goes:

- ``previous_response_id``: in that response's conversation, as a child of
  its turn (a branch of the tree when it is not the head);
- ``conversation`` (an id, or ``{"id": …}``): after that conversation's head;
- neither: a new conversation, ``conv_<turn id>``.

The context is the core's: the system prompt (``instructions`` and the
input's system and developer messages, else the conversation's own, else
FIRST_PROMPT), the newest turns of the path that fit the window
(``truncation: "auto"``, the default) or all of them (``"disabled"``: a
context that does not fit is a 400), the input's earlier messages, then its
last user message. With ``store: false`` nothing is kept.

``stream: true`` sends OpenAI's events (``response.created``,
``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, ``response.output_text.delta``…,
``response.output_text.done``, ``response.content_part.done``,
``response.output_item.done``, then ``response.completed``, or
``response.incomplete`` for an answer cut by ``max_output_tokens`` and for a
cancelled one (its status ``cancelled``), or ``response.failed``), each with
its ``sequence_number``. An error before the first piece of the answer is a
plain JSON error with its status, so the SDKs raise their typed exceptions.

Cancellation: a response in progress in this process can be cancelled by
``POST /v1/responses/{id}/cancel`` (the answer stops; what was sent so far is
stored with status ``cancelled``), and a client that goes away cancels its
own (stored the same way). At the end of the shutdown grace a response in
progress fails (``shutting_down``). Errors are OpenAI-shaped (see
:mod:`.errors`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Literal

import pydantic
import trio
from quart import Blueprint, Response, g, request
from quart_schema import document_request, document_response, tag, validate_querystring

from ...chat.caller import Caller
from ...chat.service import GIVEN, AskRequest, ChatService, Delta, End, Start
from ...chat.tree import Tree
from ...errors import (
    ChatError,
    InvalidInput,
    NotFound,
    PromptTooLong,
    ShuttingDown,
    TooManyRequests,
    UpstreamRateLimited,
)
from ...storage import ConversationDetail, TurnRecord
from ...storage.sql import new_turn_id
from . import ids, items
from .pages import ListQuery, list_page
from .pages import json_response as _json

if TYPE_CHECKING:
    from ..http import Stopping

CANCEL_WAIT = 10.0  # seconds a cancel waits for the answer to stop and be stored
TRUNCATIONS = ("auto", "disabled")
# Fields of a create request: those acted on, those accepted and not used (they change nothing
# here: OpenAI's own tools, caching, tiers…), and those refused unless they ask for nothing.
SUPPORTED = {
    "input",
    "instructions",
    "model",
    "previous_response_id",
    "conversation",
    "store",
    "stream",
    "max_output_tokens",
    "temperature",
    "top_p",
    "truncation",
    "metadata",
    "user",
}
IGNORED = {
    "include",
    "parallel_tool_calls",
    "max_tool_calls",
    "reasoning",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "stream_options",
    "top_logprobs",
}
REFUSED = {"tools", "tool_choice", "background", "prompt", "text"}  # see _refused


class ConversationRefBody(pydantic.BaseModel):
    id: str


class CreateResponseBody(pydantic.BaseModel):
    """``POST /v1/responses`` (OpenAI's ``responses.create``). Only ``input`` is required."""

    model_config = pydantic.ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {"model": "gpt-4.1-mini", "input": "Hello"},
                {
                    "input": [{"role": "user", "content": "And then?"}],
                    "previous_response_id": "resp_5c668971bf44ff809097e1a5",
                    "stream": True,
                },
            ]
        },
    )

    input: str | list[items.InputMessage] = pydantic.Field(
        description="The new message(s): a string, or message items (text only); the last"
        " non-system one must be a user message"
    )
    model: str | None = pydantic.Field(None, description="Default: GPT_ENGINE")
    instructions: str | None = pydantic.Field(
        None, description="This response's system prompt (not carried over)"
    )
    previous_response_id: str | None = pydantic.Field(
        None, description="Continue from this response (a branch when it is not the latest)"
    )
    conversation: str | ConversationRefBody | None = pydantic.Field(
        None, description="Continue this conversation (conv_… or a native id) after its head"
    )
    store: bool | None = pydantic.Field(None, description="Default true; false keeps nothing")
    stream: bool | None = pydantic.Field(None, description="Server-Sent Events when true")
    max_output_tokens: int | None = pydantic.Field(None, ge=1)
    temperature: float | None = pydantic.Field(None, ge=0, le=2)
    top_p: float | None = pydantic.Field(None, ge=0, le=1)
    truncation: Literal["auto", "disabled"] | None = pydantic.Field(
        None, description="auto (default): drop the oldest turns that do not fit; disabled: 400"
    )
    metadata: dict[str, str] | None = pydantic.Field(None, description="Up to 16 pairs")
    user: str | None = None


class OutputText(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")

    type: Literal["output_text"]
    text: str
    annotations: list[Any]


class OutputMessage(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")

    id: str
    type: Literal["message"]
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"]
    content: list[OutputText]


class ResponseUsageBody(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")

    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens_details: dict[str, int]


class ResponseBody(pydantic.BaseModel):
    """A response (OpenAI's ``Response``); its id is ``resp_<turn id>``."""

    model_config = pydantic.ConfigDict(extra="allow")

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "cancelled", "failed"]
    model: str
    output: list[OutputMessage]
    usage: ResponseUsageBody | None
    conversation: ConversationRefBody | None
    previous_response_id: str | None
    instructions: str | None
    metadata: dict[str, str]
    store: bool
    temperature: float | None
    top_p: float | None
    max_output_tokens: int | None
    truncation: Literal["auto", "disabled"]
    user: str | None
    error: dict[str, Any] | None
    incomplete_details: dict[str, Any] | None


class DeletedBody(pydantic.BaseModel):
    id: str
    object: Literal["response.deleted"]
    deleted: bool


class _Cancelled:
    """What a tracked answer yields when it was cancelled (by /cancel)."""


CANCELLED = _Cancelled()


@dataclasses.dataclass(frozen=True, slots=True)
class CreateBody:
    """A checked ``POST /v1/responses`` body."""

    messages: list[items.Message]  # the input, as messages
    settings: dict[str, Any]  # what the turn's extra JSON keeps (see _settings)
    model: str | None
    conversation: str | None
    previous_response_id: str | None
    store: bool
    stream: bool


def parse_create(body: object) -> CreateBody:
    """The request, checked; raises InvalidInput naming the field at fault."""
    if not isinstance(body, dict):
        raise InvalidInput("the request body must be a JSON object")
    unknown = set(body) - SUPPORTED - IGNORED - REFUSED
    if unknown:
        name = sorted(unknown)[0]
        raise InvalidInput(f"unknown parameter: {name[:64]!r}", param=name[:64])
    _refused(body)
    if "input" not in body or body["input"] is None:
        raise InvalidInput("input is required: a string or a list of message items", param="input")
    given = body["input"]
    if isinstance(given, str):
        if not given.strip():
            raise InvalidInput("input must not be empty", param="input")
        messages = [items.Message("user", given)]
    else:
        messages = items.parse_messages(given, "input")
    talk = [message for message in messages if message.role not in items.SYSTEM_ROLES]
    if not talk or talk[-1].role != "user":
        raise InvalidInput(
            "the last message of input (system and developer messages aside) must be a user"
            " message: it is what the model answers",
            param="input",
        )
    model = _optional(body, "model", str)
    if model is not None and not model.strip():
        raise InvalidInput("model must be a non-empty string", param="model")
    conversation = body.get("conversation")
    if isinstance(conversation, dict):
        conversation = conversation.get("id")
        if not isinstance(conversation, str):
            raise InvalidInput("conversation.id must be a string", param="conversation")
    elif conversation is not None and not isinstance(conversation, str):
        raise InvalidInput(
            'conversation must be a conversation id or {"id": …}', param="conversation"
        )
    previous = _optional(body, "previous_response_id", str)
    if conversation is not None and previous is not None:
        raise InvalidInput(
            "previous_response_id and conversation cannot be used together",
            param="previous_response_id",
        )
    store = _optional(body, "store", bool)
    stream = _optional(body, "stream", bool)
    return CreateBody(
        messages=messages,
        settings=_settings(body),
        model=model,
        conversation=conversation,
        previous_response_id=previous,
        store=True if store is None else store,
        stream=bool(stream),
    )


def _optional(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        word = {str: "a string", bool: "a boolean"}.get(kind, kind.__name__)
        raise InvalidInput(f"{name} must be {word}", param=name)
    return value


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise InvalidInput(f"{name} must be a number between {low:g} and {high:g}", param=name)
    return value


def _settings(body: dict[str, Any]) -> dict[str, Any]:
    """What a response keeps of its request (the turn's extra JSON), checked."""
    instructions = _optional(body, "instructions", str)
    max_output = body.get("max_output_tokens")
    if max_output is not None and (
        isinstance(max_output, bool) or not isinstance(max_output, int) or max_output < 1
    ):
        raise InvalidInput(
            "max_output_tokens must be a positive whole number", param="max_output_tokens"
        )
    truncation = body.get("truncation")
    if truncation is not None and truncation not in TRUNCATIONS:
        raise InvalidInput("truncation must be 'auto' or 'disabled'", param="truncation")
    user = _optional(body, "user", str)
    if user is not None and len(user) > 512:
        raise InvalidInput("user may have at most 512 characters", param="user")
    return {
        "instructions": instructions,
        "metadata": items.checked_metadata(body.get("metadata")),
        "temperature": _number(body, "temperature", 0, 2),
        "top_p": _number(body, "top_p", 0, 1),
        "max_output_tokens": max_output,
        "truncation": truncation or "auto",
        "user": user,
        "previous_response_id": _optional(body, "previous_response_id", str),
    }


def _refused(body: dict[str, Any]) -> None:
    """Refuse what cannot be done over chat completions and text turns, unless it asks nothing."""
    if body.get("tools"):
        raise InvalidInput("tools are not supported by this server's Responses API", param="tools")
    if body.get("tool_choice") not in (None, "auto", "none"):
        raise InvalidInput("tool_choice is not supported (there are no tools)", param="tool_choice")
    if body.get("background"):
        raise InvalidInput("background responses are not supported", param="background")
    if body.get("prompt") is not None:
        raise InvalidInput("prompt templates are not supported", param="prompt")
    text = body.get("text")
    if text is not None:
        form = text.get("format") if isinstance(text, dict) else text
        if form is not None and (not isinstance(form, dict) or form.get("type") != "text"):
            raise InvalidInput(
                "only plain text output is supported (text.format type 'text')", param="text"
            )


@dataclasses.dataclass(slots=True)
class ResponseState:
    """A response as the API shows it, in progress or done (see :func:`render`)."""

    turn_id: str
    created_at: float
    model: str
    settings: dict[str, Any]
    store: bool
    conversation_id: str | None  # shown only when the response is (to be) stored
    status: str = "in_progress"
    text: str = ""
    finish_reason: str | None = None
    usage: tuple[int, int] | None = None
    completed_at: float | None = None
    error: dict[str, str] | None = None

    @classmethod
    def of_turn(cls, turn: TurnRecord, conversation_id: str, temperature: float) -> ResponseState:
        """The response a stored turn is (any turn: one asked on another protocol has the
        default settings)."""
        settings = _stored_settings(turn.extra, temperature)
        state = cls(
            turn_id=turn.turn_id,
            created_at=turn.created_at,
            model=turn.model,
            settings=settings,
            store=True,
            conversation_id=conversation_id,
            text=turn.answer,
        )
        state.finish(turn.finish_reason, (turn.usage_prompt_tokens, turn.usage_completion_tokens))
        state.completed_at = turn.finished_at if state.status == "completed" else None
        return state

    def finish(self, finish_reason: str, usage: tuple[int, int] | None) -> None:
        self.finish_reason = finish_reason
        self.usage = usage
        self.status = STATUS_BY_FINISH.get(finish_reason, "completed")
        if self.status == "completed":
            self.completed_at = time.time()

    def fail(self, error: ChatError) -> None:
        self.status = "failed"
        limited = isinstance(error, UpstreamRateLimited | TooManyRequests)
        self.error = {
            "code": "rate_limit_exceeded" if limited else "server_error",
            "message": error.message,
        }

    @property
    def item_status(self) -> str:
        return {"in_progress": "in_progress", "completed": "completed"}.get(
            self.status, "incomplete"
        )

    def message(self) -> dict[str, Any]:
        return items.message_item(
            ids.message_id(self.turn_id, "assistant"), "assistant", self.text, self.item_status
        )


# How a turn's finish reason shows as a response's status (anything else: completed).
STATUS_BY_FINISH = {
    "length": "incomplete",
    "content_filter": "incomplete",
    "cancelled": "cancelled",
}
INCOMPLETE_REASON = {"length": "max_output_tokens", "content_filter": "content_filter"}


def _stored_settings(extra: str | None, temperature: float) -> dict[str, Any]:
    try:
        kept = json.loads(extra) if extra else {}
    except ValueError:
        kept = {}
    settings = {
        "instructions": None,
        "metadata": {},
        "temperature": None,
        "top_p": None,
        "max_output_tokens": None,
        "truncation": "auto",
        "user": None,
        "previous_response_id": None,
        "system_input": [],
    }
    if isinstance(kept, dict):
        settings.update({name: kept[name] for name in settings if name in kept})
    if settings["temperature"] is None:
        settings["temperature"] = temperature
    return settings


def render(state: ResponseState, *, output: bool = True) -> dict[str, Any]:
    """The Response object (``openai.types.responses.Response``) of ``state``."""
    settings = state.settings
    usage = None
    if state.usage is not None:
        prompt_tokens, completion_tokens = state.usage
        usage = {
            "input_tokens": prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens,
        }
    reason = INCOMPLETE_REASON.get(state.finish_reason or "")
    return {
        "id": ids.response_id(state.turn_id),
        "object": "response",
        "created_at": int(state.created_at),
        "status": state.status,
        "background": False,
        "completed_at": int(state.completed_at) if state.completed_at else None,
        "conversation": {"id": state.conversation_id} if state.conversation_id else None,
        "error": state.error,
        "incomplete_details": {"reason": reason}
        if reason and state.status == "incomplete"
        else None,
        "instructions": settings.get("instructions"),
        "max_output_tokens": settings.get("max_output_tokens"),
        "max_tool_calls": None,
        "metadata": settings.get("metadata") or {},
        "model": state.model,
        "output": [state.message()] if output else [],
        "parallel_tool_calls": True,
        "previous_response_id": settings.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": state.store,
        "temperature": settings.get("temperature"),
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": settings.get("top_p"),
        "truncation": settings.get("truncation", "auto"),
        "usage": usage,
        "user": settings.get("user"),
    }


@dataclasses.dataclass(slots=True)
class _Live:
    """A response being answered in this process: its state, and how a cancel reaches it."""

    state: ResponseState
    cancel_requested: bool = False
    ended: trio.Event = dataclasses.field(default_factory=trio.Event)  # its outcome is known


class _Events:
    """The SSE events of one streamed response, each with the next ``sequence_number``."""

    def __init__(self) -> None:
        self.sequence = 0

    def __call__(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def response_routes(
    blueprint: Blueprint, service: ChatService, caller: Callable[[], Caller], stopping: Stopping
) -> None:
    """Add the /v1/responses routes over ``service`` to ``blueprint`` (the ``/v1`` one);
    ``caller()`` is the request's Caller."""
    live: dict[tuple[str, str], _Live] = {}  # responses in progress, by (owner, turn id)
    temperature = service.settings.temperature

    async def tracked(
        current: _Live, owner: str, events: AsyncIterator[Delta | End]
    ) -> AsyncIterator[Delta | End | _Cancelled]:
        """The ask's events while it can be cancelled; CANCELLED once it was.

        Each step runs in the cancel scope :meth:`AnswersInProgress.cancel`
        reaches (a cancel asked between two steps cancels the next at once),
        and in the shutdown grace's scope (its end raises ShuttingDown). The
        response is listed as live until the generator is closed.
        """
        turn_id = current.state.turn_id
        live[owner, turn_id] = current
        try:
            async with contextlib.aclosing(events):  # type: ignore[type-var]
                while True:
                    with stopping.cut_at_grace_end() as grace:
                        with service.in_progress.cancellable(owner, turn_id) as scope:
                            if current.cancel_requested:
                                scope.cancel()
                            try:
                                event = await anext(events)
                            except StopAsyncIteration:
                                return
                    if grace.cancelled_caught:
                        raise ShuttingDown("the server is shutting down")
                    if scope.cancelled_caught:
                        current.state.status = "cancelled"
                        current.state.finish_reason = "cancelled"
                        current.ended.set()
                        yield CANCELLED
                        return
                    if isinstance(event, End):
                        current.state.finish(
                            event.finish_reason,
                            (event.usage.prompt_tokens, event.usage.completion_tokens),
                        )
                        current.state.model = event.model
                        current.ended.set()
                    elif isinstance(event, Start):
                        continue
                    else:
                        current.state.text += event.text
                    yield event
        except ChatError as exc:
            if isinstance(exc, PromptTooLong) and exc.param is None:
                exc.param = "input"  # the context (truncation disabled) or the prompt itself
            current.state.fail(exc)
            raise
        finally:
            current.ended.set()
            if live.get((owner, turn_id)) is current:
                del live[owner, turn_id]

    async def ask_of(body: CreateBody, asking: Caller) -> tuple[AskRequest, ResponseState]:
        """The core's ask for a create request, and the response it starts as."""
        turn_id = new_turn_id()
        parent_id = None
        if body.previous_response_id is not None:
            previous = ids.turn_of_response(body.previous_response_id, "previous_response_id")
            try:
                conversation_id = await service.conversation_of_turn(previous, caller=asking)
            except NotFound:
                raise NotFound(
                    f"previous response {body.previous_response_id[:80]!r} not found",
                    param="previous_response_id",
                ) from None
            parent_id = previous
        elif body.conversation is not None:
            conversation_id = body.conversation
            try:
                await service.conversation_summary(conversation_id, caller=asking)
            except NotFound:
                raise NotFound(
                    f"conversation {conversation_id[:80]!r} not found", param="conversation"
                ) from None
            except InvalidInput as exc:
                raise InvalidInput(exc.message, param="conversation") from None
        else:
            conversation_id = ids.conversation_started_by(turn_id)
        settings = body.settings
        system_input = [[m.role, m.text] for m in body.messages if m.role in items.SYSTEM_ROLES]
        talk = [m for m in body.messages if m.role not in items.SYSTEM_ROLES]
        kept = {**settings, "system_input": system_input}
        input_of = json.dumps({"input_of": turn_id})
        preceding = items.pair(talk[:-1], extra=input_of)
        ask = AskRequest(
            conversation_id=conversation_id,
            prompt=talk[-1].text,
            model=body.model,
            temperature=settings["temperature"],
            max_tokens=settings["max_output_tokens"],
            system=items.system_prompt([settings["instructions"], *(t for _, t in system_input)]),
            parent_id=parent_id,
            turn_id=turn_id,
            store=body.store,
            extra=json.dumps(kept, ensure_ascii=False),
            preceding=tuple(preceding),
            truncate=settings["truncation"] == "auto",
            top_p=settings["top_p"],
            user=settings["user"],  # the end user USER_RPM limits
            caller=asking,
        )
        if settings["temperature"] is None:
            kept["temperature"] = temperature
        state = ResponseState(
            turn_id=turn_id,
            created_at=time.time(),
            model=body.model or service.settings.model,
            settings=kept,
            store=body.store,
            conversation_id=conversation_id if body.store else None,
        )
        return ask, state

    @blueprint.post("/responses")
    @document_request(CreateResponseBody)
    @document_response(ResponseBody, 200)
    @tag(["openai"])
    async def create_response() -> Response:
        """Create a model response (OpenAI's Responses API); see the module docstring."""
        body = parse_create(await request.get_json())
        asking = caller()
        ask, state = await ask_of(body, asking)
        current = _Live(state)
        g.asked = True  # the core accounts for the ask from here on
        events = tracked(current, asking.owner, service.ask(ask))
        if body.stream:
            return await streamed(current, events)
        async with contextlib.aclosing(events):  # type: ignore[type-var]
            async for _ in events:
                pass
        return _json(await final_render(current, asking))

    async def streamed(current: _Live, events: AsyncIterator[Delta | End | _Cancelled]) -> Response:
        try:
            first = await anext(events)
        except BaseException:
            await events.aclose()  # type: ignore[attr-defined]
            raise
        response = Response(sse_body(current, first, events), mimetype="text/event-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        response.timeout = None
        return response

    async def sse_body(
        current: _Live, first: Delta | End | _Cancelled, events: AsyncIterator[Any]
    ) -> AsyncIterator[str]:
        """The events of a streamed response; an error after the first becomes response.failed.

        The events before the first delta go out with it, in one write, and the
        events after the last delta in one write: a write less per event.
        """
        state = current.state
        event_of = _Events()
        item_id = ids.message_id(state.turn_id, "assistant")
        empty_part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        async with contextlib.aclosing(events):  # type: ignore[type-var]
            added = {**state.message(), "status": "in_progress", "content": []}
            held = (  # sent with the first delta
                event_of("response.created", response=render(state, output=False))
                + event_of("response.in_progress", response=render(state, output=False))
                + event_of("response.output_item.added", output_index=0, item=added)
                + event_of(
                    "response.content_part.added",
                    item_id=item_id,
                    output_index=0,
                    content_index=0,
                    part=empty_part,
                )
            )
            event = first
            try:
                while isinstance(event, Delta):
                    yield held + event_of(
                        "response.output_text.delta",
                        item_id=item_id,
                        output_index=0,
                        content_index=0,
                        delta=event.text,
                        logprobs=[],
                    )
                    held = ""
                    event = await anext(events)
            except ChatError:
                yield held + event_of("response.failed", response=render(state))
                return
            final = "response.completed" if state.status == "completed" else "response.incomplete"
            yield (
                held
                + event_of(
                    "response.output_text.done",
                    item_id=item_id,
                    output_index=0,
                    content_index=0,
                    text=state.text,
                    logprobs=[],
                )
                + event_of(
                    "response.content_part.done",
                    item_id=item_id,
                    output_index=0,
                    content_index=0,
                    part={**empty_part, "text": state.text},
                )
                + event_of("response.output_item.done", output_index=0, item=state.message())
                + event_of(final, response=render(state))
            )

    async def final_render(current: _Live, asking: Caller) -> dict[str, Any]:
        """The response once its answer ended: a cancelled one as stored (with its usage)."""
        state = current.state
        if state.status == "cancelled" and state.store:
            with contextlib.suppress(NotFound):
                return await stored_render(state.turn_id, asking)
        return render(state)

    async def stored_turn(turn_id: str, asking: Caller) -> tuple[str, TurnRecord]:
        conversation_id = await service.conversation_of_turn(turn_id, caller=asking)
        return conversation_id, await service.find_turn(conversation_id, turn_id, caller=asking)

    async def stored_render(turn_id: str, asking: Caller) -> dict[str, Any]:
        conversation_id, turn = await stored_turn(turn_id, asking)
        return render(ResponseState.of_turn(turn, conversation_id, temperature))

    @blueprint.get("/responses/<response_id>")
    @document_response(ResponseBody, 200)
    @tag(["openai"])
    async def get_response(response_id: str) -> Response:
        """A response: in progress (what was answered so far) or stored. 404 for an unknown
        one, one stored with ``store: false`` and another key's."""
        turn_id = ids.turn_of_response(response_id)
        asking = caller()
        current = live.get((asking.owner, turn_id))
        if current is not None:
            return _json(render(current.state))
        return _json(await stored_render(turn_id, asking))

    @blueprint.delete("/responses/<response_id>")
    @document_response(DeletedBody, 200)
    @tag(["openai"])
    async def delete_response(response_id: str) -> Response:
        """Delete a stored response: its turn (and the turns its input made) leave the tree
        alone, their children joining their parent, so later responses of the chain stay."""
        turn_id = ids.turn_of_response(response_id)
        asking = caller()
        if (asking.owner, turn_id) in live:
            raise InvalidInput("the response is in progress: cancel it first")
        conversation_id = await service.conversation_of_turn(turn_id, caller=asking)
        detail = await service.get_conversation(conversation_id, caller=asking)
        removed = [turn_id, *(turn.turn_id for turn in _input_turns(detail, turn_id))]
        await service.splice_turns(conversation_id, removed, caller=asking)
        return _json({"id": response_id, "object": "response.deleted", "deleted": True})

    @blueprint.get("/responses/<response_id>/input_items")
    @validate_querystring(ListQuery)
    @document_response(items.ItemList, 200)
    @tag(["openai"])
    async def input_items(response_id: str, query_args: ListQuery) -> Response:
        """The response's input as items: its system and developer messages, its earlier
        messages, and its last user message (default order ``desc``)."""
        turn_id = ids.turn_of_response(response_id)
        asking = caller()
        conversation_id = await service.conversation_of_turn(turn_id, caller=asking)
        detail = await service.get_conversation(conversation_id, caller=asking)
        turn = _turn_in(detail, turn_id)
        found: list[dict[str, Any]] = []
        settings = _stored_settings(turn.extra, temperature)
        for index, (role, text) in enumerate(settings["system_input"]):
            found.append(items.message_item(ids.system_message_id(turn_id, index), role, text))
        for earlier in reversed(_input_turns(detail, turn_id)):
            found.extend(items.turn_items(earlier))
        if turn.prompt:
            found.append(items.message_item(ids.message_id(turn_id, "user"), "user", turn.prompt))
        return _json(list_page(found, query_args))

    @blueprint.post("/responses/<response_id>/cancel")
    @document_response(ResponseBody, 200)
    @tag(["openai"])
    async def cancel_response(response_id: str) -> Response:
        """Cancel a response in progress in this process: its answer stops, what was sent is
        kept (status ``cancelled``). A finished response cannot be cancelled (400)."""
        turn_id = ids.turn_of_response(response_id)
        asking = caller()
        current = live.get((asking.owner, turn_id))
        if current is None:
            await stored_turn(turn_id, asking)  # NotFound unless it exists
            raise InvalidInput(
                "only a response in progress can be cancelled; this one has finished"
            )
        current.cancel_requested = True
        service.in_progress.cancel(asking.owner, turn_id)
        with trio.move_on_after(CANCEL_WAIT):
            await current.ended.wait()
        return _json(await final_render(current, asking))


def _turn_in(detail: ConversationDetail, turn_id: str) -> TurnRecord:
    for turn in detail.turns:
        if turn.turn_id == turn_id:
            return turn
    raise NotFound(f"no response {ids.response_id(turn_id)!r}")


def _input_turns(detail: ConversationDetail, turn_id: str) -> list[TurnRecord]:
    """The turns a response's input made, newest first: its ancestors kept as its input."""
    tree = Tree(detail)
    by_id = {turn.turn_id: turn for turn in tree.turns}
    found: list[TurnRecord] = []
    turn = _turn_in(detail, turn_id)
    while (parent_id := tree.parent_id(turn)) is not None:
        turn = by_id[parent_id]
        if turn.finish_reason != GIVEN or turn.extra is None or turn_id not in turn.extra:
            break
        try:
            if json.loads(turn.extra).get("input_of") != turn_id:
                break
        except ValueError:
            break
        found.append(turn)
    return found
