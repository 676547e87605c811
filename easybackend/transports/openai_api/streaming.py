"""Streamed answers under ``/v1``: Server-Sent Events whose first event is awaited first.

:func:`streamed_response` is what every streaming ``/v1`` route returns: the
first event of the answer is awaited before the response starts, so that an
error before the answer begins (an unknown parent, a refusal, the provider's
429) is a JSON error response with its status, which the SDKs raise as their
typed exceptions. After that, a ChatError (and the end of the shutdown grace,
``shutting_down``) ends the stream with one error event in OpenAI's shape; so
does any other exception, as the catch-all's ``internal_error`` (logged once).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from quart import Response

from ...errors import ChatError, unexpected
from ..sse import event_stream
from .errors import error_event

if TYPE_CHECKING:
    from ..http import Stopping

DONE = b"data: [DONE]\n\n"  # how a chat completions stream ends


async def streamed_response(
    events: AsyncIterator[Any],
    frames: Callable[[Any], bytes],
    stopping: Stopping,
    *,
    done: bytes = DONE,
    error: Callable[[ChatError], bytes] = error_event,
) -> Response:
    """The ``text/event-stream`` response of ``events``, each written by ``frames``.

    After the last event ``done`` is sent (``b""``: nothing); a ChatError after
    the first event is sent as ``error`` writes it, and nothing follows. A
    ChatError before the first event is raised (the route's error response).
    ``events`` is closed when the body ends, however it ends: the client gone
    (the body is cancelled), the grace over, an error; its own cleanup runs
    then (the upstream call closed, a partial turn stored).
    """
    try:
        first = await stopping.next_event(events)
    except StopAsyncIteration:
        first = None
    except BaseException:
        await events.aclose()  # type: ignore[attr-defined]
        raise
    return event_stream(_event_stream(first, events, frames, stopping, done, error))


async def _event_stream(
    first: object,
    events: AsyncIterator[Any],
    frames: Callable[[Any], bytes],
    stopping: Stopping,
    done: bytes,
    error: Callable[[ChatError], bytes],
) -> AsyncIterator[bytes]:
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        try:
            event = first
            while event is not None:
                yield frames(event)
                try:
                    event = await stopping.next_event(events)
                except StopAsyncIteration:
                    event = None
            if done:
                yield done
        except Exception as exc:  # a ChatError, or the catch-all's InternalError for a fault
            yield error(exc if isinstance(exc, ChatError) else unexpected(exc, "streaming /v1"))
