"""The storage protocol every backend implements, and the records it speaks in.

A conversation is addressed by :class:`ConversationRef`: the owner (the name
of the backend API key that asked, ``""`` when authentication is off) and the
client's conversation id. Turns are written whole: a prompt and its answer in
one transaction, so a crash leaves each turn either fully stored or absent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol


@dataclasses.dataclass(frozen=True, slots=True)
class ConversationRef:
    """Which conversation: the owning key's name and the client's id."""

    owner: str
    conversation_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class NewTurn:
    """A finished (or cancelled) turn, ready to be appended."""

    prompt: str
    prompt_tokens: int
    answer: str
    answer_tokens: int
    model: str
    finish_reason: str
    usage_prompt_tokens: int
    usage_completion_tokens: int
    created_at: float
    finished_at: float


@dataclasses.dataclass(frozen=True, slots=True)
class StoredTurn:
    """One turn as read back for the context window (content token counts included)."""

    seq: int
    prompt: str
    prompt_tokens: int
    answer: str
    answer_tokens: int


@dataclasses.dataclass(frozen=True, slots=True)
class Context:
    """What the next ask builds on: the conversation's own system prompt and its recent turns."""

    system_prompt: str | None
    system_tokens: int | None
    turns: list[StoredTurn]  # oldest first, only the newest turns that fit the budget
    turn_count: int  # all turns the conversation holds


class Storage(Protocol):
    """A conversation store. Methods run their blocking work off the event loop.

    On cancellation a call that already started its transaction finishes it
    (the result is then dropped), so the store never holds half a turn.
    Failures raise :class:`easybackend.errors.StorageUnavailable`.
    """

    async def load_context(
        self,
        ref: ConversationRef,
        history_budget: Callable[[str | None, int | None], int],
        cost: Callable[[StoredTurn], int],
    ) -> Context:
        """The conversation's system prompt and its newest whole turns that fit, oldest first.

        ``history_budget(system_prompt, system_tokens)`` is called once with the
        stored system prompt (``None`` for a new conversation) and returns the
        tokens the turns may use; an exception it raises propagates. Turns are
        taken newest first while their summed ``cost`` stays within it.
        """
        ...

    async def append_turn(self, ref: ConversationRef, turn: NewTurn) -> int:
        """Store one turn atomically after the last one, creating the conversation; returns its seq."""
        ...

    async def close(self) -> None:
        """Release connections; further calls fail."""
        ...
