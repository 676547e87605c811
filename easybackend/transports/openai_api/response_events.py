"""The Responses API's streamed events of one answer, numbered from the core's events (SPEC §18).

A response's stream is made from its answer's core events (chat/events.py:
``Start``, the ``Delta`` pieces, ``End``, each with its ``seq``) by
:class:`ResponseEvents`, the same way whether the answer is streamed as it is
made, followed again while it runs, or replayed from its stored turn. So a
``sequence_number`` names the same event every time, and ``starting_after=n``
gives exactly the events after ``n``:

=================================  =======================================  ===============
core event (its ``seq``)           Responses events                         sequence_number
=================================  =======================================  ===============
``Start`` (1)                      ``response.created``,                    0 to 3
                                   ``response.in_progress``,
                                   ``response.output_item.added``,
                                   ``response.content_part.added``
``Delta`` (``s``)                  ``response.output_text.delta``           ``s + 2``
``End`` (``e``)                    ``response.output_text.done``,           ``e + 2`` to
                                   ``response.content_part.done``,          ``e + 5``
                                   ``response.output_item.done``, then
                                   ``response.completed`` (or
                                   ``response.incomplete``)
cancelled after event ``l``        as an ``End`` at ``l + 1``, ending with  ``l + 3`` to
(no ``End``)                       ``response.incomplete`` (``cancelled``)  ``l + 6``
failed after event ``l``           ``response.failed``                      ``l + 3``
=================================  =======================================  ===============

A cancelled answer's stored turn is replayed with an ``End`` at ``l + 1``, so
a stream cut by a cancel and its replay number their last events alike.
"""

from __future__ import annotations

import json
from typing import Any

from ...chat.events import Delta, End, Event, Start
from ...errors import ChatError
from . import ids
from .response_state import ResponseState, render

OPENING = 4  # the events the Start makes (sequence numbers 0 to 3)
SHIFT = 2  # a Delta's sequence number is its seq plus this


class ResponseEvents:
    """The SSE frames of one response's stream, the events numbered up to ``after`` left out.

    ``state`` is the response as it began (:meth:`ResponseState.fresh`); it is
    updated as the events come (text, end), and the terminal events show it.
    Each method returns the frames of one core event (maybe ``""``: all left
    out); nothing here waits or raises.
    """

    def __init__(self, state: ResponseState, *, after: int = -1) -> None:
        self.state = state
        self.after = after  # the last sequence number the client has: those up to it are skipped
        self.last = 0  # the seq of the last core event seen
        self.opened = False
        self.ended = False  # its terminal event was made
        self._item_id = ids.message_id(state.turn_id, "assistant")

    def of(self, event: Event) -> str:
        """The frames of the core's ``event``."""
        if isinstance(event, Start) and event.model:  # the provider model, shown from the start
            self.state.model = event.model
        frames = self._open()
        self.last = max(self.last, event.seq)
        if isinstance(event, Start):
            return frames
        if isinstance(event, Delta):
            self.state.text += event.text
            return frames + self._frame(
                event.seq + SHIFT,
                "response.output_text.delta",
                item_id=self._item_id,
                output_index=0,
                content_index=0,
                delta=event.text,
                logprobs=[],
            )
        assert isinstance(event, End)
        self.state.model = event.model
        self.state.finish(
            event.finish_reason, (event.usage.prompt_tokens, event.usage.completion_tokens)
        )
        return frames + self._closing(event.seq)

    def cancelled(self) -> str:
        """The frames of an answer that was cancelled after the last event seen."""
        self.state.cancel()
        return self._open() + self._closing(self.last + 1)

    def failed(self, error: ChatError) -> str:
        """The frame of an answer that failed after the last event seen."""
        self.state.fail(error)
        self.ended = True
        frames = self._open()
        return frames + self._frame(
            self.last + 1 + SHIFT, "response.failed", response=lambda: render(self.state)
        )

    def _open(self) -> str:
        if self.opened:
            return ""
        self.opened = True
        self.last = max(self.last, 1)
        state = self.state
        added = {**state.message(), "status": "in_progress", "content": []}
        return (
            self._frame(0, "response.created", response=lambda: render(state, output=False))
            + self._frame(1, "response.in_progress", response=lambda: render(state, output=False))
            + self._frame(2, "response.output_item.added", output_index=0, item=added)
            + self._frame(
                3,
                "response.content_part.added",
                item_id=self._item_id,
                output_index=0,
                content_index=0,
                part=_part(""),
            )
        )

    def _closing(self, seq: int) -> str:
        """The four events that end the answer, for an end at core ``seq``."""
        self.ended = True
        state = self.state
        final = "response.completed" if state.status == "completed" else "response.incomplete"
        where = {"item_id": self._item_id, "output_index": 0, "content_index": 0}
        return (
            self._frame(seq + SHIFT, "response.output_text.done", **where, text=state.text, logprobs=[])
            + self._frame(seq + SHIFT + 1, "response.content_part.done", **where, part=_part(state.text))
            + self._frame(seq + SHIFT + 2, "response.output_item.done", output_index=0, item=state.message())
            + self._frame(seq + SHIFT + 3, final, response=lambda: render(state))
        )  # fmt: skip

    def _frame(self, number: int, kind: str, **fields: Any) -> str:
        """One event as an SSE frame, or ``""`` when the client has it already. A field given
        as a function is computed only when the frame is sent."""
        if number <= self.after:
            return ""
        data = {"type": kind, "sequence_number": number}
        data.update({name: value() if callable(value) else value for name, value in fields.items()})
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
