"""Conversations as JSON-ready dicts: one shape for the HTTP API, the gRPC messages and export.

Times are ISO 8601 in UTC with milliseconds (``2026-11-25T17:19:00.123Z``).
"""

from __future__ import annotations

import datetime

from ..storage import ConversationDetail, ConversationSummary


def _iso(timestamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def conversation_summary(summary: ConversationSummary) -> dict[str, object]:
    """The JSON form of a conversation as listed."""
    return {
        "conversation_id": summary.conversation_id,
        "system_prompt": summary.system_prompt,
        "turns": summary.turn_count,
        "usage": _usage(summary.prompt_tokens, summary.completion_tokens),
        "created_at": _iso(summary.created_at),
        "last_activity": _iso(summary.updated_at),
    }


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def conversation_detail(detail: ConversationDetail) -> dict[str, object]:
    """The JSON form of a whole conversation."""
    return {
        **conversation_summary(detail.summary),
        "history": [
            {
                "turn": turn.seq,
                "messages": [
                    {"role": "user", "text": turn.prompt, "tokens": turn.prompt_tokens},
                    {"role": "assistant", "text": turn.answer, "tokens": turn.answer_tokens},
                ],
                "model": turn.model,
                "finish_reason": turn.finish_reason,
                "usage": _usage(turn.usage_prompt_tokens, turn.usage_completion_tokens),
                "created_at": _iso(turn.created_at),
                "finished_at": _iso(turn.finished_at),
            }
            for turn in detail.turns
        ],
    }
