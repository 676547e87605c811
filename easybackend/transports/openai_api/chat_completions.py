"""``POST /v1/chat/completions``: OpenAI's chat completions, as a relay or with a conversation.

**Stateless** (no conversation named): the request is relayed to the
provider as it came and its answer passed back (:mod:`easybackend.chat.relay`
says what is and is not changed). Streaming requests get the provider's
chunks as ``data:`` events, then ``data: [DONE]``.

**Conversation mode**: a conversation named by the body field
``conversation`` (a conversation id, or ``{"id": …}``; the SDKs send it
through ``extra_body``) or the header ``X-Conversation-Id``. The client sends
only its new message(s); the server runs an ordinary ask of the chat core on
that conversation (:func:`conversation_ask` says how the request maps onto
it), so the stored system prompt and the history that fits are sent to the
model and the turn is stored. The answer is a ``chat.completion`` whose ``id``
is ``chatcmpl-<turn id>``, or ``chat.completion.chunk`` events built from the
core's events; both carry ``conversation_id`` and ``turn_id`` as well.

Either way, errors before the answer has begun are JSON error responses with
their status (:mod:`.errors`); an error after it has begun is one ``data:``
error event, with no ``[DONE]`` after it. When the client goes away the
answer is cancelled: the upstream call is closed (and, in conversation mode,
the part already sent is stored as ``cancelled``, as on every protocol).
When the shutdown grace ends, an answer in progress ends with a
``shutting_down`` error.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import pydantic
from quart import Blueprint, Response, g, request
from quart_schema import document_request, document_response, tag

from ...chat.caller import Caller
from ...chat.relay import RelayRequest, check_relay_body, relay_stream, relay_whole
from ...chat.service import AskRequest, ChatService, Delta, End, Start, validate_conversation_id
from ...errors import InvalidInput, ShuttingDown
from ...storage.sql import new_turn_id
from .streaming import streamed_response

if TYPE_CHECKING:
    from ..http import Stopping

CONVERSATION_HEADER = "X-Conversation-Id"
# Conversation mode: the fields used, and those accepted but ignored (hints that change
# nothing in the answer). Any other field is refused with a 400 that names it.
USED_FIELDS = frozenset(
    {
        "messages",
        "model",
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "stream",
        "stream_options",
        "n",
        "conversation",
        "parent_id",
        "user",  # the end user the turn is for: USER_RPM limits each apart
    }
)
IGNORED_FIELDS = frozenset({"safety_identifier", "metadata", "store", "prompt_cache_key"})
# Values of fields a turn cannot hold that ask for nothing (no tools, plain text): accepted
# as if absent, like a null.
ASKING_NOTHING: dict[str, tuple[Any, ...]] = {
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none",),
    "response_format": ({"type": "text"},),
}
SYSTEM_ROLES = ("system", "developer")
# How several new messages of one role become one text (see conversation_ask).
JOIN_MESSAGES = "\n\n"
JOIN_PARTS = "\n"


# -- the OpenAPI document's view of the request and the answer (the route reads JSON itself)


class TextPart(pydantic.BaseModel):
    type: Literal["text"]
    text: str


class MessageDoc(pydantic.BaseModel):
    """A message; the relay forwards any other message shape too (tool calls, images, …)."""

    model_config = pydantic.ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None


class ChatCompletionRequestDoc(pydantic.BaseModel):
    """OpenAI's chat completion request, plus ``conversation`` and ``parent_id``.

    Without ``conversation`` every field is forwarded to the model provider as
    sent (tools, ``response_format``, ``seed``, image parts…). With it, only
    the fields below are taken, ``user`` too (the end user USER_RPM limits; and
    ``metadata``, ``store``, ``safety_identifier``, ``prompt_cache_key``, ignored).
    """

    model_config = pydantic.ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "Hello"}]},
                {
                    "model": "gpt-4.1-mini",
                    "messages": [{"role": "user", "content": "And my name?"}],
                    "conversation": "123",
                    "stream": True,
                },
            ]
        },
    )

    messages: list[MessageDoc] = pydantic.Field(min_length=1)
    model: str | None = pydantic.Field(None, description="Default: GPT_ENGINE")
    stream: bool | None = None
    stream_options: dict[str, bool] | None = pydantic.Field(
        None, description="include_usage: a last chunk with the usage"
    )
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    conversation: str | None = pydantic.Field(
        None,
        description="A conversation id (or {id}): the server keeps the history and stores the"
        " turn; send only the new message(s). Also as the X-Conversation-Id header.",
    )
    parent_id: str | None = pydantic.Field(
        None, description='Conversation mode: the turn to answer after (a branch); "root" too'
    )


class AssistantMessageDoc(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")

    role: Literal["assistant"]
    content: str | None = None


class ChoiceDoc(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")

    index: int
    message: AssistantMessageDoc
    finish_reason: str | None = None


class ChatCompletionDoc(pydantic.BaseModel):
    """A ``chat.completion``: the provider's (relay), or built from the stored turn."""

    model_config = pydantic.ConfigDict(extra="allow")

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChoiceDoc]
    usage: dict[str, Any] | None = None


# -- the route


def chat_completion_routes(
    blueprint: Blueprint,
    service: ChatService,
    caller: Callable[[], Caller],
    stopping: Stopping,
) -> None:
    """Add ``POST /chat/completions`` to ``blueprint`` (the ``/v1`` one)."""

    @blueprint.post("/chat/completions")
    @document_request(ChatCompletionRequestDoc)
    @document_response(ChatCompletionDoc, 200)
    @tag(["openai"])
    async def chat_completions() -> Response:
        """OpenAI's chat completions: a relay to the model, or with a conversation's memory.

        Without a conversation the request is forwarded to the model provider as
        sent and its answer passed back (``stream: true``: its chunks, then
        ``data: [DONE]``). With ``conversation`` (or the ``X-Conversation-Id``
        header) send only the new message(s): the server adds the stored system
        prompt and the history that fits, and stores the turn. See
        docs/openai-api.md for every field.
        """
        body = await request.get_json()
        conversation_id = conversation_named(body, request.headers.get(CONVERSATION_HEADER))
        if conversation_id is None:
            relayed = RelayRequest(check_relay_body(body), caller=caller())
            g.asked = True  # the relay accounts for it from here on
            if relayed.stream:
                return await streamed_response(
                    relay_stream(service, relayed), _relay_frames, stopping
                )
            with stopping.cut_at_grace_end():
                return Response(await relay_whole(service, relayed), mimetype="application/json")
            raise ShuttingDown("the server is shutting down")
        ask, stream, include_usage = conversation_ask(body, conversation_id, caller())
        g.asked = True  # the core accounts for it from here on
        writer = _ChunkWriter(ask.turn_id, ask.model or service.settings.model, include_usage)
        if stream:
            return await streamed_response(service.ask(ask), writer.frames, stopping)
        with stopping.cut_at_grace_end():
            answer = await service.complete(ask)
            return Response(
                json.dumps(writer.completion(answer.text, answer.end), ensure_ascii=False),
                mimetype="application/json",
            )
        raise ShuttingDown("the server is shutting down")


def conversation_named(body: object, header: str | None) -> str | None:
    """The conversation a request names (body ``conversation`` or the header), or None.

    ``conversation`` may be an id or ``{"id": id}``. Raises InvalidInput
    (``param`` ``conversation``) for a malformed id, or when the body and the
    header name two different conversations.
    """
    named = body.get("conversation") if isinstance(body, dict) else None
    if isinstance(named, dict) and set(named) == {"id"}:
        named = named["id"]
    if named is not None and not isinstance(named, str):
        raise InvalidInput(
            'conversation must be a conversation id or {"id": …}', param="conversation"
        )
    if header is not None and named is not None and header != named:
        raise InvalidInput(
            f"the body names conversation {named!r} and the {CONVERSATION_HEADER} header"
            f" {header!r}; name one",
            param="conversation",
        )
    chosen = named if named is not None else header
    if chosen is None:
        return None
    try:
        return validate_conversation_id(chosen)
    except InvalidInput as exc:
        raise InvalidInput(exc.message, param="conversation") from None


def conversation_ask(
    body: Mapping[str, Any], conversation_id: str, caller: Caller
) -> tuple[AskRequest, bool, bool]:
    """The core ask of a conversation-mode request, and (stream, include_usage).

    - the ``user`` messages are the turn's prompt; several are one prompt,
      their texts joined by a blank line, in order (one turn: the history holds
      turns of one prompt and one answer);
    - ``system`` and ``developer`` messages are this turn's system prompt
      (joined the same way), sent instead of the conversation's stored one,
      as a native ask's ``system``;
    - content is a string or a list of ``text`` parts (joined by a newline);
    - ``model``, ``temperature``, ``top_p``, ``max_completion_tokens`` (or
      ``max_tokens``) are the ask's overrides; ``parent_id`` places the turn
      (a branch, ``"root"``), as on the native API; ``user`` is the end user
      the ask is for (``USER_RPM``).

    Raises InvalidInput naming the field (``param``) for anything a turn cannot
    hold: assistant, tool or function messages (the server keeps the
    history), image, audio or file parts, ``tools`` and every field not in
    USED_FIELDS or IGNORED_FIELDS, ``n`` other than 1, no user message. A field
    that is null, or whose value asks for nothing (ASKING_NOTHING: ``tools: []``,
    ``response_format: {"type": "text"}``…), counts as absent.
    """
    if not isinstance(body, dict):
        raise InvalidInput("the request body must be a JSON object")
    body = {
        name: value
        for name, value in body.items()
        if value is not None and value not in ASKING_NOTHING.get(name, ())
    }
    for name in body:
        if name not in USED_FIELDS and name not in IGNORED_FIELDS:
            raise InvalidInput(
                f"{name} is not supported with a conversation (the turn stores text only);"
                " without a conversation the request is relayed with every field",
                param=name,
            )
    if body.get("n", 1) != 1:
        raise InvalidInput("a conversation takes one answer per turn: n must be 1", param="n")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidInput("messages must be a non-empty array of messages", param="messages")
    prompts: list[str] = []
    systems: list[str] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise InvalidInput("each message must be an object", param=where)
        role = message.get("role")
        if role == "user":
            prompts.append(_text_of(message, where))
        elif role in SYSTEM_ROLES:
            systems.append(_text_of(message, where))
        elif role == "assistant":
            raise InvalidInput(
                "with a conversation send only the new message(s): the server keeps the history"
                " (an assistant message cannot be stored as the prompt of a turn)",
                param=where,
            )
        else:
            raise InvalidInput(
                f"a message of role {role!r} cannot be stored in a conversation (user, system"
                " and developer messages can)",
                param=f"{where}.role",
            )
    if not prompts:
        raise InvalidInput("a conversation turn needs a user message", param="messages")
    prompt = JOIN_MESSAGES.join(prompts)
    if not prompt.strip():
        raise InvalidInput("the user message is empty", param="messages")
    max_tokens = body.get("max_completion_tokens")
    name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, name = body.get("max_tokens"), "max_tokens"
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0
    ):
        raise InvalidInput(f"{name} must be a positive whole number", param=name)
    temperature = body.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not 0 <= temperature <= 2
    ):
        raise InvalidInput("temperature must be a number between 0 and 2", param="temperature")
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise InvalidInput("model must be a non-empty string", param="model")
    parent_id = body.get("parent_id")
    if parent_id is not None and not isinstance(parent_id, str):
        raise InvalidInput("parent_id must be a turn id", param="parent_id")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidInput("stream must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidInput("stream_options must be an object", param="stream_options")
    ask = AskRequest(
        conversation_id=conversation_id,
        prompt=prompt,
        turn_id=new_turn_id(),  # named before the answer: the chunks' id holds it
        model=model,
        temperature=temperature,
        top_p=body.get("top_p"),  # the core checks it
        max_tokens=max_tokens,
        system=JOIN_MESSAGES.join(systems) if systems else None,
        parent_id=parent_id,
        user=body.get("user"),  # the core checks it (limits.checked_user)
        caller=caller,
    )
    return ask, stream is True, bool(options and options.get("include_usage") is True)


def _text_of(message: dict[str, Any], where: str) -> str:
    """The text of a message's content: a string, or text parts; raises InvalidInput otherwise."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise InvalidInput(
            "content must be a string or a non-empty array of text parts", param=f"{where}.content"
        )
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):  # type: ignore[union-attr]
            raise InvalidInput(
                f"a conversation stores text only: a part of type {kind!r} cannot be stored"
                " (without a conversation the request is relayed as sent)",
                param=f"{where}.content[{index}]",
            )
        texts.append(part["text"])  # type: ignore[index]
    return JOIN_PARTS.join(texts)


# -- answers


def _relay_frames(chunks: object) -> bytes:
    """The ``data:`` events of one read's chunks (:func:`~easybackend.chat.relay.relay_stream`)."""
    return b"".join(b"data: %s\n\n" % chunk for chunk in chunks)  # type: ignore[attr-defined]


class _ChunkWriter:
    """A conversation-mode answer in OpenAI's shape, from the core's events.

    Streaming: a first chunk with the role, one chunk per Delta, a last chunk
    with the finish reason (and ``conversation_id``, ``turn_id``), then the
    usage chunk when asked. Every chunk's ``id``, and the whole answer's, is
    ``chatcmpl-<turn id>`` (the id is chosen before the ask). Every chunk's
    ``model`` is the provider model the Start names (an alias or the default
    resolved by the core), as the whole answer's is the End's; ``model`` here
    is only what an answer without a Start would show.
    """

    def __init__(self, turn_id: str, model: str, include_usage: bool) -> None:
        self.id = f"chatcmpl-{turn_id}"
        self.created = int(time.time())
        self.include_usage = include_usage
        self._tail = (
            b', "logprobs": null, "finish_reason": null}]'
            + (b', "usage": null' if include_usage else b"")
            + b"}\n\n"
        )
        self._started = False
        self._named(model)

    def _named(self, model: str) -> None:
        """Name ``model`` in the chunks from now on."""
        self.model = model
        encoded = json.dumps(self._base(), ensure_ascii=False)[:-1]  # without the closing brace
        self._head = f'data: {encoded}, "choices": [{{"index": 0, "delta": '.encode()

    def frames(self, event: object) -> bytes:
        """The events of one core event (the Start, a Delta, or the End)."""
        if isinstance(event, Start):  # the first chunk: the assistant's role
            self._started = True
            if event.model:
                self._named(event.model)
            return self._chunk({"role": "assistant", "content": ""})
        if isinstance(event, Delta):
            delta = (
                self._head
                + b'{"content": %s}' % json.dumps(event.text, ensure_ascii=False).encode()
                + self._tail
            )
            if self._started:
                return delta
            self._started = True
            return self._chunk({"role": "assistant", "content": ""}) + delta
        assert isinstance(event, End)
        frames = b"" if self._started else self._chunk({"role": "assistant", "content": ""})
        frames += self._chunk({}, event)
        if self.include_usage:
            usage = {**self._base(), "choices": [], "usage": event.usage.as_dict()}
            frames += b"data: %s\n\n" % json.dumps(usage, ensure_ascii=False).encode()
        return frames

    def _base(self) -> dict[str, object]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }

    def _chunk(self, delta: dict[str, object], end: End | None = None) -> bytes:
        choice = {
            "index": 0,
            "delta": delta,
            "logprobs": None,
            "finish_reason": end.finish_reason if end else None,
        }
        chunk: dict[str, object] = {**self._base(), "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        if end is not None:
            chunk |= {"conversation_id": end.conversation_id, "turn_id": end.turn_id}
        return b"data: %s\n\n" % json.dumps(chunk, ensure_ascii=False).encode()

    def completion(self, text: str, end: End) -> dict[str, object]:
        """The whole answer as a ``chat.completion``."""
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": end.model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": end.finish_reason,
                }
            ],
            "usage": end.usage.as_dict(),
            "conversation_id": end.conversation_id,
            "turn_id": end.turn_id,
        }
