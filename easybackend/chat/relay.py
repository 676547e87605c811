"""The stateless relay: a client's chat-completion request sent to the model as it came.

What ``POST /v1/chat/completions`` does without a conversation (SPEC §13).
Nothing is read or stored. The request goes to the provider unchanged, every
field it holds (tools, ``response_format``, image parts, ``seed``…) included,
but for two things:

- ``model`` is the provider model :meth:`ChatService.model_for` chose: the
  one named, or ``GPT_ENGINE`` when the request names none, an alias of
  ``MODELS`` giving its provider model; a model outside ``MODELS`` (or the
  caller's key's own list) is refused with ModelNotAllowed before any
  upstream call;
- a streaming request asks for usage (``stream_options.include_usage``), so
  that the ask's tokens are counted.

The provider's answer comes back unchanged, but for what that second change
adds and the client did not ask for: the usage chunk and the ``usage: null``
of every other chunk. A non-streaming request is sent non-streaming, and its
answer is passed back as the provider wrote it.

A relayed ask is an ask like any other: admitted against
``MAX_STREAMS_PER_KEY`` (:meth:`ChatService._admitted`) and the key's limits
(:meth:`ChatService.admit`: rpm, tpm, budgets, and ``USER_RPM`` for the
request's ``user``), its tokens charged to the key when it ends (a stream
cut short: the prompt and the part received, counted here), given one access
line and its metrics (:func:`~.accounting.record_for`; the conversation shown
is ``-``, the upstream the one that answered), with the upstream client's retries before the first byte, its
timeouts and its checks of what the provider sends (line limits, JSON that
parses into objects, no error event). Tokens are the provider's usage figures
or, when it reports none, counted here.

Errors are :class:`~easybackend.errors.ChatError` subclasses; the provider's
refusal of a request is :class:`~easybackend.errors.UpstreamRejected` with its
status. On cancellation, or when the consumer closes :func:`relay_stream`
early, the upstream call is closed at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

import trio

from ..errors import InvalidInput
from ..governance.limits import Ticket
from ..upstream.openai_client import MAX_REPORTED_TOKENS
from .accounting import AskRecord, record_for
from .caller import Caller

if TYPE_CHECKING:
    from .service import ChatService

STORE_ON_CANCEL_SECONDS = 5.0  # how long counting a cut answer may take once cancelled
NO_CONVERSATION = "-"  # what a relayed ask's access line shows as its conversation
# A chunk that ends with this member gets it cut when the client asked for no usage (the form
# OpenAI and most providers write; any other form is re-encoded without the member).
_NULL_USAGE = b',"usage":null}'


@dataclasses.dataclass(frozen=True, slots=True)
class RelayRequest:
    """One relayed request: the client's JSON object, checked by :func:`check_relay_body`."""

    body: Mapping[str, Any]
    caller: Caller = dataclasses.field(kw_only=True)

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True

    @property
    def include_usage(self) -> bool:
        """Whether the client asked for the usage chunk (``stream_options.include_usage``)."""
        options = self.body.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True


def check_relay_body(body: object) -> Mapping[str, Any]:
    """``body`` if it is a request the relay can forward; raises InvalidInput naming the field.

    Only what the relay itself relies on is checked (what the provider would
    refuse anyway, refused here without a call): a JSON object whose
    ``messages`` is a non-empty list of objects with a string ``role``,
    ``model`` (if given) a non-empty string, ``stream`` a boolean and
    ``stream_options`` an object. Every other field is the provider's to judge.
    """
    if not isinstance(body, dict):
        raise InvalidInput("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidInput("messages must be a non-empty array of messages", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidInput(
                "each message must be an object with a string role", param=f"messages[{index}]"
            )
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise InvalidInput("model must be a non-empty string", param="model")
    if "stream" in body and body["stream"] is not None and not isinstance(body["stream"], bool):
        raise InvalidInput("stream must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidInput("stream_options must be an object", param="stream_options")
    return body


def upstream_body(request: RelayRequest, model: str) -> bytes:
    """The JSON sent to the provider: the client's, with ``model`` (the provider model chosen
    for it) and, streaming, usage asked for.

    Encoded as UTF-8; a string holding a lone surrogate (which the client can
    send as a ``\\ud800`` escape) is sent escaped as it came.
    """
    body = dict(request.body)
    body["model"] = model
    if request.stream:
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    try:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        return json.dumps(body, separators=(",", ":")).encode()


async def relay_stream(service: ChatService, request: RelayRequest) -> AsyncIterator[list[bytes]]:
    """Relay a streaming request: per read of the provider's stream, the chunks the client gets.

    Each chunk is the JSON text of one ``chat.completion.chunk`` (the caller
    frames them as ``data:`` events and adds ``data: [DONE]`` once this
    ends). The chunks that come before any output (the one that only names
    the role) are held and sent with the first that carries some: one write
    less before the first token, and the first item is the answer's start. Raises ChatError subclasses (TooManyRequests before any upstream
    call when the caller has MAX_STREAMS_PER_KEY answers in progress). On
    cancellation or an early close the upstream call is closed; the ask is
    accounted as ``cancelled``.
    """
    record = record_for(service.metrics, request.caller, NO_CONVERSATION)
    include_usage = request.include_usage
    tally = _Tally()
    try:
        with service._admitted(request):  # type: ignore[arg-type]
            model = service.model_for(request.body.get("model"), caller=request.caller)
            await tally.admit(service, request, model)
            body = upstream_body(request, model)
            held: list[bytes] = []  # the leading chunks without output (the role chunk)
            answering = False
            relayed = service.upstream.relay_stream(body, model, answered_by=record.answered_by)
            async with contextlib.aclosing(relayed) as stream:
                async for chunks in stream:
                    sent, held = held, []
                    for data, chunk in chunks:
                        if tally.take(chunk) and not answering:
                            answering = True
                            record.first_piece()
                        if include_usage or "usage" not in chunk:
                            sent.append(data)
                        elif (trimmed := _without_usage(data, chunk)) is not None:
                            sent.append(trimmed)
                    if not answering:
                        held = sent  # sent with the first output, in the same write
                    elif sent:
                        yield sent
            if held:
                yield held
            await tally.account(service, request, record)
    except BaseException as exc:
        record.failed(exc)
        await tally.settle(service, request, record)  # cut short: what was received counts
        raise
    finally:
        record.close()


async def relay_whole(service: ChatService, request: RelayRequest) -> bytes:
    """Relay a non-streaming request: the provider's ``chat.completion``, as it wrote it.

    Raises ChatError subclasses, as :func:`relay_stream`. On cancellation the
    upstream call is closed; the ask is accounted as ``cancelled``.
    """
    record = record_for(service.metrics, request.caller, NO_CONVERSATION)
    tally = _Tally()
    try:
        with service._admitted(request):  # type: ignore[arg-type]
            model = service.model_for(request.body.get("model"), caller=request.caller)
            await tally.admit(service, request, model)
            body = upstream_body(request, model)
            data, answer = await service.upstream.relay_whole(
                body, model, answered_by=record.answered_by
            )
        record.first_piece()
        tally.usage = _usage_of(answer.get("usage"))
        if tally.usage is None:
            for choice in _choices(answer):
                message = choice.get("message")
                if isinstance(message, dict) and isinstance(message.get("content"), str):
                    tally.pieces.append(message["content"])
        await tally.account(service, request, record)
        return data
    except BaseException as exc:
        record.failed(exc)
        raise
    finally:
        record.close()


class _Tally:
    """What a relayed answer cost: the provider's usage, else the text to count; and its
    place in the key's limits, charged once."""

    __slots__ = ("charged", "model", "pieces", "ticket", "usage")

    def __init__(self) -> None:
        self.usage: tuple[int, int] | None = None
        self.pieces: list[str] = []  # the answer's text, kept while no usage has come
        self.ticket: Ticket | None = None  # admitted by the limits (ChatService.admit)
        self.model = ""  # the provider model called: what the usage is counted under
        self.charged = False

    async def admit(self, service: ChatService, request: RelayRequest, model: str) -> None:
        """The key's limits and the request's ``user``'s (raises as ChatService.admit)."""
        self.ticket = await service.admit(request.caller, request.body.get("user"))
        self.model = model

    def take(self, chunk: dict[str, Any]) -> bool:
        """Note a chunk's usage and text; True when it carries output.

        Output is any field of a choice's ``delta`` but ``role`` that is not
        empty: content, tool calls, a refusal, a provider's own (a reasoning
        model's ``reasoning_content``), or a finish reason.
        """
        if (usage := chunk.get("usage")) is not None:
            self.usage = _usage_of(usage) or self.usage
        output = False
        for choice in _choices(chunk):
            if choice.get("finish_reason"):
                output = True
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            content = delta.get("content")
            if isinstance(content, str) and content:
                self.pieces.append(content)
                output = True
            elif not output:
                output = any(value for name, value in delta.items() if name != "role")
        return output

    async def account(self, service: ChatService, request: RelayRequest, record: AskRecord) -> None:
        """Record the answer's tokens (the provider's figures, else counted off the event loop)
        and charge them to the key."""
        record.answered(*await self._figures(service, request))
        await self._charge(service, record)

    async def settle(self, service: ChatService, request: RelayRequest, record: AskRecord) -> None:
        """Charge an answer cut short (cancelled, failed) with what it received, if anything:
        shielded, so a client that hangs up before the end still pays for what it got."""
        if self.ticket is None or self.charged or (self.usage is None and not self.pieces):
            return
        with trio.CancelScope(shield=True), trio.move_on_after(STORE_ON_CANCEL_SECONDS):
            record.tokens(*await self._figures(service, request))
        await self._charge(service, record)

    async def _figures(self, service: ChatService, request: RelayRequest) -> tuple[int, int]:
        if self.usage is not None:
            return self.usage
        counter = service.counter
        prompt = await counter.text_off_loop(_messages_text(request.body.get("messages")))
        return prompt, await counter.text_off_loop("".join(self.pieces))

    async def _charge(self, service: ChatService, record: AskRecord) -> None:
        if self.ticket is None or self.charged:
            return
        self.charged = True
        tokens = (record.prompt_tokens, record.completion_tokens)
        if any(tokens):
            await service.charge(self.ticket, self.model, *tokens)


def _choices(payload: dict[str, Any]) -> list[dict[str, Any]]:
    choices = payload.get("choices")
    if not isinstance(choices, list):
        return []
    return [choice for choice in choices if isinstance(choice, dict)]


def _usage_of(usage: object) -> tuple[int, int] | None:
    """(prompt, completion) tokens of a provider's usage object, if both are believable."""
    if not isinstance(usage, dict):
        return None
    figures = (usage.get("prompt_tokens"), usage.get("completion_tokens"))
    if all(type(value) is int and 0 <= value <= MAX_REPORTED_TOKENS for value in figures):
        return figures  # type: ignore[return-value]
    return None


def _without_usage(data: bytes, chunk: dict[str, Any]) -> bytes | None:
    """A chunk as a client that asked for no usage gets it: None for the usage chunk itself."""
    if chunk["usage"] is not None and not chunk.get("choices"):
        return None  # the usage chunk (no choices): not asked for
    if chunk["usage"] is None and data.endswith(_NULL_USAGE):
        return data[: -len(_NULL_USAGE)] + b"}"
    trimmed = {name: value for name, value in chunk.items() if name != "usage"}
    return json.dumps(trimmed, separators=(",", ":")).encode()


def _messages_text(messages: object) -> str:
    """The text of the messages (string content and text parts), to count when no usage came."""
    texts: list[str] = []
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(
                part["text"]
                for part in content
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            )
    return "\n".join(texts)
