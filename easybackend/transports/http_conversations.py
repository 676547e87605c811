"""HTTP conversation management: list (and search), read, delete, roll back, move the head,
delete a branch, set the system prompt and the conversation's settings, read, edit and force
its summary (chat/memory.py).

A blueprint registered by :func:`easybackend.transports.http.create_app`.
Every operation is a thin call of the chat core with the request's
:class:`~easybackend.chat.caller.Caller` (made by the HTTP app before any
route runs); the core validates ids and raises NotFound (404) for unknown
conversations; errors use the JSON error body of the HTTP transport. Times
are ISO 8601 in UTC.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import pydantic
from quart import Blueprint, Response, request
from quart_schema import (
    document_request,
    document_response,
    tag,
    validate_querystring,
    validate_request,
)

from ..chat.caller import Caller
from ..chat.service import MAX_PAGE, ChatService
from ..chat.views import (
    conversation_detail,
    conversation_settings,
    conversation_summary,
    memory_summary,
)
from ..errors import InvalidInput
from ..storage import ROOT
from .openapi import UsageBody

EXAMPLE_TIME = "2026-11-25T17:19:00.123Z"


class SettingsOut(pydantic.BaseModel):
    """A conversation's own settings (null: the server's setting applies)."""

    model: str | None = pydantic.Field(description="Model of its asks (GPT_ENGINE)")
    temperature: float | None = pydantic.Field(description="Sampling temperature (TEMPERATURE)")
    max_context_tokens: int | None = pydantic.Field(
        description="Token budget of its asks (MAX_CONTEXT_TOKENS, which bounds it)"
    )
    memory: str | None = pydantic.Field(
        description="truncate (drop the oldest turns) or summarize (MEMORY)"
    )
    system: str | None = pydantic.Field(description="Its system prompt (FIRST_PROMPT)")
    title: str | None
    expires_in: float | None = pydantic.Field(
        description="Seconds idle before it is forgotten, 0: never (CONVERSATION_TTL)"
    )


class ConversationSummaryBody(pydantic.BaseModel):
    """A conversation as listed."""

    conversation_id: str
    system_prompt: str | None = pydantic.Field(
        description="The conversation's own system prompt, if set"
    )
    turns: int = pydantic.Field(description="Turns on the active path (root to head)")
    stored_turns: int = pydantic.Field(description="Turns the tree holds, every branch included")
    head: str | None = pydantic.Field(
        description="The id of the turn the next ask continues from; null: a new first turn"
    )
    usage: UsageBody = pydantic.Field(
        description="Tokens of every turn answered, rolled-back and deleted ones included"
    )
    created_at: str
    last_activity: str
    title: str | None = pydantic.Field(None, description="The conversation's title, if any")
    settings: SettingsOut | None = pydantic.Field(
        None, description="The conversation's own settings; null ones are the server's"
    )


class ConversationPage(pydantic.BaseModel):
    """One page of conversations, most recently active first."""

    model_config = pydantic.ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "conversations": [
                        {
                            "conversation_id": "123",
                            "system_prompt": None,
                            "turns": 2,
                            "stored_turns": 3,
                            "head": "9a3c0f6de1b24e5f8a7b6c5d",
                            "usage": {
                                "prompt_tokens": 40,
                                "completion_tokens": 22,
                                "total_tokens": 62,
                            },
                            "created_at": EXAMPLE_TIME,
                            "last_activity": EXAMPLE_TIME,
                        }
                    ],
                    "next_cursor": None,
                }
            ]
        }
    )

    conversations: list[ConversationSummaryBody]
    next_cursor: str | None = pydantic.Field(
        description="Pass as ?cursor= for the next page; null on the last"
    )


class ListQuery(pydantic.BaseModel):
    limit: int = pydantic.Field(
        50, ge=1, le=MAX_PAGE, description=f"Conversations per page (1-{MAX_PAGE})"
    )
    cursor: str | None = pydantic.Field(None, description="next_cursor of the previous page")
    q: str | None = pydantic.Field(
        None,
        min_length=1,
        max_length=200,
        description="Search: only conversations whose title, or one of whose prompts or answers,"
        " holds every word of it (case-insensitive; Chinese words are found inside sentences),"
        " best first",
    )


class MessageBody(pydantic.BaseModel):
    role: str = pydantic.Field(description="user or assistant")
    text: str
    tokens: int = pydantic.Field(description="Tokens of the text (tiktoken)")


class TurnBody(pydantic.BaseModel):
    """One turn: the user's prompt and the assistant's answer, and its place in the tree."""

    id: str = pydantic.Field(description="The turn's id (opaque, URL-safe)")
    parent_id: str | None = pydantic.Field(
        description="The turn it answers after; null: a first turn"
    )
    siblings: list[str] = pydantic.Field(
        description="Ids of the children of its parent, itself included, oldest first (‹ 2/3 ›)"
    )
    turn: int = pydantic.Field(description="Position on its path, from 1")
    messages: list[MessageBody]
    model: str
    finish_reason: str = pydantic.Field(description="stop, length, … or cancelled")
    usage: UsageBody
    created_at: str = pydantic.Field(description="When the ask arrived")
    finished_at: str = pydantic.Field(description="When the answer ended")


class ConversationBody(ConversationSummaryBody):
    """A whole conversation."""

    model_config = pydantic.ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "conversation_id": "123",
                    "system_prompt": "You are a pirate.",
                    "turns": 1,
                    "stored_turns": 2,
                    "head": "5c668971bf44ff809097e1a5",
                    "usage": {"prompt_tokens": 40, "completion_tokens": 18, "total_tokens": 58},
                    "created_at": EXAMPLE_TIME,
                    "last_activity": EXAMPLE_TIME,
                    "history": [
                        {
                            "id": "5c668971bf44ff809097e1a5",
                            "parent_id": None,
                            "siblings": ["4e5e55f4cf50f78dfc921c43", "5c668971bf44ff809097e1a5"],
                            "turn": 1,
                            "messages": [
                                {"role": "user", "text": "Hello", "tokens": 1},
                                {"role": "assistant", "text": "Ahoy, matey!", "tokens": 5},
                            ],
                            "model": "gpt-4.1-mini",
                            "finish_reason": "stop",
                            "usage": {
                                "prompt_tokens": 20,
                                "completion_tokens": 9,
                                "total_tokens": 29,
                            },
                            "created_at": EXAMPLE_TIME,
                            "finished_at": EXAMPLE_TIME,
                        }
                    ],
                }
            ]
        }
    )

    history: list[TurnBody] = pydantic.Field(description="The active path, root to head")
    tree: list[TurnBody] | None = pydantic.Field(
        None, description="With ?view=tree: every turn of the tree, oldest first"
    )


class ConversationQuery(pydantic.BaseModel):
    view: Literal["path", "tree"] = pydantic.Field(
        "path", description="path: the active path as history; tree: every turn as well"
    )


class RollbackBody(pydantic.BaseModel):
    """A rollback. ``turns`` is a JSON integer: ``true``, ``1.0`` or ``"1"`` is refused (400)."""

    model_config = pydantic.ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [{"turns": 1}]}
    )

    turns: int = pydantic.Field(ge=1, description="How many turns to move the head back")


class RollbackResult(pydantic.BaseModel):
    conversation_id: str
    removed: int = pydantic.Field(
        description="Turns the head moved back past (fewer than asked if the path was shorter);"
        " they stay in the tree as a branch"
    )
    turns: int = pydantic.Field(description="Turns left on the active path")
    head: str | None = pydantic.Field(description="The new head's id; null: a new first turn next")


class HeadBody(pydantic.BaseModel):
    """A head switch. ``turn_id`` is a JSON string: a number or ``null`` is refused (400)."""

    model_config = pydantic.ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"turn_id": "5c668971bf44ff809097e1a5"}]},
    )

    turn_id: str = pydantic.Field(
        description='The turn the next ask continues from; "root": a new first turn'
    )


class HeadResult(pydantic.BaseModel):
    conversation_id: str
    head: str | None


class DeleteTurnResult(pydantic.BaseModel):
    conversation_id: str
    deleted: int = pydantic.Field(description="Turns deleted: the turn and its descendants")
    head: str | None = pydantic.Field(
        description="The head after (the deleted turn's parent if the head was among them)"
    )


class SystemBody(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"prompt": "You only answer questions about medicine."}]},
    )

    prompt: str | None = pydantic.Field(
        description="The conversation's system prompt; empty or null clears it"
    )


class SystemResult(pydantic.BaseModel):
    conversation_id: str
    system_prompt: str | None


class SettingsBody(pydantic.BaseModel):
    """A partial update: only the fields sent change; null puts one back to the server's."""

    model_config = pydantic.ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"memory": "summarize", "title": "Trip to Kyoto"},
                {"model": "gpt-4.1-mini", "temperature": 0.2, "expires_in": 86400},
            ]
        },
    )

    model: str | None = pydantic.Field(None, min_length=1, description="Model of its asks")
    temperature: float | None = pydantic.Field(None, ge=0, le=2, description="0-2")
    max_context_tokens: int | None = pydantic.Field(
        None, gt=0, description="Token budget of its asks, at most MAX_CONTEXT_TOKENS"
    )
    memory: Literal["truncate", "summarize"] | None = pydantic.Field(
        None, description="truncate: drop the oldest turns; summarize: fold them into a summary"
    )
    system: str | None = pydantic.Field(None, description="Its system prompt; empty clears it")
    title: str | None = pydantic.Field(None, max_length=200, description="Its title")
    expires_in: float | None = pydantic.Field(
        None, ge=0, description="Seconds idle before it is forgotten; 0: never"
    )


class SettingsResult(pydantic.BaseModel):
    conversation_id: str
    settings: SettingsOut


class SummaryOut(pydantic.BaseModel):
    """The summary sent ahead of the kept turns of the head's path (memory=summarize)."""

    model_config = pydantic.ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "conversation_id": "123",
                    "summary": "The user, Ada, is planning a trip to Kyoto in May.",
                    "covers": 12,
                    "through": "5c668971bf44ff809097e1a5",
                    "model": "gpt-4.1-mini",
                    "updated_at": EXAMPLE_TIME,
                }
            ]
        }
    )

    conversation_id: str
    summary: str | None = pydantic.Field(description="Its text; null: none yet")
    covers: int = pydantic.Field(description="Turns it covers: the path's first ones")
    through: str | None = pydantic.Field(description="The id of the last turn it covers")
    model: str | None = pydantic.Field(description="The model that wrote it; null if given")
    updated_at: str | None


class SummaryBody(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"summary": "The user is Ada; she likes tea."}]},
    )

    summary: str = pydantic.Field(min_length=1, description="The text the next asks send")


class CompactBody(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"keep": 2}]}
    )

    keep: int = pydantic.Field(
        0, ge=0, description="The newest turns left out of the summary (sent as they are)"
    )


def conversation_routes(service: ChatService, caller: Callable[[], Caller]) -> Blueprint:
    """The management routes over ``service``; ``caller()`` is the request's Caller."""
    routes = Blueprint("conversations", __name__)

    @routes.get("/conversations")
    @validate_querystring(ListQuery)
    @document_response(ConversationPage, 200)
    @tag(["conversations"])
    async def list_conversations(query_args: ListQuery) -> dict[str, object]:
        """List conversations, most recently active first, a page at a time; with ``q``, search
        them (titles, prompts, answers), best first."""
        page = await service.list_conversations(
            caller=caller(), limit=query_args.limit, after=query_args.cursor, query=query_args.q
        )
        next_cursor = page[-1].cursor if len(page) == query_args.limit else None
        return {
            "conversations": [conversation_summary(item) for item in page],
            "next_cursor": next_cursor,
        }

    @routes.get("/conversations/<conversation_id>")
    @validate_querystring(ConversationQuery)
    @document_response(ConversationBody, 200)
    @tag(["conversations"])
    async def get_conversation(
        conversation_id: str, query_args: ConversationQuery
    ) -> dict[str, object]:
        """A conversation: its system prompt, usage totals, the active path (root to head) as
        ``history`` with each turn's id, parent and siblings; ``?view=tree`` adds every turn."""
        detail = await service.get_conversation(conversation_id, caller=caller())
        return conversation_detail(detail, tree=query_args.view == "tree")

    @routes.delete("/conversations/<conversation_id>")
    @tag(["conversations"])
    async def delete_conversation(conversation_id: str) -> Response:
        """Forget a conversation and all its turns (204 No Content)."""
        await service.delete_conversation(conversation_id, caller=caller())
        return Response("", status=204)

    @routes.post("/conversations/<conversation_id>/rollback")
    @validate_request(RollbackBody)
    @document_response(RollbackResult, 200)
    @tag(["conversations"])
    async def rollback(conversation_id: str, data: RollbackBody) -> dict[str, object]:
        """Move the head n turns back along its path: the next ask no longer sees them.

        Nothing is deleted: the turns left behind stay a branch (``PUT …/head``
        switches back to it).
        """
        removed, left, head = await service.rollback(conversation_id, data.turns, caller=caller())
        return {"conversation_id": conversation_id, "removed": removed, "turns": left, "head": head}

    @routes.put("/conversations/<conversation_id>/head")
    @validate_request(HeadBody)
    @document_response(HeadResult, 200)
    @tag(["conversations"])
    async def set_head(conversation_id: str, data: HeadBody) -> dict[str, object]:
        """Switch branch: the next ask continues from this turn (404 for an unknown one)."""
        await service.set_head(conversation_id, data.turn_id, caller=caller())
        head = None if data.turn_id == ROOT else data.turn_id
        return {"conversation_id": conversation_id, "head": head}

    @routes.delete("/conversations/<conversation_id>/turns/<turn_id>")
    @document_response(DeleteTurnResult, 200)
    @tag(["conversations"])
    async def delete_turn(conversation_id: str, turn_id: str) -> dict[str, object]:
        """Delete a turn and every turn below it; usage totals keep them."""
        deleted, head = await service.delete_turn(conversation_id, turn_id, caller=caller())
        return {"conversation_id": conversation_id, "deleted": deleted, "head": head}

    @routes.put("/conversations/<conversation_id>/system")
    @validate_request(SystemBody)
    @document_response(SystemResult, 200)
    @tag(["conversations"])
    async def set_system(conversation_id: str, data: SystemBody) -> dict[str, object]:
        """Give the conversation its own system prompt (replacing FIRST_PROMPT), or clear it.

        The conversation is created if it does not exist yet, so a persona
        can be set before the first ask.
        """
        await service.set_system_prompt(conversation_id, data.prompt, caller=caller())
        return {"conversation_id": conversation_id, "system_prompt": data.prompt or None}

    @routes.put("/conversations/<conversation_id>/settings")
    @validate_request(SettingsBody)
    @document_response(SettingsResult, 200)
    @tag(["conversations"])
    async def set_settings(conversation_id: str, data: SettingsBody) -> dict[str, object]:
        """Change the conversation's own settings: only the fields sent (null: back to the
        server's). The conversation is created if it does not exist yet. An ask's own model
        or temperature still wins over these."""
        changes = {name: getattr(data, name) for name in data.model_fields_set}
        summary = await service.memory.set_settings(conversation_id, changes, caller=caller())
        return {"conversation_id": conversation_id, "settings": conversation_settings(summary)}

    @routes.get("/conversations/<conversation_id>/summary")
    @document_response(SummaryOut, 200)
    @tag(["conversations"])
    async def get_summary(conversation_id: str) -> dict[str, object]:
        """The summary the next ask sends ahead of the kept turns (memory=summarize): the
        newest on the head's path."""
        found = await service.memory.summary(conversation_id, caller=caller())
        return {"conversation_id": conversation_id, **memory_summary(found)}

    @routes.put("/conversations/<conversation_id>/summary")
    @validate_request(SummaryBody)
    @document_response(SummaryOut, 200)
    @tag(["conversations"])
    async def set_summary(conversation_id: str, data: SummaryBody) -> dict[str, object]:
        """Edit the summary: the next asks send this text (later summaries build on it)."""
        made = await service.memory.set_summary(conversation_id, data.summary, caller=caller())
        return {"conversation_id": conversation_id, **memory_summary(made)}

    @routes.post("/conversations/<conversation_id>/compact")
    @document_request(CompactBody)
    @document_response(SummaryOut, 200)
    @tag(["conversations"])
    async def compact(conversation_id: str) -> dict[str, object]:
        """Fold the head's path into its summary now, all but the newest ``keep`` turns (the
        model writes it; this request waits for it). The body is optional."""
        body = await request.get_data()
        try:
            data = CompactBody.model_validate(await request.get_json() if body else {})
        except pydantic.ValidationError as exc:
            raise InvalidInput(f"invalid body: {exc.errors()[0]['msg']}") from None
        made = await service.memory.compact(conversation_id, caller=caller(), keep=data.keep)
        return {"conversation_id": conversation_id, **memory_summary(made)}

    return routes
