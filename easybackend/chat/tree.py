"""A conversation's tree as read whole: the active path, each turn's parent id and siblings.

The store keeps each turn's ``parent_seq``; clients see opaque ids. This module
turns a :class:`~easybackend.storage.ConversationDetail` (every turn, in
creation order, and the head) into what the reads show (SPEC §12): the path
from the root to the head, and for any turn its parent's id and the ids of its
siblings (the children of its parent, itself included, in creation order), so
a client can draw "‹ 2/3 ›". Asks never read the whole tree: they walk only
their path in the store.
"""

from __future__ import annotations

import re

from ..errors import InvalidInput
from ..storage import ROOT, ConversationDetail, TurnRecord

TURN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def validate_turn_id(value: object, field: str, *, root: bool = False) -> str:
    """``value`` if it can be a turn id (or :data:`ROOT`, when ``root``); else raise InvalidInput.

    A well-formed id that names no turn is the caller's NotFound to raise.
    """
    if isinstance(value, str) and (TURN_ID.fullmatch(value) or (root and value == ROOT)):
        return value
    also = ' or "root"' if root else ""
    raise InvalidInput(f"{field} must be a turn id (1-64 characters of A-Z a-z 0-9 _ -){also}")


class Tree:
    """The turns of one conversation, indexed by seq and by parent."""

    def __init__(self, detail: ConversationDetail) -> None:
        self.turns = detail.turns  # creation order
        self.head_seq = detail.head_seq
        self._by_seq = {turn.seq: turn for turn in detail.turns}
        self._children: dict[int | None, list[str]] = {}
        for turn in detail.turns:
            self._children.setdefault(turn.parent_seq, []).append(turn.turn_id)

    def path(self) -> list[TurnRecord]:
        """The active path: the turns from the root to the head, oldest first."""
        path: list[TurnRecord] = []
        seq = self.head_seq
        while seq is not None:
            turn = self._by_seq[seq]
            path.append(turn)
            seq = turn.parent_seq
        path.reverse()
        return path

    def parent_id(self, turn: TurnRecord) -> str | None:
        return None if turn.parent_seq is None else self._by_seq[turn.parent_seq].turn_id

    def siblings(self, turn: TurnRecord) -> list[str]:
        """The ids of the children of ``turn``'s parent (``turn`` among them), oldest first."""
        return self._children[turn.parent_seq]

    def children(self, turn: TurnRecord) -> list[str]:
        return self._children.get(turn.seq, [])
