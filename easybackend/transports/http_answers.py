"""HTTP routes of answers that survive a dropped connection (SPEC §18): poll a turn's answer,
follow it (reattach) as Server-Sent Events, cancel it.

A blueprint registered by :func:`easybackend.transports.http.create_app`. An
answer in progress is known to the instance that generates it; a finished
one is read from the store (any instance). Reattaching numbers the frames as
the first stream did (``id:`` lines), so ``Last-Event-ID`` (or ``?after=n``)
gives exactly the frames after the last one seen.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

import pydantic
from quart import Blueprint, Response, request
from quart_schema import document_response, tag

from ..chat.caller import Caller
from ..chat.events import Event
from ..chat.service import ChatService
from ..chat.views import answer_state
from ..errors import InvalidInput, NotFound
from .openapi import UsageBody
from .sse import ended_frame, event_stream, sse_body

if TYPE_CHECKING:
    from .http import Stopping


class AnswerStateBody(pydantic.BaseModel):
    """A turn's answer as it stands."""

    conversation_id: str
    turn_id: str
    status: str = pydantic.Field(description="in_progress, completed, cancelled or failed")
    background: bool | None = pydantic.Field(
        description="Asked in the background (null once stored: not kept with the turn)"
    )
    text: str = pydantic.Field(description="The answer so far (all of it once it ended)")
    events: int = pydantic.Field(description="Its events so far: the id of the last one")
    model: str | None = None
    upstream: str | None = pydantic.Field(None, description="The upstream that answered")
    finish_reason: str | None = None
    usage: UsageBody | None = None
    finished_at: str | None = None
    error: dict[str, str] | None = pydantic.Field(None, description="How it failed: code, message")


class CancelledBody(pydantic.BaseModel):
    conversation_id: str
    turn_id: str
    cancelled: bool


def _after() -> int:
    """The last event the client saw: ``Last-Event-ID``, else ``?after=``, else 0."""
    given = request.headers.get("Last-Event-ID")
    where = "Last-Event-ID"
    if given is None:
        given, where = request.args.get("after"), "after"
    if given is None or given == "":
        return 0
    if not given.isascii() or not given.isdigit() or len(given) > 9:
        raise InvalidInput(f"{where} must be a whole number of at least 0 (an event's id)")
    return int(given)


def answer_routes(
    service: ChatService, caller: Callable[[], Caller], stopping: Stopping
) -> Blueprint:
    """The answer routes over ``service``; ``caller()`` is the request's Caller."""
    routes = Blueprint("answers", __name__)

    @routes.get("/conversations/<conversation_id>/turns/<turn_id>")
    @document_response(AnswerStateBody, 200)
    @tag(["answers"])
    async def turn_state(conversation_id: str, turn_id: str) -> Response:
        """A turn's answer as it stands: ``status`` (``in_progress``, ``completed``,
        ``cancelled``, ``failed``), its ``text`` so far and ``events`` (the number of its
        events so far: the id of the last). A 404 for an unknown turn or another key's."""
        live, turn = await service.answer_state(conversation_id, turn_id, caller=caller())
        body = answer_state(conversation_id, live, turn)
        return Response(json.dumps(body, ensure_ascii=False), mimetype="application/json")

    @routes.get("/conversations/<conversation_id>/turns/<turn_id>/stream")
    @tag(["answers"])
    async def follow(conversation_id: str, turn_id: str) -> Response:
        """Reattach: the answer's Server-Sent Events after the one named by ``Last-Event-ID``
        (or ``?after=n``; none: from the start), then live until its end while it is in
        progress. A finished answer is replayed from the stored turn with the same event
        ids; one with nothing after the event named gets its ``end`` again, without an id.
        Several clients may follow one answer; leaving does not stop it."""
        after = _after()
        events = service.follow(conversation_id, turn_id, after=after, caller=caller())
        first: Event | None = None
        try:  # the first event, or the error that the turn is unknown, before the headers
            first = await stopping.next_event(events)
        except StopAsyncIteration:
            pass  # nothing after ``after``: the body says how it ended, once more
        except BaseException:
            await events.aclose()
            raise
        ended = functools.partial(ended_frame, service, conversation_id, turn_id, caller=caller())
        return event_stream(sse_body(first, events, stopping, ended))

    @routes.post("/conversations/<conversation_id>/turns/<turn_id>/cancel")
    @document_response(CancelledBody, 200)
    @tag(["answers"])
    async def cancel(conversation_id: str, turn_id: str) -> Response:
        """Cancel an answer in progress (a background one): it is stored as ``cancelled``
        with the text it has. A 404 when no answer is in progress under that turn, here or
        (PostgreSQL) on another instance, which then stops it within half a second."""
        if not await service.cancel_answer(conversation_id, turn_id, caller=caller()):
            raise NotFound(f"no answer in progress for turn {turn_id!r}")
        body = {"conversation_id": conversation_id, "turn_id": turn_id, "cancelled": True}
        return Response(json.dumps(body), mimetype="application/json")

    return routes
