"""HTTP conversation management: list, read, delete, roll back, set the system prompt.

A blueprint registered by :func:`easybackend.transports.http.create_app`.
Every operation is a thin call of the chat core with the request's
:class:`~easybackend.chat.caller.Caller` (made by the HTTP app before any
route runs); the core validates ids and raises NotFound (404) for unknown
conversations; errors use the JSON error body of the HTTP transport. Times
are ISO 8601 in UTC.
"""

from __future__ import annotations

from collections.abc import Callable

import pydantic
from quart import Blueprint, Response
from quart_schema import document_response, tag, validate_querystring, validate_request

from ..chat.caller import Caller
from ..chat.service import MAX_PAGE, ChatService
from ..chat.views import conversation_detail, conversation_summary
from .openapi import UsageBody

EXAMPLE_TIME = "2026-11-25T17:19:00.123Z"


class ConversationSummaryBody(pydantic.BaseModel):
    """A conversation as listed."""

    conversation_id: str
    system_prompt: str | None = pydantic.Field(
        description="The conversation's own system prompt, if set"
    )
    turns: int = pydantic.Field(description="Number of stored turns")
    usage: UsageBody = pydantic.Field(
        description="Tokens of every turn answered, rolled-back ones included"
    )
    created_at: str
    last_activity: str


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


class MessageBody(pydantic.BaseModel):
    role: str = pydantic.Field(description="user or assistant")
    text: str
    tokens: int = pydantic.Field(description="Tokens of the text (tiktoken)")


class TurnBody(pydantic.BaseModel):
    """One turn: the user's prompt and the assistant's answer."""

    turn: int = pydantic.Field(description="Position in the conversation, from 1")
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
                    "usage": {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29},
                    "created_at": EXAMPLE_TIME,
                    "last_activity": EXAMPLE_TIME,
                    "history": [
                        {
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

    history: list[TurnBody]


class RollbackBody(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"turns": 1}]}
    )

    turns: int = pydantic.Field(ge=1, description="How many of the last turns to drop")


class RollbackResult(pydantic.BaseModel):
    conversation_id: str
    removed: int = pydantic.Field(
        description="Turns dropped (fewer than asked if the conversation was shorter)"
    )
    turns: int = pydantic.Field(description="Turns left")


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


def conversation_routes(service: ChatService, caller: Callable[[], Caller]) -> Blueprint:
    """The management routes over ``service``; ``caller()`` is the request's Caller."""
    routes = Blueprint("conversations", __name__)

    @routes.get("/conversations")
    @validate_querystring(ListQuery)
    @document_response(ConversationPage, 200)
    @tag(["conversations"])
    async def list_conversations(query_args: ListQuery) -> dict[str, object]:
        """List conversations, most recently active first, a page at a time."""
        page = await service.list_conversations(
            caller=caller(), limit=query_args.limit, after=query_args.cursor
        )
        next_cursor = page[-1].cursor if len(page) == query_args.limit else None
        return {
            "conversations": [conversation_summary(item) for item in page],
            "next_cursor": next_cursor,
        }

    @routes.get("/conversations/<conversation_id>")
    @document_response(ConversationBody, 200)
    @tag(["conversations"])
    async def get_conversation(conversation_id: str) -> dict[str, object]:
        """A whole conversation: its system prompt, every turn, and usage totals."""
        return conversation_detail(await service.get_conversation(conversation_id, caller=caller()))

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
        """Drop the last n turns, as if they had never been asked; the next ask no longer sees them."""
        removed, left = await service.rollback(conversation_id, data.turns, caller=caller())
        return {"conversation_id": conversation_id, "removed": removed, "turns": left}

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

    return routes
