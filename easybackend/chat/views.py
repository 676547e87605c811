"""Conversations as JSON-ready dicts: one shape for the HTTP API, the gRPC messages and export.

Times are ISO 8601 in UTC with milliseconds (``2026-11-25T17:19:00.123Z``).
"""

from __future__ import annotations

import datetime

from ..storage import ConversationDetail, ConversationSummary, TurnRecord
from ..storage.base import MemorySummary
from .answers import CANCELLED, COMPLETED, AnswerLog
from .events import End, replay
from .tree import Tree


def _iso(timestamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def conversation_summary(summary: ConversationSummary) -> dict[str, object]:
    """The JSON form of a conversation as listed."""
    return {
        "conversation_id": summary.conversation_id,
        "system_prompt": summary.system_prompt,
        "turns": summary.head_depth,
        "stored_turns": summary.turn_count,
        "head": summary.head_id,
        "usage": _usage(summary.prompt_tokens, summary.completion_tokens),
        "created_at": _iso(summary.created_at),
        "last_activity": _iso(summary.updated_at),
        "title": summary.settings.title,
        "settings": conversation_settings(summary),
    }


def conversation_settings(summary: ConversationSummary) -> dict[str, object]:
    """The conversation's own settings (SPEC §15); null: the server's applies."""
    own = summary.settings
    return {
        "model": own.model,
        "temperature": own.temperature,
        "max_context_tokens": own.max_context_tokens,
        "memory": own.memory,
        "system": summary.system_prompt,
        "title": own.title,
        "expires_in": own.expires_in,
    }


def memory_summary(summary: MemorySummary | None) -> dict[str, object]:
    """The JSON form of a path's summary (chat/memory.py): its text, the turns it covers (how
    many, and the id of the last), when it was written, and by which model ("" if given)."""
    if summary is None:
        return {"summary": None, "covers": 0, "through": None, "model": None, "updated_at": None}
    return {
        "summary": summary.text,
        "covers": summary.end.depth,
        "through": summary.end.turn_id,
        "model": summary.model or None,
        "updated_at": _iso(summary.updated_at),
    }


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def conversation_detail(detail: ConversationDetail, *, tree: bool = False) -> dict[str, object]:
    """The JSON form of a whole conversation: the active path as ``history``; with ``tree``,
    every turn of the tree as ``tree`` too (creation order)."""
    shape = Tree(detail)
    body = {
        **conversation_summary(detail.summary),
        "history": [_turn(shape, turn) for turn in shape.path()],
    }
    if tree:
        body["tree"] = [_turn(shape, turn) for turn in shape.turns]
    return body


def _turn(shape: Tree, turn: TurnRecord) -> dict[str, object]:
    return {
        "id": turn.turn_id,
        "parent_id": shape.parent_id(turn),
        "siblings": shape.siblings(turn),
        "turn": turn.depth,
        "messages": [
            {"role": "user", "text": turn.prompt, "tokens": turn.prompt_tokens},
            {"role": "assistant", "text": turn.answer, "tokens": turn.answer_tokens},
        ],
        "model": turn.model,
        "upstream": turn.upstream or None,
        "finish_reason": turn.finish_reason,
        "usage": _usage(turn.usage_prompt_tokens, turn.usage_completion_tokens),
        "created_at": _iso(turn.created_at),
        "finished_at": _iso(turn.finished_at),
    }


def answer_state(conversation_id: str, live: AnswerLog | None, turn: TurnRecord | None) -> dict:
    """An answer as a poll shows it (SPEC §18): its state and its text so far, from its log
    while it is in progress (``live``), else from its stored ``turn``."""
    if live is not None:
        body: dict[str, object] = {
            "conversation_id": conversation_id,
            "turn_id": live.turn_id,
            "status": live.state,
            "background": live.background,
            "text": live.text,
            "events": len(live.events),
        }
        end = live.events[-1] if live.events else None
        if isinstance(end, End):
            body.update(model=end.model, finish_reason=end.finish_reason, usage=end.usage.as_dict())
        if live.error is not None:
            body["error"] = {"code": live.error.code, "message": live.error.message}
        return body
    assert turn is not None
    return {
        "conversation_id": conversation_id,
        "turn_id": turn.turn_id,
        "status": CANCELLED if turn.finish_reason == CANCELLED else COMPLETED,
        "background": None,  # not kept with the turn
        "text": turn.answer,
        "events": len(replay(conversation_id, turn)),
        "model": turn.model,
        "upstream": turn.upstream or None,
        "finish_reason": turn.finish_reason,
        "usage": _usage(turn.usage_prompt_tokens, turn.usage_completion_tokens),
        "finished_at": _iso(turn.finished_at),
    }
