"""The events of an answer, as the chat core gives them to every transport (SPEC §3, §18).

An answer is one :class:`Start`, its :class:`Delta` pieces in order, then one
:class:`End`; each carries its ``seq``, numbered from 1 (Start's is 1), which a
client that lost its connection names to get the rest (chat/answers.py).
:func:`replay` makes the same events again from a stored turn.
"""

from __future__ import annotations

import dataclasses

from ..storage import TurnRecord


@dataclasses.dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class Start:
    """The answer begins (the model accepted the call): it will be stored as turn ``turn_id``.

    ``model`` is the provider model the call names (an alias, the default or the
    conversation's own model resolved), so a transport can show it before the
    End; the End's is the one the provider reported, which the turn keeps.
    """

    conversation_id: str
    turn_id: str
    seq: int = 1
    model: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Delta:
    """A piece of the answer, in order."""

    text: str
    seq: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class End:
    """The answer is complete and stored as the turn ``turn_id``, the conversation's new head."""

    conversation_id: str
    model: str
    finish_reason: str
    usage: Usage
    turn_id: str
    turn: int  # its position on its path, from 1
    seq: int = 0


Event = Start | Delta | End


def piece_lengths(pieces: list[str]) -> str:
    """The lengths of an answer's pieces as a turn keeps them (``TurnRecord.pieces``)."""
    return ",".join(str(len(piece)) for piece in pieces)


def begun(
    conversation_id: str, turn_id: str, answer: str, pieces: str, model: str
) -> list[Event]:
    """The Start and the Deltas of an answer of text ``answer`` cut into pieces of the lengths
    ``pieces`` (as ``TurnRecord.pieces``), numbered as they were streamed. Lengths that do not
    add up to the text (a turn stored before they were kept, given whole, or whose text was
    changed since) give it as one piece."""
    lengths = [int(n) for n in pieces.split(",")] if pieces else []
    if sum(lengths) != len(answer):
        lengths = [len(answer)] if answer else []
    events: list[Event] = [Start(conversation_id, turn_id, model=model)]
    offset = 0
    for length in lengths:
        events.append(Delta(answer[offset : offset + length], len(events) + 1))
        offset += length
    return events


def replay(conversation_id: str, turn: TurnRecord) -> list[Event]:
    """The events of the stored ``turn``'s answer, numbered as they were streamed (see
    :func:`begun`), and its End."""
    events = begun(conversation_id, turn.turn_id, turn.answer, turn.pieces, turn.model)
    usage = Usage(turn.usage_prompt_tokens, turn.usage_completion_tokens)
    end = End(
        conversation_id,
        turn.model,
        turn.finish_reason,
        usage,
        turn.turn_id,
        turn.depth,
        len(events) + 1,
    )
    events.append(end)
    return events
