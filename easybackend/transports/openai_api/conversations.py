"""``/v1/conversations`` and their items: OpenAI's Conversations API over the tree.

These are the native API's conversations: ``conv_…`` for one created here,
and any native id (``"123"``) as it is, so a conversation asked on the
WebSocket can be read here and continued with ``responses.create(
conversation="123")``, and one made here shows in ``GET /conversations/{id}``.
Each key sees only its own (another key's id is 404).

The items of a conversation are the messages of its active path (root to
head), oldest first, each turn giving its prompt (``msg_<turn>_u``) and its
answer (``msg_<turn>_a``; see :mod:`.items` for lone messages), after the
conversation's own system prompt when it has one: the item ``msg_system``
(role ``system``). Adding items appends them after the head without calling
the model (system and developer messages set the system prompt instead);
deleting a message removes that half of its turn (a turn left empty leaves
the tree, its children joining its parent); deleting ``msg_system`` clears
the system prompt.

Errors are OpenAI-shaped (see :mod:`.errors`); every operation takes the
conversation's lock, so it waits for an answer in progress on it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

import pydantic
from quart import Blueprint, Response, request
from quart_schema import document_request, document_response, tag, validate_querystring

from ...chat.caller import Caller
from ...chat.service import ChatService
from ...chat.tree import Tree
from ...errors import InvalidInput, NotFound
from ...storage import ConversationSummary
from . import ids, items
from .items import InputMessage
from .pages import ListQuery, list_page
from .pages import json_response as _json

SYSTEM_ITEM = "msg_system"  # the conversation's own system prompt, as an item


class CreateConversationBody(pydantic.BaseModel):
    """``POST /v1/conversations``: both fields are optional."""

    model_config = pydantic.ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "metadata": {"topic": "demo"},
                    "items": [
                        {"role": "system", "content": "You are a pirate."},
                        {"role": "user", "content": "Hello!"},
                    ],
                }
            ]
        }
    )

    items: list[InputMessage] | None = pydantic.Field(
        None,
        description="Initial messages: user and assistant ones become turns (the model is not"
        " called), system and developer ones the conversation's system prompt",
    )
    metadata: dict[str, str] | None = pydantic.Field(None, description="Up to 16 pairs")


class UpdateConversationBody(pydantic.BaseModel):
    metadata: dict[str, str] | None = pydantic.Field(description="Replaces the metadata")


class CreateItemsBody(pydantic.BaseModel):
    items: list[InputMessage] = pydantic.Field(
        description="Messages appended after the head, without calling the model"
    )


class ConversationBody(pydantic.BaseModel):
    """A conversation (OpenAI's ``Conversation``)."""

    id: str
    object: Literal["conversation"]
    created_at: int
    metadata: dict[str, str]


class ConversationDeletedBody(pydantic.BaseModel):
    id: str
    object: Literal["conversation.deleted"]
    deleted: bool


def conversation_object(summary: ConversationSummary) -> dict[str, Any]:
    """The Conversation object (``openai.types.conversations.Conversation``)."""
    return {
        "id": summary.conversation_id,
        "object": "conversation",
        "created_at": int(summary.created_at),
        "metadata": items.stored_metadata(summary.metadata),
    }


def _system_item(text: str) -> dict[str, Any]:
    return items.message_item(SYSTEM_ITEM, "system", text)


def _body(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput("the request body must be a JSON object")
    return value


def _unknown(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidInput(f"unknown parameter: {unknown[0][:64]!r}", param=unknown[0][:64])


def conversation_routes(
    blueprint: Blueprint, service: ChatService, caller: Callable[[], Caller]
) -> None:
    """Add the /v1/conversations routes over ``service`` to ``blueprint`` (the ``/v1`` one);
    ``caller()`` is the request's Caller."""

    async def add_items(
        conversation_id: str, messages: list[items.Message], asking: Caller
    ) -> list[dict[str, Any]]:
        """Add ``messages`` to the conversation; the items they became, in order."""
        system = [message.text for message in messages if message.role in items.SYSTEM_ROLES]
        talk = [message for message in messages if message.role not in items.SYSTEM_ROLES]
        added: list[dict[str, Any]] = []
        if system:
            prompt = items.system_prompt(system)
            await service.set_system_prompt(conversation_id, prompt, caller=asking)
            added.append(_system_item(prompt or ""))
        turns = items.pair(talk)
        if turns:
            await service.add_turns(conversation_id, turns, caller=asking)
        for turn in turns:
            assert turn.turn_id is not None  # pair gives each turn its id
            if turn.prompt:
                added.append(
                    items.message_item(ids.message_id(turn.turn_id, "user"), "user", turn.prompt)
                )
            if turn.answer:
                item_id = ids.message_id(turn.turn_id, "assistant")
                added.append(items.message_item(item_id, "assistant", turn.answer))
        return added

    async def summary_of(conversation_id: str, asking: Caller) -> ConversationSummary:
        return await service.conversation_summary(conversation_id, caller=asking)

    @blueprint.post("/conversations")
    @document_request(CreateConversationBody)
    @document_response(ConversationBody, 200)
    @tag(["openai"])
    async def create_conversation() -> Response:
        """Create a conversation (``conv_…``) with ``metadata`` and initial ``items``: its
        messages become turns without calling the model."""
        body = _body(await request.get_json())
        _unknown(body, {"items", "metadata"})
        metadata = items.checked_metadata(body.get("metadata"))
        given = body.get("items")
        messages = items.parse_messages(given, "items") if given is not None else []
        asking = caller()
        conversation_id = ids.new_conversation_id()
        await service.create_conversation(
            conversation_id, json.dumps(metadata, ensure_ascii=False), caller=asking
        )
        await add_items(conversation_id, messages, asking)
        return _json(conversation_object(await summary_of(conversation_id, asking)))

    @blueprint.get("/conversations/<conversation_id>")
    @document_response(ConversationBody, 200)
    @tag(["openai"])
    async def get_conversation(conversation_id: str) -> Response:
        """A conversation: its id, creation time and metadata."""
        return _json(conversation_object(await summary_of(conversation_id, caller())))

    @blueprint.post("/conversations/<conversation_id>")
    @document_request(UpdateConversationBody)
    @document_response(ConversationBody, 200)
    @tag(["openai"])
    async def update_conversation(conversation_id: str) -> Response:
        """Replace the conversation's metadata."""
        body = _body(await request.get_json())
        _unknown(body, {"metadata"})
        if "metadata" not in body:
            raise InvalidInput("metadata is required", param="metadata")
        metadata = items.checked_metadata(body["metadata"])
        asking = caller()
        await service.set_metadata(
            conversation_id, json.dumps(metadata, ensure_ascii=False), caller=asking
        )
        return _json(conversation_object(await summary_of(conversation_id, asking)))

    @blueprint.delete("/conversations/<conversation_id>")
    @document_response(ConversationDeletedBody, 200)
    @tag(["openai"])
    async def delete_conversation(conversation_id: str) -> Response:
        """Delete the conversation and all its turns."""
        await service.delete_conversation(conversation_id, caller=caller())
        return _json({"id": conversation_id, "object": "conversation.deleted", "deleted": True})

    @blueprint.get("/conversations/<conversation_id>/items")
    @validate_querystring(ListQuery)
    @document_response(items.ItemList, 200)
    @tag(["openai"])
    async def list_items(conversation_id: str, query_args: ListQuery) -> Response:
        """The conversation's items, a page at a time (default order ``desc``)."""
        detail = await service.get_conversation(conversation_id, caller=caller())
        found = [_system_item(detail.summary.system_prompt)] if detail.summary.system_prompt else []
        for turn in Tree(detail).path():
            found.extend(items.turn_items(turn))
        return _json(list_page(found, query_args))

    @blueprint.post("/conversations/<conversation_id>/items")
    @document_request(CreateItemsBody)
    @document_response(items.ItemList, 200)
    @tag(["openai"])
    async def create_items(conversation_id: str) -> Response:
        """Append items after the head, without calling the model; the items made."""
        body = _body(await request.get_json())
        _unknown(body, {"items"})
        if body.get("items") is None:
            raise InvalidInput("items is required: a list of message items", param="items")
        messages = items.parse_messages(body["items"], "items")
        asking = caller()
        await summary_of(conversation_id, asking)  # NotFound before anything is changed
        added = await add_items(conversation_id, messages, asking)
        return _json(list_page(added, ListQuery(order="asc", limit=max(len(added), 1))))

    async def system_prompt_of(conversation_id: str, asking: Caller) -> str:
        """The conversation's system prompt (its system item); NotFound when it has none."""
        summary = await summary_of(conversation_id, asking)
        if not summary.system_prompt:
            raise NotFound(f"no item {SYSTEM_ITEM!r}")
        return summary.system_prompt

    @blueprint.get("/conversations/<conversation_id>/items/<item_id>")
    @document_response(items.MessageItem, 200)
    @tag(["openai"])
    async def get_item(conversation_id: str, item_id: str) -> Response:
        """One item of the conversation (any turn of its tree, on the active path or not)."""
        asking = caller()
        if item_id == SYSTEM_ITEM:
            return _json(_system_item(await system_prompt_of(conversation_id, asking)))
        turn_id, role = ids.message_of_item(item_id)
        turn = await service.find_turn(conversation_id, turn_id, caller=asking)
        for item in items.turn_items(turn):
            if item["id"] == item_id:
                return _json(item)
        raise NotFound(f"no item {item_id!r}")

    @blueprint.delete("/conversations/<conversation_id>/items/<item_id>")
    @document_response(ConversationBody, 200)
    @tag(["openai"])
    async def delete_item(conversation_id: str, item_id: str) -> Response:
        """Delete one item; the conversation afterwards."""
        asking = caller()
        if item_id == SYSTEM_ITEM:
            await system_prompt_of(conversation_id, asking)  # NotFound without one
            await service.set_system_prompt(conversation_id, None, caller=asking)
        else:
            turn_id, role = ids.message_of_item(item_id)
            await service.clear_message(conversation_id, turn_id, role, caller=asking)
        return _json(conversation_object(await summary_of(conversation_id, asking)))
