"""The context window: what of a conversation is sent upstream with a new prompt.

System prompt (never dropped) + the most recent whole turns that fit + the
new prompt, within ``MAX_CONTEXT_TOKENS`` minus the tokens reserved for the
answer. Token counts of stored turns come from the database, so building a
context costs no tokenisation beyond the new prompt.
"""

from __future__ import annotations

import dataclasses

from ..errors import PromptTooLong
from ..storage import StoredTurn
from .tokens import MESSAGE_OVERHEAD, REPLY_PRIMING


def turn_cost(turn: StoredTurn) -> int:
    """Tokens one stored turn costs in the upstream request (two messages)."""
    return turn.prompt_tokens + turn.answer_tokens + 2 * MESSAGE_OVERHEAD


@dataclasses.dataclass(frozen=True, slots=True)
class Budget:
    """How the context window is shared out for one ask."""

    fixed: int  # system prompt + new prompt + reply priming
    history: int  # what is left for past turns

    @classmethod
    def plan(
        cls,
        *,
        max_context_tokens: int,
        reserved_for_answer: int,
        system_tokens: int | None,
        prompt_tokens: int,
    ) -> Budget:
        """Share the window out; raises PromptTooLong when the prompt cannot fit alone."""
        available = max_context_tokens - reserved_for_answer
        fixed = prompt_tokens + MESSAGE_OVERHEAD + REPLY_PRIMING
        if system_tokens is not None:
            fixed += system_tokens + MESSAGE_OVERHEAD
        if fixed > available:
            raise PromptTooLong(
                f"the prompt needs {fixed} tokens with the system prompt, but the context "
                f"window leaves {available} (MAX_CONTEXT_TOKENS {max_context_tokens}, "
                f"{reserved_for_answer} reserved for the answer)"
            )
        return cls(fixed=fixed, history=available - fixed)


def build_messages(
    system_prompt: str | None, turns: list[StoredTurn], prompt: str, *, summary: str | None = None
) -> list[dict[str, str]]:
    """The chat messages for the upstream call, oldest first.

    An empty half of a turn is left out: a turn made of a lone user message (a
    conversation item not answered yet) sends only its prompt, one made of a
    lone assistant message only its answer. A ``summary`` of the turns before
    ``turns`` (memory=summarize, see chat/memory.py) is a system message of its
    own, after the system prompt.
    """
    messages: list[dict[str, str]] = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    if summary is not None:
        messages.append({"role": "system", "content": summary})
    for turn in turns:
        if turn.prompt:
            messages.append({"role": "user", "content": turn.prompt})
        if turn.answer:
            messages.append({"role": "assistant", "content": turn.answer})
    messages.append({"role": "user", "content": prompt})
    return messages
