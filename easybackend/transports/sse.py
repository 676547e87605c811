"""The native API's Server-Sent Events: an answer's events as frames (SPEC §5, §18).

Each frame carries its event's number as its ``id:`` line, so a client that
lost the connection reattaches with ``Last-Event-ID`` (or ``?after=``) and gets
exactly the frames after it (transports/http_answers.py). An answer's frames
are ``start`` (the turn it is stored as), ``delta`` for each piece, then one
``end`` or one ``error``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from quart import Response

from ..chat.events import Delta, End, Event, Start
from ..errors import ChatError, unexpected

if TYPE_CHECKING:
    from ..chat.caller import Caller
    from ..chat.service import ChatService
    from .http import Stopping


def sse_frame(event: str, data: dict[str, object], seq: int | None = None) -> str:
    """One frame; ``seq``: its ``id:`` line."""
    frame = f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
    return frame if seq is None else f"id: {seq}\n{frame}"


def end_data(end: End) -> dict[str, object]:
    """What an ``end`` event (and a whole answer's body) says of the stored turn."""
    return {
        "conversation_id": end.conversation_id,
        "model": end.model,
        "finish_reason": end.finish_reason,
        "usage": end.usage.as_dict(),
        "turn_id": end.turn_id,
        "turn": end.turn,
    }


def event_frame(event: Event) -> str:
    """The frame of one of an answer's events."""
    if isinstance(event, Delta):
        return sse_frame("delta", {"text": event.text}, event.seq)
    if isinstance(event, Start):
        data = {"conversation_id": event.conversation_id, "turn_id": event.turn_id}
        return sse_frame("start", data, event.seq)
    return sse_frame("end", end_data(event), event.seq)


async def sse_body(
    first: Event | None,
    events: AsyncIterator[Event],
    stopping: Stopping,
    ended: Callable[[], Awaitable[str]] | None = None,
) -> AsyncIterator[str]:
    """``first`` (None: none yet) and the rest of ``events`` as frames, up to the ``end``.

    A ChatError after the first frame becomes an ``error`` event (no ``id:``:
    it is not one of the answer's numbered events), as does the end of the
    shutdown's grace (``shutting_down``) and any other exception (a fault: the
    catch-all's ``internal_error``, logged once). Events of a followed answer that
    stop without an ``end`` (none after the one named, or it was cancelled
    with nothing stored) are followed by the frame ``ended`` makes
    (:func:`ended_frame`). ``events`` is closed however this ends (a client
    gone cancels the iteration).
    """
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        try:
            event = first if first is not None else await stopping.next_event(events)
            while True:
                yield event_frame(event)
                if isinstance(event, End):
                    return
                event = await stopping.next_event(events)
        except StopAsyncIteration:
            if ended is not None:
                yield await ended()
        except Exception as exc:  # a ChatError, or the catch-all's InternalError for a fault
            error = exc if isinstance(exc, ChatError) else unexpected(exc, "streaming an answer")
            yield sse_frame("error", {"code": error.code, "message": error.message})


async def ended_frame(
    service: ChatService, conversation_id: str, turn_id: str, *, caller: Caller
) -> str:
    """An ``end`` frame, unnumbered (not one of the answer's events), of an answer that ended:
    its End; else (nothing stored) its id and finish reason (:meth:`ChatService.ended_answer`)."""
    ended = await service.ended_answer(conversation_id, turn_id, caller=caller)
    if isinstance(ended, End):
        return sse_frame("end", end_data(ended))
    data = {"conversation_id": conversation_id, "turn_id": turn_id, "finish_reason": ended}
    return sse_frame("end", data)


def event_stream(body: AsyncIterator[str] | AsyncIterator[bytes]) -> Response:
    """The streaming response of an SSE ``body`` (not cached, not buffered by a proxy, no
    response timeout: it lasts as long as the answer)."""
    response = Response(body, mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    response.timeout = None
    return response
