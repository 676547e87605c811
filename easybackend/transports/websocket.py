"""The WebSocket transport (trio-websocket): the original text protocol and a JSON protocol.

Each text message is read as one of:

- the original protocol, ``<|ask|>$<conversation_id>$<prompt>`` (the prompt is
  everything after the second ``$``): the answer comes back as text frames,
  then ``<|end|>``; a malformed message or a failure gets
  ``<|err|>$<reason>``;
- JSON (a message starting with ``{`` or ``[``): ``{"type": "ask", "conversation_id",
  "prompt", "parent_id"?, "id"?, "request_id"?, "model"?, "temperature"?,
  "max_tokens"?, "system"?, "user"?, "background"?}`` → ``{"type": "start",
  "conversation_id", "turn_id", "seq": 1}``, ``{"type": "delta", "text", "seq"}`` … then
  ``{"type": "end", "finish_reason", "usage", "model", "turn_id", "turn", "seq"}`` or
  ``{"type": "error", "code", "message"}`` (each with the ask's ``id`` when it
  had one; a refusal by a key's limits with ``retry_after``, in seconds); ``{"type": "regenerate", "conversation_id", "turn_id", …}`` asks a
  turn's prompt again as a new sibling of it (the same overrides, events and
  errors as an ask); ``{"type": "cancel"}`` stops the answer in progress (it
  ends with ``finish_reason: "cancelled"``); ``{"type": "ping"}`` →
  ``{"type": "pong"}``.

Answers that survive a dropped connection (SPEC §18): ``seq`` is the core's
event number (chat/events.py); a delta cut across several messages to fit the
message limit keeps its one ``seq``, every message of it but the last with
``"more": true``, so a client resumes after its last whole event and gets a cut
one again, whole and cut the same way. An ask with ``"background": true`` is
answered from :meth:`ChatService.ask_in_background`'s log: the socket closing
stops only this connection's following. ``{"type": "resume", "conversation_id",
"turn_id", "after"?}`` sends that answer's messages after ``after`` (live, or
replayed once stored; ``not_found`` for an unknown turn or another key's); it is
a job of the socket's queue like an ask (same order, limit and send deadline).
``{"type": "cancel", "conversation_id", "turn_id"}`` cancels that answer
(:meth:`ChatService.cancel_answer`) → ``{"type": "cancelled", …}``, or
``not_found``. A followed answer whose events stop without an end (nothing
after ``after``, or cancelled before anything was stored) gets an unnumbered
``end`` with its finish reason (:meth:`ChatService.ended_answer`). The original protocol has
none of this: no ``seq``, no start.

Asks on one socket are answered one after another, in the order they
arrived; the socket stays usable after any error. Errors are ChatErrors: a
JSON ``error`` carries the error class's ``code``.

Who asks is decided once per connection, at the handshake (the key, the peer
and ``X-Forwarded-For``: the connection's
:class:`~easybackend.chat.caller.Caller`). Each ask's request id is the JSON
ask's ``request_id``, else the handshake's ``X-Request-Id``, else a new one
(an unacceptable id is replaced, as on HTTP); JSON ``end`` and ``error``
messages carry it. Asks refused before the core takes them (queue full,
shutdown, a malformed original ask) and handshakes refused for their key are
reported to :meth:`ChatService.refused` (access line and metrics). Binary frames, unknown
messages and JSON that cannot be parsed (or nests too deep) get an error
reply. A message over the size limit closes the socket with code 1009 (the
WebSocket "message too big" code); a text frame that is not UTF-8 with 1007,
a frame that breaks the protocol (unmasked, reserved opcode) with 1002. No
message to the client exceeds MAX_BODY_BYTES: a longer answer piece is sent
as several text frames (or ``delta`` messages), never cut inside a character.
One connection's failure ends that connection only (see
:mod:`._trio_websocket_compat`).

Cancellation: closing the socket, ``cancel``, or server shutdown cancels the
answer in progress; the chat core closes the upstream call and stores the
partial answer as ``cancelled``. A background answer goes on when the socket
closes (only its following is cancelled); ``cancel`` stops it too, and a
shutdown gives it SHUTDOWN_GRACE in the service's nursery.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection, WebSocketRequest

from .. import errors
from ..auth import bearer_token
from ..chat.caller import Caller, forwarded_for_values
from ..chat.client_json import parse_client_json
from ..chat.events import Event
from ..chat.service import AskRequest, ChatService, End, Start
from ..errors import (
    ChatError,
    InvalidInput,
    NotFound,
    ShuttingDown,
    TooManyRequests,
    Unauthenticated,
)
from ..request_ids import accept_request_id
from ..settings import Settings
from ..tls import server_ssl_context
from ._trio_websocket_compat import WebSocketServer
from .pieces import MAX_JSON_BYTES_PER_CHAR, split_json_text, split_utf8
from .send_deadline import GOODBYE_SECONDS, ClientTooSlow, SendWatchdog, Watched

log = logging.getLogger("easybackend.websocket")

ORIGINAL_ASK = "<|ask|>"
ORIGINAL_END = "<|end|>"
ORIGINAL_ERROR = "<|err|>$"
MAX_QUEUED_ASKS = 16
GOING_AWAY = 1001
ABNORMAL_CLOSURE = 1006  # the code a socket closed without a close frame is reported with
INTERNAL_ERROR = 1011
CLOSE_TIMEOUT = 5.0  # seconds a closing handshake may take
MIN_PIECE_BYTES = 1024  # of a delta's text, however long the ask's id
MAX_SEQ = 10**9  # above any event number (what a delta's envelope is sized for)


@dataclasses.dataclass(frozen=True, slots=True)
class _Resume:
    """A JSON ``resume``: follow the answer of turn ``turn_id`` from after event ``after``."""

    conversation_id: Any
    turn_id: Any
    after: int


@dataclasses.dataclass(frozen=True, slots=True)
class _Ask:
    """One job of a connection's queue: an ask (original or JSON) or a JSON ``resume``."""

    request: AskRequest  # a resume's: only its caller and conversation id are used
    json_id: Any = None  # the JSON message's "id"
    original: bool = False  # answer in the original text protocol
    resume: _Resume | None = None

    @property
    def background(self) -> bool:
        return self.request.background and self.resume is None


async def serve_websocket(
    service: ChatService,
    settings: Settings,
    sock: socket.socket,
    shutdown: trio.Event,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve WebSocket connections on the bound socket ``sock`` until ``shutdown`` is set.

    With API keys configured, the handshake must carry ``Authorization:
    Bearer <key>`` or ``?api_key=<key>``, else it is refused with HTTP 401.
    With TLS configured the socket speaks WSS only. After ``shutdown`` no
    connection is accepted, no new ask is taken and answers in progress have
    ``settings.shutdown_grace`` seconds to finish; then those still running are
    cancelled (stored as ``cancelled``) and answered with a ``shutting_down``
    error, and every connection is closed (1001, going away) within
    GOODBYE_SECONDS; one whose client takes no close frame is dropped.
    Cancellation stops everything at once.
    """
    listener: trio.abc.Listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    ssl_context = server_ssl_context(settings, ["http/1.1"])
    if ssl_context is not None:
        listener = trio.SSLListener(listener, ssl_context, https_compatible=True)

    live = _Count()  # open connections
    grace_over = trio.Event()
    watchdog = SendWatchdog(settings.client_send_timeout)  # bounds every send to a client

    async with watchdog.running(), trio.open_nursery() as handlers:

        async def handle(request: WebSocketRequest) -> None:
            presented_id = _header(request, b"x-request-id")
            try:
                caller = service.caller(
                    protocol="ws",
                    key=_presented_key(request),
                    request_id=presented_id,
                    peer=request.remote,
                    forwarded_for=forwarded_for_values(request.headers),
                )
            except Unauthenticated as exc:
                service.refused(exc, protocol="ws", request_id=accept_request_id(presented_id))
                body = json.dumps({"error": {"code": exc.code, "message": exc.message}}).encode()
                await request.reject(
                    401, extra_headers=[(b"WWW-Authenticate", b"Bearer")], body=body
                )
                return
            connection = await request.accept()
            await _Connection(
                service,
                connection,
                shutdown,
                caller,
                presented_id,
                settings.ws_idle_timeout,
                live,
                grace_over,
                watchdog,
            ).run()

        server = WebSocketServer(
            handle,
            [listener],  # type: ignore[list-item]
            handler_nursery=handlers,
            max_message_size=settings.max_body_bytes,
            connect_timeout=settings.ws_handshake_timeout,
            disconnect_timeout=5,
        )
        async with trio.open_nursery() as accepting:
            await accepting.start(server.run)
            task_status.started()
            await shutdown.wait()
            accepting.cancel_scope.cancel()
        # Each connection finishes its queued answers, then closes itself (1001).
        with trio.move_on_after(settings.shutdown_grace):
            await live.zero()
        # The grace is over: answers still in progress end with shutting_down, then 1001.
        grace_over.set()
        with trio.move_on_after(GOODBYE_SECONDS):
            await live.zero()
        handlers.cancel_scope.cancel()  # handshakes in progress, clients that took no goodbye


class _Count:
    """A count that can be awaited down to zero."""

    def __init__(self) -> None:
        self.value = 0
        self._changed = trio.Event()

    def add(self, delta: int) -> None:
        self.value += delta
        self._changed.set()
        self._changed = trio.Event()

    async def zero(self) -> None:
        while self.value:
            await self._changed.wait()


def _header(request: WebSocketRequest, name: bytes) -> str | None:
    """The first value of the handshake's header ``name`` (lowercase), if it was sent."""
    for header, value in request.headers:
        if header.lower() == name:
            return value.decode("latin-1")
    return None


def _presented_key(request: WebSocketRequest) -> str | None:
    """The key of the handshake: the Authorization header, else the api_key query parameter."""
    authorization = _header(request, b"authorization")
    if authorization is not None:
        return bearer_token(authorization)
    query = parse_qs(urlsplit(request.path).query)
    return query.get("api_key", [None])[0]


class _Connection(Watched):
    """One client socket: a reader task and a worker that answers queued asks in order.

    Its sends are watched by the server's watchdog while it runs (:meth:`expire`).
    """

    def __init__(
        self,
        service: ChatService,
        ws: WebSocketConnection,
        shutdown: trio.Event,
        caller: Caller,
        presented_request_id: str | None,
        idle_timeout: float,
        live: _Count,
        grace_over: trio.Event,
        watchdog: SendWatchdog,
    ) -> None:
        super().__init__()
        self.service = service
        self.ws = ws
        self.shutdown = shutdown
        self.caller = caller  # made at the handshake
        self.presented_request_id = presented_request_id  # the handshake's X-Request-Id
        self.idle_timeout = idle_timeout
        self.live = live
        self.pending = 0  # asks queued or running on this socket
        self.send_asks, self.receive_asks = trio.open_memory_channel[_Ask](MAX_QUEUED_ASKS)
        self.current: trio.CancelScope | None = None
        # the background answer the current job asked for, once its start came:
        # (conversation_id, turn_id), which a plain `cancel` stops too
        self.current_background: tuple[str, str] | None = None
        # the largest message a client is told to accept: longer answer pieces are cut
        self.max_message_bytes = service.settings.max_body_bytes
        self.watchdog = watchdog
        self.grace_over = grace_over  # set when the shutdown grace ends
        self.cut = False  # the grace is over: answers in progress or queued end with shutting_down

    async def run(self) -> None:
        """Serve the socket until the client closes it (or shutdown drains it).

        When the client goes away, whichever task notices first (``ConnectionClosed``)
        stops the socket's other tasks, and the answer in progress is cancelled. Any other
        error is logged and closes this socket with 1011 (internal error); none reaches the
        server. Cancellation stops every task of the socket.
        """
        self.live.add(1)
        try:
            with self.watchdog.watching(self):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._answer_asks)
                    nursery.start_soon(self._stop_taking_asks_on_shutdown)
                    nursery.start_soon(self._cut_at_grace_end)
                    await self._read_messages()
                    nursery.cancel_scope.cancel()
        except* ConnectionClosed:
            pass  # the client went away (a nursery raises it in a group: `except*`, not suppress)
        except* Exception:
            log.exception("serving a WebSocket connection failed")
            with trio.move_on_after(CLOSE_TIMEOUT):
                await self.ws.aclose(INTERNAL_ERROR, "internal server error")
        finally:
            self.live.add(-1)

    async def _read_messages(self) -> None:
        while True:
            try:
                with trio.move_on_after(self.idle_timeout) as idle:
                    message = await self.ws.get_message()
            except ConnectionClosed:
                return
            if idle.cancelled_caught:
                if not self.pending:
                    await self._close(GOING_AWAY, f"idle for {self.idle_timeout:g} seconds")
                    return
                continue
            if isinstance(message, bytes):
                await self._send_json(
                    None, _error(InvalidInput("binary frames are not supported; send text"))
                )
            elif message.startswith(ORIGINAL_ASK):
                await self._take_original(message)
            elif message.lstrip()[:1] in ("{", "["):
                await self._take_json(message)
            else:
                await self._send(
                    ORIGINAL_ERROR
                    + "unknown message: send <|ask|>$<conversation_id>$<prompt> or a JSON object"
                )

    def _ask_caller(self, presented_request_id: object = None) -> Caller:
        """The caller of one ask: its own request id, else the handshake's, else a new one."""
        return self.caller.with_request_id(presented_request_id or self.presented_request_id)

    async def _take_original(self, message: str) -> None:
        parts = message.split("$", 2)
        if len(parts) != 3 or parts[0] != ORIGINAL_ASK:
            error = InvalidInput("malformed ask: expected <|ask|>$<conversation_id>$<prompt>")
            caller = self._ask_caller()
            self.service.refused(error, protocol="ws", request_id=caller.request_id, caller=caller)
            await self._send(ORIGINAL_ERROR + error.message)
            return
        request = AskRequest(parts[1], parts[2], caller=self._ask_caller())
        await self._enqueue(_Ask(request, original=True))

    async def _take_json(self, message: str) -> None:
        try:
            data = parse_client_json(message, "the message")
        except InvalidInput as exc:
            await self._send_json(None, _error(exc))
            return
        if not isinstance(data, dict):
            await self._send_json(None, _error(InvalidInput("a JSON message must be an object")))
            return
        kind, json_id = data.get("type"), data.get("id")
        if kind == "ping":
            await self._send_json(json_id, {"type": "pong"})
        elif kind == "cancel":
            await self._cancel(data, json_id)
        elif kind in ("ask", "regenerate"):
            caller = self._ask_caller(data.get("request_id"))
            try:
                request = _json_ask(data, caller)
            except InvalidInput as exc:
                await self._send_json(json_id, _error(exc), caller.request_id)
                return
            await self._enqueue(_Ask(request, json_id=json_id))
        elif kind == "resume":
            caller = self._ask_caller(data.get("request_id"))
            try:
                resume = _json_resume(data)
            except InvalidInput as exc:
                await self._send_json(json_id, _error(exc), caller.request_id)
                return
            request = AskRequest(str(resume.conversation_id), "", caller=caller)
            await self._enqueue(_Ask(request, json_id=json_id, resume=resume))
        else:
            await self._send_json(
                json_id,
                _error(
                    InvalidInput(
                        "unknown message type: use ask, regenerate, resume, cancel or ping"
                    )
                ),
            )

    async def _cancel(self, data: dict[str, Any], json_id: Any) -> None:
        """A ``cancel``: without ``turn_id``, the connection's job in progress (a background
        answer it asked for is cancelled itself, and its end follows); with ``turn_id`` (and ``conversation_id``), that
        answer in progress, wherever it was asked (answered ``cancelled``, or a ``not_found``
        error when no answer of the caller's is in progress under that turn, here or marked
        on another instance: see :meth:`ChatService.cancel_answer`)."""
        turn_id = data.get("turn_id")
        if turn_id is None:
            if self.current_background is not None:  # its followers, this one too, get its end
                conversation_id, background_turn = self.current_background
                await self.service.cancel_answer(
                    conversation_id, background_turn, caller=self.caller
                )
            elif self.current is not None:
                self.current.cancel()
            return
        conversation_id = data.get("conversation_id")
        try:
            if not isinstance(conversation_id, str) or not isinstance(turn_id, str):
                raise InvalidInput("a cancel naming a turn needs conversation_id and turn_id")
            if not await self.service.cancel_answer(conversation_id, turn_id, caller=self.caller):
                raise NotFound(f"no answer in progress for turn {turn_id!r}")
        except ChatError as exc:
            await self._send_json(json_id, _error(exc))
            return
        payload = {"type": "cancelled", "conversation_id": conversation_id, "turn_id": turn_id}
        await self._send_json(json_id, payload)

    async def _enqueue(self, ask: _Ask) -> None:
        """Queue the ask; refused (and reported as such) once shutdown began or the queue is full."""
        if self.shutdown.is_set():
            await self._refuse(ask, ShuttingDown("the server is shutting down"))
            return
        try:
            self.send_asks.send_nowait(ask)
            self.pending += 1
        except trio.WouldBlock:
            await self._refuse(
                ask, TooManyRequests(f"more than {MAX_QUEUED_ASKS} asks are waiting on this socket")
            )

    async def _refuse(self, ask: _Ask, error: ChatError) -> None:
        request = ask.request
        if ask.resume is not None:  # not an ask: no ask's access line
            await self._send_failure(ask, error)
            return
        self.service.refused(
            error,
            protocol="ws",
            request_id=request.caller.request_id,
            conversation_id=request.conversation_id,
            caller=request.caller,
        )
        await self._send_failure(ask, error)

    async def _answer_asks(self) -> None:
        """Answer queued asks in order; after shutdown, once the queue is empty, close (1001)."""
        async for ask in self.receive_asks:
            with trio.CancelScope() as scope:
                self.current = scope
                if self.cut:
                    scope.cancel()  # queued, not started: the grace is over
                await self._answer(ask)
            self.current = None
            self.current_background = None
            self.pending -= 1
            if scope.cancelled_caught and self.cut:  # the shutdown grace ended first
                await self._send_failure(ask, ShuttingDown("the server is shutting down"))
            elif scope.cancelled_caught:  # the client's `cancel`: the answer ends, the socket stays
                await self._send_end(ask, None)
        await self._close(GOING_AWAY, "server shutting down")

    async def _answer(self, ask: _Ask) -> None:
        """Send the events of one job: an ask's (a background one's from its log), or a
        resume's. Events that stop without an end end with :meth:`_send_stopped`. ChatErrors
        become an ``error``; cancellation and a closed socket go through."""
        try:
            async with contextlib.aclosing(await self._events(ask)) as events:  # type: ignore[type-var]
                async for event in events:
                    if isinstance(event, End):
                        await self._send_end(ask, event)
                        return
                    await self._send_event(ask, event)
            await self._send_stopped(ask)
        except ChatError as exc:
            await self._send_failure(ask, exc)
        except (ConnectionClosed, trio.Cancelled):
            raise
        except Exception as exc:
            await self._send_failure(ask, errors.unexpected(exc, "answering a WebSocket ask"))

    async def _events(self, ask: _Ask) -> AsyncIterator[Event]:
        """The events ``ask`` sends: the core's ask, a background answer's log (the answer
        goes on when this connection goes), or the followed turn's. Raises ChatError."""
        resume = ask.resume
        if resume is not None:
            return self.service.follow(
                resume.conversation_id,
                resume.turn_id,
                after=resume.after,
                caller=ask.request.caller,
            )
        if ask.background:
            answer = await self.service.ask_in_background(ask.request)
            self.current_background = (answer.conversation_id, answer.turn_id)
            return answer.follow()
        return self.service.ask(ask.request)

    async def _send_event(self, ask: _Ask, event: Event) -> None:
        """A Start or a Delta: the JSON ``start``/``delta`` messages with its ``seq`` (the
        original protocol: the delta's text only)."""
        if ask.original:
            if not isinstance(event, Start):
                for piece in split_utf8(event.text, self.max_message_bytes):  # type: ignore[union-attr]
                    await self._send(piece)
        elif isinstance(event, Start):
            payload = {
                "type": "start",
                "conversation_id": event.conversation_id,
                "turn_id": event.turn_id,
                "seq": event.seq,
            }
            await self._send_json(ask.json_id, payload)
        else:
            pieces = self._json_pieces(ask, event.text)  # type: ignore[union-attr]
            for index, piece in enumerate(pieces, 1):
                payload = {"type": "delta", "text": piece, "seq": event.seq}
                if index < len(pieces):
                    payload["more"] = True  # the event goes on in the next message
                await self._send_json(ask.json_id, payload)

    def _json_pieces(self, ask: _Ask, text: str) -> list[str]:
        """``text`` cut so that each ``delta`` message of ``ask`` fits the message limit."""
        if len(text) * MAX_JSON_BYTES_PER_CHAR <= self.max_message_bytes // 2:
            return [text]  # fits even if every character were escaped, with room for the rest
        envelope = json.dumps(
            {"type": "delta", "text": "", "seq": MAX_SEQ, "more": True, "id": ask.json_id},
            ensure_ascii=False,
        )
        room = self.max_message_bytes - len(envelope.encode("utf-8", "surrogatepass"))
        return split_json_text(text, max(room, MIN_PIECE_BYTES))

    async def _send_stopped(self, ask: _Ask) -> None:
        """The end of a followed answer whose events stopped without one (a resume after its
        end, or it was cancelled before anything was stored): an unnumbered ``end`` with the
        answer's finish reason."""
        if ask.resume is not None:
            conversation_id, turn_id = ask.resume.conversation_id, ask.resume.turn_id
        else:
            assert self.current_background is not None  # only a follow stops without an end
            conversation_id, turn_id = self.current_background
        ended = await self.service.ended_answer(conversation_id, turn_id, caller=self.caller)
        reason = ended.finish_reason if isinstance(ended, End) else ended
        payload = {"type": "end", "finish_reason": reason, "usage": None, "turn_id": turn_id}
        await self._send_json(ask.json_id, payload, ask.request.caller.request_id)

    async def _send_end(self, ask: _Ask, end: End | None) -> None:
        """The end of an answer, with its ``seq``; ``None`` for one cancelled (not numbered:
        the core gave no end)."""
        if ask.original:
            await self._send(ORIGINAL_END)
        elif end is None:
            payload = {"type": "end", "finish_reason": "cancelled", "usage": None}
            await self._send_json(ask.json_id, payload, ask.request.caller.request_id)
        else:
            payload = {
                "type": "end",
                "finish_reason": end.finish_reason,
                "usage": end.usage.as_dict(),
                "model": end.model,
                "turn_id": end.turn_id,
                "turn": end.turn,
                "seq": end.seq,
            }
            await self._send_json(ask.json_id, payload, ask.request.caller.request_id)

    async def _send_failure(self, ask: _Ask, error: ChatError) -> None:
        if ask.original:
            await self._send(ORIGINAL_ERROR + error.message)
        else:
            await self._send_json(ask.json_id, _error(error), ask.request.caller.request_id)

    async def _send_json(
        self, json_id: Any, payload: dict[str, Any], request_id: str | None = None
    ) -> None:
        if json_id is not None:
            payload = {**payload, "id": json_id}
        if request_id is not None:
            payload = {**payload, "request_id": request_id}
        await self._send(json.dumps(payload, ensure_ascii=False))

    async def _send(self, message: str) -> None:
        """Send one message; every message to the client goes through here.

        A client that has not taken the message within CLIENT_SEND_TIMEOUT
        seconds (it stopped reading) is dropped by the watchdog (:meth:`expire`)
        and ConnectionClosed is raised, so the answer in progress ends as when a
        client goes away.
        """
        self.begin()
        try:
            await self.ws.send_message(message)
        except ConnectionClosed:
            if self.too_slow is None:
                raise
            raise ConnectionClosed(CloseReason(ABNORMAL_CLOSURE, str(self.too_slow))) from None
        finally:
            self.end()

    async def expire(self, error: ClientTooSlow) -> None:
        """The watchdog's, for a send too slow: drop the TCP connection, so that the send raises.

        The connection is closed at once, as no close frame gets through a full buffer.
        """
        log.info("dropping a WebSocket connection: %s", error)
        await trio.aclose_forcefully(self.ws)

    async def _close(self, code: int, reason: str) -> None:
        """Close the socket with ``code``; one whose client takes no close frame is dropped.

        The closing handshake (our close frame, the client's reply) may take
        CLOSE_TIMEOUT seconds; then the TCP connection is closed regardless.
        """
        with trio.move_on_after(CLOSE_TIMEOUT):
            await self.ws.aclose(code, reason)
            return
        await trio.aclose_forcefully(self.ws)

    async def _stop_taking_asks_on_shutdown(self) -> None:
        await self.shutdown.wait()
        self.send_asks.close()

    async def _cut_at_grace_end(self) -> None:
        """At the end of the shutdown grace: the answer in progress ends with shutting_down."""
        await self.grace_over.wait()
        self.cut = True
        if self.current is not None:
            self.current.cancel()


def _error(error: ChatError) -> dict[str, Any]:
    """The JSON ``error`` message of ``error``: its class's code and its message, and for a
    refusal by a key's limits ``retry_after``, the seconds to wait before asking again."""
    message = {"type": "error", "code": error.code, "message": error.message}
    if isinstance(error, errors.RateLimited):
        message["retry_after"] = error.retry_after_seconds
    return message


def _json_ask(data: dict[str, Any], caller: Caller) -> AskRequest:
    """An AskRequest from a JSON ask or regenerate (the core checks every field but
    ``background``, checked here: raises InvalidInput)."""
    regenerate = data["type"] == "regenerate"
    turn_id = data.get("turn_id")
    background = data.get("background", False)
    if not isinstance(background, bool):
        raise InvalidInput("background must be true or false")
    return AskRequest(
        conversation_id=data.get("conversation_id"),  # type: ignore[arg-type]
        prompt="" if regenerate else data.get("prompt"),  # type: ignore[arg-type]
        model=data.get("model"),
        temperature=data.get("temperature"),
        max_tokens=data.get("max_tokens"),
        system=data.get("system"),
        parent_id=data.get("parent_id"),
        user=data.get("user"),
        # "" for a missing turn_id: the core refuses it as a malformed turn id
        regenerate=("" if turn_id is None else turn_id) if regenerate else None,
        background=background,
        caller=caller,
    )


def _json_resume(data: dict[str, Any]) -> _Resume:
    """A ``resume`` message's turn and ``after`` (a whole number, 0 when missing); raises
    InvalidInput (the core checks the ids)."""
    after = data.get("after", 0)
    if isinstance(after, bool) or not isinstance(after, int) or not 0 <= after <= MAX_SEQ:
        raise InvalidInput("after must be a whole number of at least 0 (an event's seq)")
    return _Resume(data.get("conversation_id"), data.get("turn_id"), after)
