"""A response of the Responses API as it stands: :class:`ResponseState` and its JSON (:func:`render`).

A response in progress is shown from what its answer gave so far (the ask's
events, or the core's log of a background answer: :func:`state_of_log`); a
finished one from its stored turn (:meth:`ResponseState.of_turn`), whose extra
JSON keeps what the turn itself cannot hold (instructions, metadata, the
sampling settings, ``previous_response_id``, ``background``…).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from ...chat.answers import CANCELLED, FAILED, AnswerLog
from ...chat.events import End, Start
from ...errors import ChatError, TooManyRequests, UpstreamRateLimited
from ...storage import TurnRecord
from . import ids, items


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
        settings = stored_settings(turn.extra, temperature)
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

    def cancel(self) -> None:
        """The answer was cancelled (what was answered so far stays)."""
        self.status = "cancelled"
        self.finish_reason = "cancelled"

    def fresh(self) -> ResponseState:
        """A copy of this response as it began: its settings, no text, in progress."""
        return dataclasses.replace(
            self,
            status="in_progress",
            text="",
            finish_reason=None,
            usage=None,
            completed_at=None,
            error=None,
        )

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


def stored_settings(extra: str | None, temperature: float) -> dict[str, Any]:
    """What a turn's extra JSON kept of its response's request (defaults for what it lacks)."""
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
        "background": False,
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
        "background": bool(settings.get("background")),
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


def state_of_log(base: ResponseState, log: AnswerLog) -> ResponseState:
    """The response of ``base`` (its settings) as the core's ``log`` of its answer shows it:
    the text so far, and how it ended once it did."""
    state = base.fresh()
    state.text = log.text
    if log.events and isinstance(log.events[0], Start) and log.events[0].model:
        state.model = log.events[0].model  # the provider model, from the answer's start
    end = log.events[-1] if log.events else None
    if isinstance(end, End):
        state.model = end.model
        state.finish(end.finish_reason, (end.usage.prompt_tokens, end.usage.completion_tokens))
    elif log.state == CANCELLED:
        state.cancel()
    elif log.state == FAILED and log.error is not None:
        state.fail(log.error)
    return state
