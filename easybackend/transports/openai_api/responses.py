"""``/v1/responses``: OpenAI's Responses API over any chat-completions provider.

A response is one ask of the chat core (:meth:`ChatService.ask`) and the turn
it stores: its id is ``resp_<turn id>`` (see :mod:`.ids`), its output the
turn's answer, and what the turn cannot hold (instructions, metadata, the
sampling settings, ``previous_response_id``, ``background``…) is kept as the
turn's extra JSON. Where it goes:

- ``previous_response_id``: in that response's conversation, as a child of
  its turn (a branch of the tree when it is not the head);
- ``conversation`` (an id, or ``{"id": …}``): after that conversation's head;
- neither: a new conversation, ``conv_<turn id>``.

The context is the core's: the system prompt (``instructions`` and the
input's system and developer messages, else the conversation's own, else
FIRST_PROMPT), the newest turns of the path that fit the window
(``truncation: "auto"``, the default) or all of them (``"disabled"``: a
context that does not fit is a 400), the input's earlier messages, then its
last user message. With ``store: false`` nothing is kept. The request is
checked by :mod:`.response_requests`.

``stream: true`` sends OpenAI's events (``response.created``,
``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, ``response.output_text.delta``…,
``response.output_text.done``, ``response.content_part.done``,
``response.output_item.done``, then ``response.completed``, or
``response.incomplete`` for an answer cut by ``max_output_tokens`` and for a
cancelled one (its status ``cancelled``), or ``response.failed``), each with
its ``sequence_number``, numbered from the core's events
(:mod:`.response_events`). An error before the first piece of the answer is
a plain JSON error with its status, so the SDKs raise their typed exceptions.

``background: true`` (SPEC §18): the ask runs in the service's nursery
(:meth:`ChatService.ask_in_background`) and goes on, stored whole, whatever
becomes of the client; the create returns once the answer began (status
``in_progress``), or streams the answer's events while the client stays.
``GET /v1/responses/{id}`` shows it as it stands (the core's log of its
answer); ``GET …?stream=true&starting_after=n`` streams the events after
``n`` (of any response: live while it runs, else replayed from its turn);
``POST …/cancel`` stops it.

Cancellation: a response in progress in this process, or a background one
another instance generates (PostgreSQL), can be cancelled by
``POST /v1/responses/{id}/cancel`` (the answer stops; what was sent so far is
stored with status ``cancelled``); a client that goes away cancels its own
unless it is a background one (stored the same way). At the end of the
shutdown grace a response in progress that is not a background one fails
(``shutting_down``); background ones get the grace, then are stored as
``cancelled``. Errors are OpenAI-shaped (see :mod:`.errors`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio
from quart import Blueprint, Response, g, request
from quart_schema import document_request, document_response, tag, validate_querystring

from ...chat.answers import CANCELLED as ANSWER_CANCELLED
from ...chat.answers import AnswerLog
from ...chat.caller import Caller
from ...chat.service import GIVEN, AskRequest, ChatService, Delta, End, Start
from ...chat.tree import Tree
from ...errors import (
    ChatError,
    InvalidInput,
    NotFound,
    PromptTooLong,
    ShuttingDown,
    unexpected,
)
from ...storage import ConversationDetail, TurnRecord
from ...storage.sql import new_turn_id
from ..sse import event_stream
from . import ids, items
from .pages import ListQuery, list_page
from .pages import json_response as _json
from .response_events import ResponseEvents
from .response_requests import (
    CreateBody,
    CreateResponseBody,
    DeletedBody,
    ResponseBody,
    parse_create,
)
from .response_state import ResponseState, render, state_of_log, stored_settings

if TYPE_CHECKING:
    from ..http import Stopping

CANCEL_WAIT = 10.0  # seconds a cancel waits for the answer to stop and be stored


class _Cancelled:
    """What a tracked answer yields when it was cancelled (by /cancel)."""


CANCELLED = _Cancelled()
Source = AsyncIterator[Any]  # an answer's core events (and CANCELLED, from tracked())


@dataclasses.dataclass(slots=True)
class _Live:
    """A response being answered in this process: its state, and how a cancel reaches it.

    A background response has ``log``, the core's log of its answer, which its
    state is read from (:func:`state_of_log`); ``state`` then stays as it began.
    """

    state: ResponseState
    cancel_requested: bool = False
    ended: trio.Event = dataclasses.field(default_factory=trio.Event)  # its outcome is known
    log: AnswerLog | None = None


def _starting_after() -> int:
    """``?starting_after=n`` of a retrieve (-1 without it: every event)."""
    given = request.args.get("starting_after")
    if given is None or given == "":
        return -1
    if not given.isascii() or not given.isdigit() or len(given) > 9:
        raise InvalidInput(
            "starting_after must be a whole number of at least 0 (an event's sequence_number)",
            param="starting_after",
        )
    return int(given)


def _wants_stream() -> bool:
    """``?stream=true`` of a retrieve (the SDKs send ``true``/``false``)."""
    given = request.args.get("stream", "false").lower()
    if given not in ("true", "false", "1", "0"):
        raise InvalidInput("stream must be true or false", param="stream")
    return given in ("true", "1")


async def _sse(
    frames: ResponseEvents,
    given: list[Any],
    events: Source,
    step: Callable[[Source], Awaitable[Any]],
) -> AsyncIterator[str]:
    """The SSE body of a response: ``given`` (events already taken) then the rest of ``events``
    (each taken by ``step``), as ``frames`` numbers them, up to the terminal event.

    The Start's events go out with the next event's, and an End's four in one
    write: a write less per event. An answer that ends without an End (it was
    cancelled) ends with ``response.incomplete``; a ChatError (the answer
    failed, the shutdown grace ended) with ``response.failed``, and so does any
    other exception, as the catch-all's InternalError (logged once). ``events`` is
    closed however this ends (the client gone cancels the iteration): a
    follower's close leaves the answer running, an ask's close cancels it.
    """
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        pending = ""  # the Start's frames, sent with the next ones
        waiting = list(given)
        failure: ChatError | None = None
        try:
            while True:
                event = waiting.pop(0) if waiting else await step(events)
                if event is CANCELLED:
                    break
                out = pending + frames.of(event)
                if isinstance(event, Start):
                    pending = out
                    continue
                pending = ""
                if out:
                    yield out
                if isinstance(event, End):
                    return
        except StopAsyncIteration:
            pass  # a followed answer that was cancelled: it has no End
        except Exception as exc:  # a ChatError, or the catch-all's InternalError for a fault
            failure = exc if isinstance(exc, ChatError) else unexpected(exc, "streaming a response")
        if failure is not None:
            out = pending + frames.failed(failure)
        else:
            out = pending + ("" if frames.ended else frames.cancelled())
        if out:
            yield out


def response_routes(
    blueprint: Blueprint, service: ChatService, caller: Callable[[], Caller], stopping: Stopping
) -> None:
    """Add the /v1/responses routes over ``service`` to ``blueprint`` (the ``/v1`` one);
    ``caller()`` is the request's Caller."""
    # Responses in progress, by (owner, turn id); a background one stays until its turn is
    # stored (or its log is forgotten), see found_live().
    live: dict[tuple[str, str], _Live] = {}
    temperature = service.settings.temperature

    def found_live(owner: str, turn_id: str) -> _Live | None:
        """The owner's response ``turn_id`` if this process answers it (or a background one
        ended unstored lately); None once its turn is stored: read it from the store."""
        current = live.get((owner, turn_id))
        if current is not None and current.log is not None:
            if service.answer_logs.find(owner, turn_id) is not current.log:
                del live[owner, turn_id]
                return None
        return current

    def forget_stored() -> None:
        """Drop the background responses whose turn is stored (or whose log is forgotten)."""
        for owner, turn_id in [key for key, current in live.items() if current.log is not None]:
            found_live(owner, turn_id)

    def shown(current: _Live) -> ResponseState:
        return current.state if current.log is None else state_of_log(current.state, current.log)

    async def tracked(
        current: _Live, owner: str, events: AsyncIterator[Start | Delta | End]
    ) -> AsyncIterator[Start | Delta | End | _Cancelled]:
        """The ask's events while it can be cancelled; CANCELLED once it was.

        Each step runs in the cancel scope :meth:`AnswersInProgress.cancel`
        reaches (a cancel asked between two steps cancels the next at once),
        and in the shutdown grace's scope (its end raises ShuttingDown). The
        response is listed as live until the generator is closed.
        """
        turn_id = current.state.turn_id
        live[owner, turn_id] = current
        try:
            async with contextlib.aclosing(events):  # type: ignore[type-var]
                while True:
                    with stopping.cut_at_grace_end() as grace:
                        with service.in_progress.cancellable(owner, turn_id) as scope:
                            if current.cancel_requested:
                                scope.cancel()
                            try:
                                event = await anext(events)
                            except StopAsyncIteration:
                                return
                    if grace.cancelled_caught:
                        raise ShuttingDown("the server is shutting down")
                    if scope.cancelled_caught:
                        current.state.cancel()
                        current.ended.set()
                        yield CANCELLED
                        return
                    if isinstance(event, End):
                        current.state.finish(
                            event.finish_reason,
                            (event.usage.prompt_tokens, event.usage.completion_tokens),
                        )
                        current.state.model = event.model
                        current.ended.set()
                    elif isinstance(event, Delta):
                        current.state.text += event.text
                    elif isinstance(event, Start) and event.model:  # the provider model
                        current.state.model = event.model
                    yield event
        except ChatError as exc:
            if isinstance(exc, PromptTooLong) and exc.param is None:
                exc.param = "input"  # the context (truncation disabled) or the prompt itself
            current.state.fail(exc)
            raise
        finally:
            current.ended.set()
            if live.get((owner, turn_id)) is current:
                del live[owner, turn_id]

    async def ask_of(body: CreateBody, asking: Caller) -> tuple[AskRequest, ResponseState]:
        """The core's ask for a create request, and the response it starts as."""
        turn_id = new_turn_id()
        parent_id = None
        if body.previous_response_id is not None:
            previous = ids.turn_of_response(body.previous_response_id, "previous_response_id")
            try:
                conversation_id = await service.conversation_of_turn(previous, caller=asking)
            except NotFound:
                raise NotFound(
                    f"previous response {body.previous_response_id[:80]!r} not found",
                    param="previous_response_id",
                ) from None
            parent_id = previous
        elif body.conversation is not None:
            conversation_id = body.conversation
            try:
                await service.conversation_summary(conversation_id, caller=asking)
            except NotFound:
                raise NotFound(
                    f"conversation {conversation_id[:80]!r} not found", param="conversation"
                ) from None
            except InvalidInput as exc:
                raise InvalidInput(exc.message, param="conversation") from None
        else:
            conversation_id = ids.conversation_started_by(turn_id)
        settings = body.settings
        system_input = [[m.role, m.text] for m in body.messages if m.role in items.SYSTEM_ROLES]
        talk = [m for m in body.messages if m.role not in items.SYSTEM_ROLES]
        kept = {**settings, "system_input": system_input}
        input_of = json.dumps({"input_of": turn_id})
        preceding = items.pair(talk[:-1], extra=input_of)
        ask = AskRequest(
            conversation_id=conversation_id,
            prompt=talk[-1].text,
            model=body.model,
            temperature=settings["temperature"],
            max_tokens=settings["max_output_tokens"],
            system=items.system_prompt([settings["instructions"], *(t for _, t in system_input)]),
            parent_id=parent_id,
            turn_id=turn_id,
            store=body.store,
            extra=json.dumps(kept, ensure_ascii=False),
            preceding=tuple(preceding),
            truncate=settings["truncation"] == "auto",
            top_p=settings["top_p"],
            user=settings["user"],  # the end user USER_RPM limits
            caller=asking,
        )
        if settings["temperature"] is None:
            kept["temperature"] = temperature
        state = ResponseState(
            turn_id=turn_id,
            created_at=time.time(),
            model=body.model or service.settings.model,
            settings=kept,
            store=body.store,
            conversation_id=conversation_id if body.store else None,
        )
        return ask, state

    @blueprint.post("/responses")
    @document_request(CreateResponseBody)
    @document_response(ResponseBody, 200)
    @tag(["openai"])
    async def create_response() -> Response:
        """Create a model response (OpenAI's Responses API); see the module docstring."""
        body = parse_create(await request.get_json())
        asking = caller()
        ask, state = await ask_of(body, asking)
        g.asked = True  # the core accounts for the ask from here on
        if body.background:
            return await create_background(ask, state, body.stream)
        current = _Live(state)
        events = tracked(current, asking.owner, service.ask(ask))
        if body.stream:
            return await streamed(current, events)
        async with contextlib.aclosing(events):  # type: ignore[type-var]
            async for _ in events:
                pass
        return _json(await final_render(current, asking))

    async def create_background(ask: AskRequest, state: ResponseState, stream: bool) -> Response:
        """A background response: its answer runs in the service's nursery. Returned once it
        began (an error before that is this request's error), in progress; or streamed from
        its log while the client stays (its going away leaves the answer running)."""
        log = await service.ask_in_background(ask)
        forget_stored()
        live[log.owner, state.turn_id] = _Live(state, log=log)
        if not stream:
            return _json(render(state_of_log(state, log)))
        return event_stream(_sse(ResponseEvents(state.fresh()), [], log.follow(0), follow_step))

    async def follow_step(events: Source) -> Any:
        return await stopping.next_event(events)

    async def streamed(current: _Live, events: Source) -> Response:
        """The stream of a response that is not a background one: the headers wait for the
        first piece of the answer (or its end), so that an error before it is a JSON error."""
        taken: list[Any] = []
        try:
            while not taken or isinstance(taken[-1], Start):
                taken.append(await anext(events))
        except BaseException:
            await events.aclose()  # type: ignore[attr-defined]
            raise
        return event_stream(_sse(ResponseEvents(current.state.fresh()), taken, events, anext))

    async def final_render(current: _Live, asking: Caller) -> dict[str, Any]:
        """The response once its answer ended: a cancelled one as stored (with its usage)."""
        state = shown(current)
        if state.status == "cancelled" and state.store:
            with contextlib.suppress(NotFound):
                return await stored_render(state.turn_id, asking)
        return render(state)

    async def stored_turn(turn_id: str, asking: Caller) -> tuple[str, TurnRecord]:
        conversation_id = await service.conversation_of_turn(turn_id, caller=asking)
        return conversation_id, await service.find_turn(conversation_id, turn_id, caller=asking)

    async def stored_render(turn_id: str, asking: Caller) -> dict[str, Any]:
        conversation_id, turn = await stored_turn(turn_id, asking)
        return render(ResponseState.of_turn(turn, conversation_id, temperature))

    @blueprint.get("/responses/<response_id>")
    @document_response(ResponseBody, 200)
    @tag(["openai"])
    async def get_response(response_id: str) -> Response:
        """A response: in progress (what was answered so far) or stored. With
        ``stream=true``, its events after ``starting_after`` (see :func:`reattach`). 404 for
        an unknown one, one stored with ``store: false`` and another key's. ``include`` and
        ``include_obfuscation`` are accepted and ignored."""
        turn_id = ids.turn_of_response(response_id)
        asking = caller()
        if _wants_stream():
            return await reattach(turn_id, _starting_after(), asking)
        current = found_live(asking.owner, turn_id)
        if current is not None:
            return _json(render(shown(current)))
        try:
            return _json(await stored_render(turn_id, asking))
        except NotFound:
            elsewhere = await service.conversation_of_answer(turn_id, caller=asking)
            if elsewhere is None:
                raise
        return _json(render(answered_elsewhere(turn_id, elsewhere)))

    def answered_elsewhere(turn_id: str, conversation_id: str) -> ResponseState:
        """A background response another instance generates (PostgreSQL): in progress, its
        text and settings unknown here until its turn is stored."""
        settings = {**stored_settings(None, temperature), "background": True}
        return ResponseState(
            turn_id=turn_id,
            created_at=time.time(),
            model=service.settings.model,
            settings=settings,
            store=True,
            conversation_id=conversation_id,
        )

    async def reattach(turn_id: str, after: int, asking: Caller) -> Response:
        """The events of a response's stream after sequence number ``after``, numbered as its
        first stream was: live until its end while it is answered here, else replayed from
        its stored turn. Leaving does not stop the answer; several clients may follow one.
        A background response another instance generates (PostgreSQL) is replayed once
        that instance has stored it: the headers wait for it."""
        current = found_live(asking.owner, turn_id)
        state: ResponseState | None = None
        if current is not None:
            state = current.state.fresh()
            conversation_id = state.conversation_id
        else:
            try:
                conversation_id, turn = await stored_turn(turn_id, asking)
                state = ResponseState.of_turn(turn, conversation_id, temperature).fresh()
            except NotFound:
                conversation_id = await service.conversation_of_answer(turn_id, caller=asking)
                if conversation_id is None:
                    raise
        if conversation_id is None:  # store false: nothing to follow once it ends
            raise NotFound(f"no response {ids.response_id(turn_id)!r}")
        # Answered elsewhere, it is replayed once stored, when its settings are known.
        events = service.follow(
            conversation_id, turn_id, after=0, caller=asking, live_elsewhere=False
        )
        try:  # the first event, or the error that the turn is gone, before the headers
            first = await stopping.next_event(events)
            if state is None:  # answered elsewhere, stored now: its settings are known
                conversation_id, turn = await stored_turn(turn_id, asking)
                state = ResponseState.of_turn(turn, conversation_id, temperature).fresh()
        except BaseException:
            await events.aclose()  # type: ignore[attr-defined]
            raise
        frames = ResponseEvents(state, after=after)
        return event_stream(_sse(frames, [first], events, follow_step))

    @blueprint.delete("/responses/<response_id>")
    @document_response(DeletedBody, 200)
    @tag(["openai"])
    async def delete_response(response_id: str) -> Response:
        """Delete a stored response: its turn (and the turns its input made) leave the tree
        alone, their children joining their parent, so later responses of the chain stay."""
        turn_id = ids.turn_of_response(response_id)
        asking = caller()
        current = found_live(asking.owner, turn_id)
        if current is not None and (current.log is None or not current.log.ended):
            raise InvalidInput("the response is in progress: cancel it first")
        conversation_id = await service.conversation_of_turn(turn_id, caller=asking)
        detail = await service.get_conversation(conversation_id, caller=asking)
        removed = [turn_id, *(turn.turn_id for turn in _input_turns(detail, turn_id))]
        await service.splice_turns(conversation_id, removed, caller=asking)
        return _json({"id": response_id, "object": "response.deleted", "deleted": True})

    @blueprint.get("/responses/<response_id>/input_items")
    @validate_querystring(ListQuery)
    @document_response(items.ItemList, 200)
    @tag(["openai"])
    async def input_items(response_id: str, query_args: ListQuery) -> Response:
        """The response's input as items: its system and developer messages, its earlier
        messages, and its last user message (default order ``desc``)."""
        turn_id = ids.turn_of_response(response_id)
        asking = caller()
        conversation_id = await service.conversation_of_turn(turn_id, caller=asking)
        detail = await service.get_conversation(conversation_id, caller=asking)
        turn = _turn_in(detail, turn_id)
        found: list[dict[str, Any]] = []
        settings = stored_settings(turn.extra, temperature)
        for index, (role, text) in enumerate(settings["system_input"]):
            found.append(items.message_item(ids.system_message_id(turn_id, index), role, text))
        for earlier in reversed(_input_turns(detail, turn_id)):
            found.extend(items.turn_items(earlier))
        if turn.prompt:
            found.append(items.message_item(ids.message_id(turn_id, "user"), "user", turn.prompt))
        return _json(list_page(found, query_args))

    @blueprint.post("/responses/<response_id>/cancel")
    @document_response(ResponseBody, 200)
    @tag(["openai"])
    async def cancel_response(response_id: str) -> Response:
        """Cancel a response in progress in this process, or a background one another
        instance generates (:func:`cancel_elsewhere`): its answer stops, what was sent is
        kept (status ``cancelled``). A background response cancelled already is returned as
        it is; any other finished response cannot be cancelled (400)."""
        turn_id = ids.turn_of_response(response_id)
        asking = caller()
        current = found_live(asking.owner, turn_id)
        if current is not None and current.log is not None:
            return await cancel_background(current, asking)
        if current is None:
            try:
                conversation_id, turn = await stored_turn(turn_id, asking)
            except NotFound:  # unless another instance generates it (PostgreSQL)
                return await cancel_elsewhere(turn_id, asking)
            state = ResponseState.of_turn(turn, conversation_id, temperature)
            return _json(cancelled_already(state))
        current.cancel_requested = True
        service.in_progress.cancel(asking.owner, turn_id)
        with trio.move_on_after(CANCEL_WAIT):
            await current.ended.wait()
        return _json(await final_render(current, asking))

    async def cancel_background(current: _Live, asking: Caller) -> Response:
        log = current.log
        assert log is not None
        state = current.state
        if not log.ended and state.conversation_id is not None:
            await service.cancel_answer(state.conversation_id, state.turn_id, caller=asking)
            with trio.move_on_after(CANCEL_WAIT):
                await _ended(log)
        if log.ended and log.state != ANSWER_CANCELLED:
            return _json(cancelled_already(state_of_log(state, log)))
        return _json(await final_render(current, asking))

    async def cancel_elsewhere(turn_id: str, asking: Caller) -> Response:
        """Cancel a background response another instance generates (PostgreSQL): that
        instance stops it within a poll; the response as stored then, or (not stored within
        CANCEL_WAIT) as in progress. NotFound when no instance has it in progress."""
        elsewhere = await service.conversation_of_answer(turn_id, caller=asking)
        if elsewhere is None or not await service.cancel_answer(elsewhere, turn_id, caller=asking):
            raise NotFound(f"no response {ids.response_id(turn_id)!r}")
        replayed = service.follow(elsewhere, turn_id, caller=asking, live_elsewhere=False)
        with trio.move_on_after(CANCEL_WAIT), contextlib.suppress(ChatError):
            async with contextlib.aclosing(replayed) as events:  # type: ignore[type-var]
                async for _ in events:
                    pass
        try:
            conversation_id, turn = await stored_turn(turn_id, asking)
        except NotFound:
            return _json(render(answered_elsewhere(turn_id, elsewhere)))
        return _json(cancelled_already(ResponseState.of_turn(turn, conversation_id, temperature)))

    def cancelled_already(state: ResponseState) -> dict[str, Any]:
        """A finished response a cancel names: a background one that was cancelled (cancelling
        again changes nothing, as OpenAI's); InvalidInput for any other."""
        if state.status == "cancelled" and state.settings.get("background"):
            return render(state)
        raise InvalidInput(
            f"only a response in progress can be cancelled; this one has finished"
            f" (status {state.status})"
        )


async def _ended(log: AnswerLog) -> None:
    """Return once the answer of ``log`` has ended, however it ended."""
    with contextlib.suppress(ChatError):
        async for _ in log.follow(len(log.events)):
            pass


def _turn_in(detail: ConversationDetail, turn_id: str) -> TurnRecord:
    for turn in detail.turns:
        if turn.turn_id == turn_id:
            return turn
    raise NotFound(f"no response {ids.response_id(turn_id)!r}")


def _input_turns(detail: ConversationDetail, turn_id: str) -> list[TurnRecord]:
    """The turns a response's input made, newest first: its ancestors kept as its input."""
    tree = Tree(detail)
    by_id = {turn.turn_id: turn for turn in tree.turns}
    found: list[TurnRecord] = []
    turn = _turn_in(detail, turn_id)
    while (parent_id := tree.parent_id(turn)) is not None:
        turn = by_id[parent_id]
        if turn.finish_reason != GIVEN or turn.extra is None or turn_id not in turn.extra:
            break
        try:
            if json.loads(turn.extra).get("input_of") != turn_id:
                break
        except ValueError:
            break
        found.append(turn)
    return found
