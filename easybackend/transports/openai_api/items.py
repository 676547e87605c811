"""Items ⇄ turns: the OpenAI API's message items and the turns of the tree they are.

A turn holds a user message (its prompt) and an assistant message (its
answer). Messages a client gives (a response's ``input``, a conversation's
``items``) are paired in order: a user message followed by an assistant
message is one turn; any other message is a turn of its own whose other half
is empty (a **lone** message: a user message not answered yet, an assistant
message such as a greeting). An empty half is not an item, and the context
sent upstream leaves it out. System and developer messages are not turns:
they make a system prompt (a response's, or a conversation's).

Only text is stored: a message's ``content`` is a string or a list of
``input_text`` / ``output_text`` parts (joined with a newline). Any other item
type (function calls, reasoning…) or part type (images, files, audio) is
refused with InvalidInput naming the field (``input[2].content[0].type``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any, Literal

import pydantic

from ...chat.service import GivenTurn, checked_text
from ...errors import InvalidInput
from ...storage import TurnRecord
from ...storage.sql import new_turn_id
from . import ids

TEXT_PARTS = ("input_text", "output_text")
CONVERSATION_ROLES = ("user", "assistant")
SYSTEM_ROLES = ("system", "developer")
# OpenAI's limits on metadata: keys and values are strings.
METADATA_KEYS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512
# Finish reasons of an answer that did not end by itself (its message is "incomplete").
INCOMPLETE = ("length", "content_filter", "cancelled")


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """One text message a client gave."""

    role: str  # user, assistant, system or developer
    text: str


def parse_messages(value: object, param: str) -> list[Message]:
    """The messages of ``value`` (a list of message items, as ``param`` of the request).

    Raises InvalidInput naming the field at fault.
    """
    if not isinstance(value, list):
        raise InvalidInput(f"{param} must be a list of message items", param=param)
    return [_message(item, f"{param}[{index}]") for index, item in enumerate(value)]


def _message(item: object, where: str) -> Message:
    if not isinstance(item, dict):
        raise InvalidInput(f"{where} must be a message object", param=where)
    kind = item.get("type", "message")
    if kind != "message":
        raise InvalidInput(
            f"{where}: items of type {str(kind)[:40]!r} are not supported; only text messages"
            " (type 'message') are",
            param=f"{where}.type",
        )
    role = item.get("role")
    if role not in CONVERSATION_ROLES + SYSTEM_ROLES:
        raise InvalidInput(
            f"{where}.role must be one of user, assistant, system, developer",
            param=f"{where}.role",
        )
    text = _text(item.get("content"), f"{where}.content")
    if not text:
        raise InvalidInput(f"{where}.content must not be empty", param=f"{where}.content")
    return Message(role, text)


def _text(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidInput(f"{where} must be a string or a list of text parts", param=where)
    texts = []
    for index, part in enumerate(content):
        at = f"{where}[{index}]"
        if not isinstance(part, dict):
            raise InvalidInput(f"{at} must be a content part object", param=at)
        if part.get("type") not in TEXT_PARTS:
            raise InvalidInput(
                f"{at}: content parts of type {str(part.get('type'))[:40]!r} are not supported;"
                " only text (input_text, output_text) is",
                param=f"{at}.type",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidInput(f"{at}.text must be a string", param=f"{at}.text")
        texts.append(text)
    return "\n".join(texts)


def pair(messages: Sequence[Message], *, extra: str | None = None) -> list[GivenTurn]:
    """The conversation messages (user, assistant) paired into turns, each with a new id."""
    turns: list[GivenTurn] = []
    pending: str | None = None  # a user message waiting for its answer
    for message in messages:
        if message.role == "user":
            if pending is not None:
                turns.append(GivenTurn(pending, "", new_turn_id(), extra))
            pending = message.text
        else:
            turns.append(GivenTurn(pending or "", message.text, new_turn_id(), extra))
            pending = None
    if pending is not None:
        turns.append(GivenTurn(pending, "", new_turn_id(), extra))
    return turns


def system_prompt(parts: Sequence[str | None]) -> str | None:
    """The texts given (the instructions, system and developer messages) as one system prompt."""
    texts = [part for part in parts if part]
    return "\n\n".join(texts) if texts else None


def message_item(item_id: str, role: str, text: str, status: str = "completed") -> dict[str, Any]:
    """The item of one message: a ConversationItem (``message``) or a response input item."""
    if role == "assistant":
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    else:
        content = [{"type": "input_text", "text": text}]
    return {"id": item_id, "type": "message", "status": status, "role": role, "content": content}


def turn_items(turn: TurnRecord) -> list[dict[str, Any]]:
    """The message items of a turn, in order: its prompt, then its answer (empty halves left out)."""
    items = []
    if turn.prompt:
        items.append(message_item(ids.message_id(turn.turn_id, "user"), "user", turn.prompt))
    if turn.answer:
        status = "incomplete" if turn.finish_reason in INCOMPLETE else "completed"
        item_id = ids.message_id(turn.turn_id, "assistant")
        items.append(message_item(item_id, "assistant", turn.answer, status))
    return items


def checked_metadata(value: object, param: str = "metadata") -> dict[str, str]:
    """``value`` if it is OpenAI metadata (at most 16 string pairs, keys ≤ 64 and values ≤ 512
    characters; None is no metadata); raises InvalidInput naming ``param``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{param} must be an object of strings", param=param)
    if len(value) > METADATA_KEYS:
        raise InvalidInput(f"{param} may hold at most {METADATA_KEYS} keys", param=param)
    for key, text in value.items():
        if len(key) > METADATA_KEY_CHARS:
            raise InvalidInput(
                f"{param} keys may have at most {METADATA_KEY_CHARS} characters", param=param
            )
        if not isinstance(text, str) or len(text) > METADATA_VALUE_CHARS:
            raise InvalidInput(
                f"{param}[{key[:64]!r}] must be a string of at most {METADATA_VALUE_CHARS}"
                " characters",
                param=param,
            )
        try:
            checked_text(param, key + text)
        except InvalidInput as exc:
            raise InvalidInput(exc.message, param=param) from None
    return value


def stored_metadata(text: str | None) -> dict[str, str]:
    """Metadata as a conversation keeps it (JSON text), as an object again."""
    if not text:
        return {}
    value = json.loads(text)
    return value if isinstance(value, dict) else {}


# The OpenAPI document's view of messages (the routes parse bodies themselves, so that an error
# names its field as OpenAI's do).


class TextPart(pydantic.BaseModel):
    """A text content part."""

    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(pydantic.BaseModel):
    """A message item: text, as a string or text parts."""

    model_config = pydantic.ConfigDict(extra="allow")

    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[TextPart]


class OutputPart(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")

    type: Literal["input_text", "output_text"]
    text: str


class MessageItem(pydantic.BaseModel):
    """A message item as stored: ``msg_<turn>_u`` (user), ``msg_<turn>_a`` (assistant)."""

    model_config = pydantic.ConfigDict(extra="allow")

    id: str
    type: Literal["message"]
    status: Literal["in_progress", "completed", "incomplete"]
    role: str
    content: list[OutputPart]


class ItemList(pydantic.BaseModel):
    """A page of items (``after``, ``limit``, ``order``)."""

    object: Literal["list"]
    data: list[MessageItem]
    first_id: str | None
    last_id: str | None
    has_more: bool
