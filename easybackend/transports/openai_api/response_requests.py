"""The body of ``POST /v1/responses``, checked (:func:`parse_create`), and the schemas of the
Responses routes (OpenAPI document). Errors are InvalidInput naming the field at fault."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import pydantic

from ...errors import InvalidInput
from . import items

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
    "background",
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
REFUSED = {"tools", "tool_choice", "prompt", "text"}  # see _refused


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
    background: bool | None = pydantic.Field(
        None,
        description="Keep answering when the client goes away: poll it, reattach to its"
        " stream (starting_after), cancel it. Needs store",
    )
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
    status: Literal["queued", "in_progress", "completed", "incomplete", "cancelled", "failed"]
    background: bool
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
    background: bool  # answered in the service's nursery (SPEC §18), whatever the client does


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
    background = bool(_optional(body, "background", bool))
    if background and store is False:
        # OpenAI's answer to the same request: a 400 naming background
        raise InvalidInput(
            "background responses must be stored: store cannot be false with background true",
            param="background",
        )
    return CreateBody(
        messages=messages,
        settings=_settings(body),
        model=model,
        conversation=conversation,
        previous_response_id=previous,
        store=True if store is None else store,
        stream=bool(stream),
        background=background,
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
        "background": bool(body.get("background")),
    }


def _refused(body: dict[str, Any]) -> None:
    """Refuse what cannot be done over chat completions and text turns, unless it asks nothing."""
    if body.get("tools"):
        raise InvalidInput("tools are not supported by this server's Responses API", param="tools")
    if body.get("tool_choice") not in (None, "auto", "none"):
        raise InvalidInput("tool_choice is not supported (there are no tools)", param="tool_choice")
    if body.get("prompt") is not None:
        raise InvalidInput("prompt templates are not supported", param="prompt")
    text = body.get("text")
    if text is not None:
        form = text.get("format") if isinstance(text, dict) else text
        if form is not None and (not isinstance(form, dict) or form.get("type") != "text"):
            raise InvalidInput(
                "only plain text output is supported (text.format type 'text')", param="text"
            )
