"""The gRPC transport: ``chat.Chat`` and ``grpc.health.v1.Health`` served by purerpc on our socket.

``Ask`` and ``Regenerate`` are the two asks: each adapts its request to one
core :class:`~easybackend.chat.service.AskRequest` (``Ask``'s ``parent_id``,
empty for the head; ``Regenerate``'s ``turn_id`` as the turn to answer again)
and streams :meth:`ChatService.ask`'s events back through the one
:meth:`_Chat._answer`: one ``AskResponse`` per piece of the answer
(``response`` holds the text; a piece longer than MAX_BODY_BYTES, the message
limit, is cut across several, never inside a character), then a last
``AskResponse`` with an empty ``response`` carrying ``finish_reason``,
``usage``, ``model`` and the new turn's ``turn_id`` and ``turn``. Both are
refused, accounted and cancelled the same way.

Answers that survive a dropped connection (SPEC §18): the first message of a
streamed answer is its start (empty ``response``, ``turn_id``, ``seq`` 1) and
every message carries its event's ``seq`` (chat/events.py); a piece cut
across several messages keeps its one ``seq``, each of its messages but the
last with ``more``. With ``background`` the answer runs in the service's
nursery (:meth:`ChatService.ask_in_background`) and the call only follows its
log: a cancelled call, a deadline or a client gone leave it running.
``Resume`` follows (or replays) a turn's answer after ``after``
(:meth:`ChatService.follow`; NOT_FOUND for an unknown turn or another key's),
``CancelAnswer`` cancels one in progress (NOT_FOUND when none is). A followed
answer whose events stop without an end (nothing after ``after``, or cancelled
before anything was stored) gets a last message of seq 0 with its finish
reason (:meth:`ChatService.ended_answer`). The original's clients read the empty start like
any piece. ``proto/chat.proto`` is
wire-compatible with the original (same package, service, method, and the
request's field numbers 1-3: prompt, conversation_id and, as in the
original's later proto, parent_id), so clients generated from the original
protos keep working; EasyBackend's own AskRequest fields start at 16.

The conversation-management RPCs (``ListConversations``,
``GetConversation``, ``DeleteConversation``, ``Rollback``, ``SetHead``,
``DeleteTurn``, ``SetSystemPrompt``) are the HTTP API's ``/conversations``
operations: each is one call of the matching :class:`ChatService` method,
and its answer is the HTTP API's JSON form (:mod:`easybackend.chat.views`,
:mod:`.http_conversations`) as a proto message, so field names, times (ISO
8601, UTC), pagination and the tree (``id``, ``parent_id``, ``siblings``,
``head``, ``stored_turns``, ``tree``) are the same on both; JSON's ``null``
is an unset field. ``GetConversation``'s ``view`` is ``""``/``"path"`` (the
active path) or ``"tree"`` (every turn too). ``ListConversations`` with
``limit`` 0 lists 50 per page; its ``next_cursor`` is empty on the last
page. An unset or empty ``prompt`` in ``SetSystemPrompt`` clears the
conversation's system prompt.

With ``API_KEYS`` set, every ``chat.Chat`` call needs
``authorization: Bearer <key>`` metadata (else UNAUTHENTICATED), and the
key's name owns the conversations it asks on, lists and manages. Health
calls need no key, so that probes work.

``Health.Check`` answers SERVING for ``""`` and ``"chat.Chat"`` (NOT_SERVING
once shutdown has begun) and fails with NOT_FOUND for any other name.
``Health.Watch`` sends the current status, then waits; at shutdown it sends
NOT_SERVING and ends the call, so that watchers do not hold the drain up.

A refusal by a key's limits (``rate_limited``, ``budget_exhausted``:
RESOURCE_EXHAUSTED) ends the call with ``retry-after`` metadata too, the
seconds to wait before asking again. AskRequest's and RegenerateRequest's
``user`` (field 20) names the end user an ask is for, whom ``USER_RPM`` limits.

Errors end the call with a status code and the error's readable message:
every error is a :class:`~easybackend.errors.ChatError`, and
:data:`STATUS_BY_ERROR` gives each class its status code (the README's error
table shows it, and a test checks the two agree). ``prompt_too_long`` is
INVALID_ARGUMENT rather than OUT_OF_RANGE: the same prompt fails the same way
until the server's configuration changes, which is what INVALID_ARGUMENT
means; the message tells it apart. A request message that cannot be decoded
is ``invalid_input``, one larger than ``MAX_BODY_BYTES`` ``request_too_large``,
an unknown method ``method_not_allowed`` (UNIMPLEMENTED). An unexpected
exception is logged with its traceback and the client gets INTERNAL with a
generic message (:func:`easybackend.errors.unexpected`).

Every call is presented to its method as a ``_Call`` (its metadata, the
connection's peer, its request id), from which the chat service makes the
:class:`~easybackend.chat.caller.Caller`. An Ask that ends with an error
before the core took it (a wrong key, a refusal while draining, a message
that cannot be read) is reported to :meth:`ChatService.refused`, so it has
its access line and its metrics.

Cancellation: each call runs in its own cancel scope, which is cancelled

- when the client resets the stream (grpcio's ``call.cancel()``, or its
  deadline passing): purerpc 0.8 drops RST_STREAM on the floor (a handler
  would only notice at its next send, and never while the model is silent),
  so the HTTP/2 connection of :mod:`._purerpc_compat` reports the reset and
  the call's scope is cancelled the moment it arrives;
- when the connection closes or breaks: every call on it is cancelled;
- when the ``grpc-timeout`` the client sent passes (purerpc parses it but
  does not enforce it): the call ends with DEADLINE_EXCEEDED.

Cancelling a call cancels the chat service's ask, which closes the upstream
request and stores the partial answer with finish reason ``cancelled`` (for
a ``Regenerate``, as a new sibling of the regenerated turn); a background
ask's call only stops following it.

Shutdown: accepting stops, idle connections get GOAWAY and are closed, new
calls on busy connections are refused with UNAVAILABLE (health calls still
answer, NOT_SERVING), and calls in flight have ``SHUTDOWN_GRACE`` seconds to
finish before they are cancelled.

Serving: :func:`serve_grpc` takes the listening socket :mod:`app` already
bound (purerpc's own ``Server`` would bind another one with ``SO_REUSEPORT``,
which lets a second instance share the port silently). Connections are
accepted by :func:`trio.serve_listeners` and each is run through purerpc's
HTTP/2 and gRPC framing (``GRPCProtoSocket``, with the corrections of
:mod:`._purerpc_compat`, the only place that touches purerpc's private
parts); the dispatch of calls to
services is done here rather than by purerpc's ``ConnectionHandler``, whose
bare ``except:`` clauses swallow cancellation and send ``repr()`` of any
exception to the client.

A connection that has not sent the HTTP/2 preface and its SETTINGS within
``PREFACE_TIMEOUT`` seconds of being accepted (after the TLS handshake, with
TLS) is closed, so a client that stops half-way cannot hold it open.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.abc
import h2.exceptions
import trio
from google.protobuf.message import DecodeError
from purerpc import Cardinality, Service, Status, StatusCode
from purerpc.grpc_proto import GRPCProtoStream
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.events import MessageReceived, RequestEnded, RequestReceived

from .. import errors
from ..chat.caller import Caller, stream_peer
from ..chat.events import Event
from ..chat.memory import SETTING_NAMES
from ..chat.service import AskRequest, ChatService, Delta, End, Start
from ..chat.views import (
    conversation_detail,
    conversation_settings,
    conversation_summary,
    memory_summary,
)
from ..proto_gen import chat_grpc, chat_pb2, health_grpc, health_pb2
from ..request_ids import accept_request_id
from ..settings import Settings
from ..storage import ROOT
from ..tls import server_ssl_context
from ._purerpc_compat import BadRequestData, H2Connection, ServerSocket
from .pieces import split_utf8
from .send_deadline import GOODBYE_SECONDS, ClientTooSlow, SendBoundedStream, SendWatchdog, Watched

log = logging.getLogger(__name__)

# The status code of every error class (the README's error table is checked against it).
STATUS_BY_ERROR: dict[type[errors.ChatError], StatusCode] = {
    errors.InvalidInput: StatusCode.INVALID_ARGUMENT,
    errors.PromptTooLong: StatusCode.INVALID_ARGUMENT,
    errors.HTTPError: StatusCode.INVALID_ARGUMENT,  # HTTP only
    errors.UpstreamRejected: StatusCode.INVALID_ARGUMENT,  # the HTTP /v1 relay only
    errors.Unauthenticated: StatusCode.UNAUTHENTICATED,
    errors.Forbidden: StatusCode.PERMISSION_DENIED,  # the HTTP admin API only
    errors.ModelNotAllowed: StatusCode.PERMISSION_DENIED,
    errors.KeyConflict: StatusCode.ALREADY_EXISTS,  # the HTTP admin API only
    errors.NotFound: StatusCode.NOT_FOUND,
    errors.MethodNotAllowed: StatusCode.UNIMPLEMENTED,
    errors.RequestTooLarge: StatusCode.RESOURCE_EXHAUSTED,
    errors.TooManyRequests: StatusCode.RESOURCE_EXHAUSTED,
    errors.RateLimited: StatusCode.RESOURCE_EXHAUSTED,  # with retry-after metadata
    errors.BudgetExhausted: StatusCode.RESOURCE_EXHAUSTED,  # with retry-after metadata
    errors.UpstreamRateLimited: StatusCode.RESOURCE_EXHAUSTED,
    errors.UpstreamTimeout: StatusCode.DEADLINE_EXCEEDED,
    errors.UpstreamError: StatusCode.UNAVAILABLE,
    errors.UpstreamAuthFailed: StatusCode.UNAVAILABLE,
    errors.UpstreamUnavailable: StatusCode.UNAVAILABLE,
    errors.StorageUnavailable: StatusCode.UNAVAILABLE,
    errors.ShuttingDown: StatusCode.UNAVAILABLE,
    errors.InternalError: StatusCode.INTERNAL,
}

CHAT_SERVICE = "chat.Chat"
HEALTH_SERVICE = "grpc.health.v1.Health"
# The chat.Chat methods that are asks (a refusal gets an ask's access line and metrics).
ASK_METHODS = frozenset({"Ask", "Regenerate"})
# GetConversation's views: "" (unset) and "path" the active path, "tree" every turn too.
VIEWS = {"": False, "path": False, "tree": True}
DEFAULT_PAGE = 50  # conversations per page when ListConversations leaves limit at 0
TLS_HANDSHAKE_TIMEOUT = 10.0  # seconds
# Seconds a new connection has to send the HTTP/2 preface and its SETTINGS (real clients
# send them at once); one that has not is closed.
PREFACE_TIMEOUT = 10.0
# bytes of an AskResponse besides its text: the text's tag and length (6 at most), seq (11
# at most) and more (2)
RESPONSE_OVERHEAD = 32


def status_for(error: errors.ChatError) -> Status:
    """The status a call ends with on ``error``: its class's code, its message."""
    return Status(errors.wire_form(error, STATUS_BY_ERROR), error.message)


async def serve_grpc(
    service: ChatService,
    settings: Settings,
    sock: socket.socket,
    shutdown: trio.Event,
    *,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve gRPC on the bound, listening ``sock`` (taken over and closed) until shutdown.

    Reports ``task_status.started()`` once accepting. When ``shutdown`` is set,
    stops accepting (the socket is closed), refuses new calls with
    UNAVAILABLE, lets calls in flight finish for up to
    ``settings.shutdown_grace`` seconds, cancels the rest (their partial
    answers are stored as ``cancelled``) and returns. Cancellation stops
    everything at once.

    The listener speaks TLS with ``ssl_context``, by default the one built
    from ``TLS_CERTFILE``/``TLS_KEYFILE`` (when set); a context passed in must
    offer ``h2`` by ALPN (``ctx.set_alpn_protocols(["h2"])``), which grpcio
    clients require.
    """
    if ssl_context is None:
        ssl_context = server_ssl_context(settings, ["h2"])
    chat = _Chat(service, settings, max_message_bytes=settings.max_body_bytes)
    server = _Server(
        {CHAT_SERVICE: chat.service, HEALTH_SERVICE: _Health(service, shutdown).service},
        max_message_length=settings.max_body_bytes,
        send_timeout=settings.client_send_timeout,
        refused=chat.refused,
    )
    listener: trio.abc.Listener[Any] = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    if ssl_context is not None:
        listener = trio.SSLListener(listener, ssl_context, https_compatible=False)
    try:
        async with server.watchdog.running(), trio.open_nursery() as nursery:
            accepting = trio.CancelScope()

            async def accept(*, task_status: trio.TaskStatus[object]) -> None:
                with accepting:
                    await trio.serve_listeners(
                        server.serve_connection,
                        [listener],
                        handler_nursery=nursery,
                        task_status=task_status,
                    )

            await nursery.start(accept)
            task_status.started()
            await shutdown.wait()
            accepting.cancel()  # serve_listeners closes the listening socket
            await server.drain(settings.shutdown_grace)
            nursery.cancel_scope.cancel()
    finally:
        sock.close()  # in case we were cancelled before serve_listeners took it over


# --------------------------------------------------------------------------- services


@dataclasses.dataclass(eq=False, slots=True)
class _Call:
    """What one call presents (its headers, the connection's peer), handed to its method.

    The services below receive it as their ``request`` argument. ``message`` is
    the request message once read; ``taken`` is set when the core took the ask
    (from then on the core accounts for it).
    """

    headers: RequestReceived
    peer: str
    request_id: str  # the client's x-request-id if acceptable, else a new one
    message: Any = None
    taken: bool = False

    @property
    def method(self) -> str:
        return f"/{self.headers.service_name}/{self.headers.method_name}"

    def metadata(self, key: str) -> str | None:
        """The first value of the metadata ``key`` (lowercase) the client sent, if any."""
        return _first(self.headers, key)

    def metadata_values(self, key: str) -> list[str]:
        """Every value of the metadata ``key`` (lowercase) the client sent, in order."""
        return [value for name, value in self.headers.custom_metadata if name == key]


class _Chat(chat_grpc.ChatServicer):
    def __init__(self, service: ChatService, settings: Settings, *, max_message_bytes: int) -> None:
        self._service = service
        self._settings = settings
        # an AskResponse stays within the message limit: its text, plus the field's tag and length
        self._piece_bytes = max_message_bytes - RESPONSE_OVERHEAD

    def _caller(self, call: _Call) -> Caller:
        """Who is calling (its ``authorization`` metadata); raises Unauthenticated."""
        return self._service.caller(
            protocol="grpc",
            authorization=call.metadata("authorization"),
            request_id=call.request_id,
            peer=call.peer,
            forwarded_for=call.metadata_values("x-forwarded-for"),
        )

    def refused(self, call: _Call, error: errors.ChatError) -> None:
        """A call ended with ``error``: an ask the core had not taken is reported as refused."""
        if call.headers.service_name == CHAT_SERVICE and call.headers.method_name in ASK_METHODS:
            if not call.taken:
                call.taken = True  # reported once
                self._service.refused(
                    error,
                    protocol="grpc",
                    request_id=call.request_id,
                    conversation_id=getattr(call.message, "conversation_id", None),
                )

    def Ask(  # noqa: N802 (the RPC's name)
        self, message: chat_pb2.AskRequest, request: _Call
    ) -> AsyncIterator[chat_pb2.AskResponse]:
        """An ask: the new turn is a child of ``parent_id`` (empty: the head; "root": none).

        An unknown parent is NotFound, a malformed one InvalidInput, both before
        the model is called; errors and cancellation as in :meth:`_answer`.
        """
        return self._answer(request, lambda caller: _ask_request(message, caller))

    def Regenerate(  # noqa: N802
        self, message: chat_pb2.RegenerateRequest, request: _Call
    ) -> AsyncIterator[chat_pb2.AskResponse]:
        """An ask of ``turn_id``'s prompt again, stored as its new sibling, the new head.

        An unknown turn is NotFound before the model is called; errors and
        cancellation (a partial answer stored as a ``cancelled`` sibling) as in
        :meth:`_answer`.
        """
        return self._answer(request, lambda caller: _regenerate_request(message, caller))

    async def _answer(
        self, request: _Call, make: Callable[[Caller], AskRequest]
    ) -> AsyncIterator[chat_pb2.AskResponse]:
        """Stream one ask's answer: its pieces, then the last message with the new turn.

        ``make`` turns the caller into the core's request. Errors before the
        core takes the ask (the key, the request) are the caller's refusal
        (:meth:`refused`); from then on the core accounts for the ask. When
        the call is cancelled (reset, deadline, connection gone, shutdown cut)
        the core stores the part delivered as ``cancelled``.
        """
        ask = make(self._caller(request))
        request.taken = True  # the core accounts for it from here on
        if ask.background:  # the answer goes on without this call, which follows its log
            events = (await self._service.ask_in_background(ask)).follow()
        else:
            events = self._service.ask(ask)
        async for reply in self._replies(events, ask):
            yield reply

    def Resume(  # noqa: N802
        self, message: chat_pb2.ResumeRequest, request: _Call
    ) -> AsyncIterator[chat_pb2.AskResponse]:
        """Reattach: the messages of turn ``turn_id``'s answer after seq ``after``, live until
        its end (replayed from the stored turn once it is stored). NotFound for an unknown
        turn or another key's; cancelling the call changes nothing for the answer."""
        caller = self._caller(request)
        events = self._service.follow(
            message.conversation_id, message.turn_id, after=message.after, caller=caller
        )
        followed = AskRequest(message.conversation_id, "", turn_id=message.turn_id, caller=caller)
        return self._replies(events, followed)

    async def CancelAnswer(  # noqa: N802
        self, message: chat_pb2.CancelAnswerRequest, request: _Call
    ) -> chat_pb2.CancelAnswerResponse:
        """Cancel the caller's answer in progress under ``turn_id`` (stored as ``cancelled``);
        NotFound when none is in progress (here, or marked on another instance)."""
        caller = self._caller(request)
        service = self._service
        if not await service.cancel_answer(message.conversation_id, message.turn_id, caller=caller):
            raise errors.NotFound(f"no answer in progress for turn {message.turn_id!r}")
        return chat_pb2.CancelAnswerResponse(
            conversation_id=message.conversation_id, turn_id=message.turn_id, cancelled=True
        )

    async def _replies(
        self, events: AsyncIterator[Event], ask: AskRequest
    ) -> AsyncIterator[chat_pb2.AskResponse]:
        """``events`` (of ``ask``'s answer) as AskResponses, each with its ``seq``: the start
        (empty ``response``, ``turn_id``), the pieces (one cut across several messages
        carries one seq, all but the last with ``more``), the last message.

        Events that stop without an end (a Resume after the end, or an answer cancelled
        before anything was stored) end with a last message of seq 0 that carries the
        answer's finish reason (:meth:`ChatService.ended_answer`). ``events`` is closed however
        this ends; ChatErrors go through.
        """
        turn_id = ask.turn_id
        async with contextlib.aclosing(events):  # type: ignore[type-var]
            async for event in events:
                if isinstance(event, Start):
                    turn_id = event.turn_id
                    yield chat_pb2.AskResponse(turn_id=event.turn_id, seq=event.seq)
                elif isinstance(event, Delta):
                    pieces = split_utf8(event.text, self._piece_bytes)
                    for index, piece in enumerate(pieces, 1):
                        more = index < len(pieces)
                        yield chat_pb2.AskResponse(response=piece, seq=event.seq, more=more)
                else:
                    usage = event.usage
                    yield chat_pb2.AskResponse(
                        finish_reason=event.finish_reason,
                        usage=chat_pb2.Usage(
                            prompt_tokens=usage.prompt_tokens,
                            completion_tokens=usage.completion_tokens,
                            total_tokens=usage.total_tokens,
                        ),
                        model=event.model,
                        turn_id=event.turn_id,
                        turn=event.turn,
                        seq=event.seq,
                    )
                    return
        assert turn_id is not None  # a background ask's, or the followed turn
        ended = await self._service.ended_answer(ask.conversation_id, turn_id, caller=ask.caller)
        finish_reason = ended.finish_reason if isinstance(ended, End) else ended
        yield chat_pb2.AskResponse(finish_reason=finish_reason, turn_id=turn_id)

    # Conversation management: the HTTP API's operations, answered with its JSON forms
    # (same field names, same times) turned into the proto messages.

    async def ListConversations(  # noqa: N802
        self, message: chat_pb2.ListConversationsRequest, request: _Call
    ) -> chat_pb2.ListConversationsResponse:
        caller = self._caller(request)
        limit = message.limit or DEFAULT_PAGE
        page = await self._service.list_conversations(
            caller=caller, limit=limit, after=message.cursor or None, query=message.query or None
        )
        return chat_pb2.ListConversationsResponse(
            conversations=[
                chat_pb2.ConversationSummary(**_int32_totals(conversation_summary(item)))
                for item in page
            ],
            next_cursor=page[-1].cursor if len(page) == limit else "",
        )

    async def GetConversation(  # noqa: N802
        self, message: chat_pb2.ConversationRequest, request: _Call
    ) -> chat_pb2.Conversation:
        caller = self._caller(request)
        tree = VIEWS.get(message.view)
        if tree is None:
            raise errors.InvalidInput('view must be "path" or "tree" (or unset, for "path")')
        detail = await self._service.get_conversation(message.conversation_id, caller=caller)
        return chat_pb2.Conversation(**_int32_totals(conversation_detail(detail, tree=tree)))

    async def DeleteConversation(  # noqa: N802
        self, message: chat_pb2.ConversationRequest, request: _Call
    ) -> chat_pb2.DeleteConversationResponse:
        caller = self._caller(request)
        await self._service.delete_conversation(message.conversation_id, caller=caller)
        return chat_pb2.DeleteConversationResponse(conversation_id=message.conversation_id)

    async def Rollback(  # noqa: N802
        self, message: chat_pb2.RollbackRequest, request: _Call
    ) -> chat_pb2.RollbackResponse:
        caller = self._caller(request)
        removed, left, head = await self._service.rollback(
            message.conversation_id, message.turns, caller=caller
        )
        return chat_pb2.RollbackResponse(
            conversation_id=message.conversation_id, removed=removed, turns=left, head=head
        )

    async def SetHead(  # noqa: N802
        self, message: chat_pb2.SetHeadRequest, request: _Call
    ) -> chat_pb2.SetHeadResponse:
        caller = self._caller(request)
        await self._service.set_head(message.conversation_id, message.turn_id, caller=caller)
        head = None if message.turn_id == ROOT else message.turn_id
        return chat_pb2.SetHeadResponse(conversation_id=message.conversation_id, head=head)

    async def DeleteTurn(  # noqa: N802
        self, message: chat_pb2.DeleteTurnRequest, request: _Call
    ) -> chat_pb2.DeleteTurnResponse:
        caller = self._caller(request)
        deleted, head = await self._service.delete_turn(
            message.conversation_id, message.turn_id, caller=caller
        )
        return chat_pb2.DeleteTurnResponse(
            conversation_id=message.conversation_id, deleted=deleted, head=head
        )

    async def SetSystemPrompt(  # noqa: N802
        self, message: chat_pb2.SetSystemPromptRequest, request: _Call
    ) -> chat_pb2.SetSystemPromptResponse:
        caller = self._caller(request)
        prompt = message.prompt or None  # unset and "" both clear it
        await self._service.set_system_prompt(message.conversation_id, prompt, caller=caller)
        return chat_pb2.SetSystemPromptResponse(
            conversation_id=message.conversation_id, system_prompt=prompt
        )

    async def SetSettings(  # noqa: N802
        self, message: chat_pb2.SetSettingsRequest, request: _Call
    ) -> chat_pb2.SetSettingsResponse:
        caller = self._caller(request)
        changes: dict[str, Any] = {}
        for name in message.clear:
            if name not in SETTING_NAMES:
                raise errors.InvalidInput(
                    f"clear names an unknown setting {name!r}; settings: {', '.join(SETTING_NAMES)}"
                )
            changes[name] = None
        for name in SETTING_NAMES:
            if message.settings.HasField(name):
                if name in changes:
                    raise errors.InvalidInput(f"{name} is both set and cleared")
                changes[name] = getattr(message.settings, name)
        summary = await self._service.memory.set_settings(
            message.conversation_id, changes, caller=caller
        )
        return chat_pb2.SetSettingsResponse(
            conversation_id=message.conversation_id, settings=conversation_settings(summary)
        )

    async def GetSummary(  # noqa: N802
        self, message: chat_pb2.ConversationRequest, request: _Call
    ) -> chat_pb2.Summary:
        caller = self._caller(request)
        found = await self._service.memory.summary(message.conversation_id, caller=caller)
        return chat_pb2.Summary(conversation_id=message.conversation_id, **memory_summary(found))

    async def SetSummary(  # noqa: N802
        self, message: chat_pb2.SetSummaryRequest, request: _Call
    ) -> chat_pb2.Summary:
        caller = self._caller(request)
        made = await self._service.memory.set_summary(
            message.conversation_id, message.summary, caller=caller
        )
        return chat_pb2.Summary(conversation_id=message.conversation_id, **memory_summary(made))

    async def Compact(  # noqa: N802
        self, message: chat_pb2.CompactRequest, request: _Call
    ) -> chat_pb2.Summary:
        caller = self._caller(request)
        made = await self._service.memory.compact(
            message.conversation_id, caller=caller, keep=message.keep
        )
        return chat_pb2.Summary(conversation_id=message.conversation_id, **memory_summary(made))


INT32_MAX = 2**31 - 1


def _int32_totals(form: dict[str, Any]) -> dict[str, Any]:
    """A conversation's JSON form with its usage totals held to what the proto's int32 fields carry.

    One turn's figures are bounded well below that (the upstream client believes
    at most 100 M tokens per figure); a conversation's sums are not, and a value
    past int32 would fail the whole call. Totals beyond it are sent as INT32_MAX.
    """
    usage = {name: min(value, INT32_MAX) for name, value in form["usage"].items()}
    return {**form, "usage": usage}


def _first(headers: RequestReceived, key: str) -> str | None:
    """The first value of the metadata ``key`` (lowercase) the client sent, if any."""
    return next((value for name, value in headers.custom_metadata if name == key), None)


def _overrides(message: chat_pb2.AskRequest | chat_pb2.RegenerateRequest) -> dict[str, Any]:
    """The per-turn overrides (fields 16-19 of both requests) the client set; unset ones are None."""
    return {
        name: getattr(message, name) if message.HasField(name) else None
        for name in ("model", "temperature", "max_tokens", "system")
    }


def _user(message: chat_pb2.AskRequest | chat_pb2.RegenerateRequest) -> str | None:
    """The end user the ask is for (field 20, what USER_RPM counts), None when unset."""
    return message.user if message.HasField("user") else None


def _ask_request(message: chat_pb2.AskRequest, caller: Caller) -> AskRequest:
    """The core's AskRequest for an Ask; an empty ``parent_id`` (unset) is the head."""
    return AskRequest(
        conversation_id=message.conversation_id,
        prompt=message.prompt,
        parent_id=message.parent_id or None,
        user=_user(message),
        background=message.background,
        caller=caller,
        **_overrides(message),
    )


def _regenerate_request(message: chat_pb2.RegenerateRequest, caller: Caller) -> AskRequest:
    """The core's AskRequest for a Regenerate: ``turn_id``'s prompt asked again."""
    return AskRequest(
        conversation_id=message.conversation_id,
        prompt="",
        regenerate=message.turn_id,
        user=_user(message),
        background=message.background,
        caller=caller,
        **_overrides(message),
    )


class _Health(health_grpc.HealthServicer):
    SERVICES = frozenset({"", CHAT_SERVICE})

    def __init__(self, service: ChatService, shutdown: trio.Event) -> None:
        self._service = service
        self._shutdown = shutdown

    def _status(self, name: str) -> int:
        if name not in self.SERVICES:
            return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        if self._shutdown.is_set():
            return health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse.SERVING

    async def Check(  # noqa: N802
        self, message: health_pb2.HealthCheckRequest, request: _Call
    ) -> health_pb2.HealthCheckResponse:
        """SERVING while the server runs and its storage answers (the same as /readyz)."""
        if message.service not in self.SERVICES:
            raise errors.NotFound(f"unknown service {message.service!r}")
        status = self._status(message.service)
        if status == health_pb2.HealthCheckResponse.SERVING and not await self._service.ready():
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(  # noqa: N802
        self, message: health_pb2.HealthCheckRequest, request: _Call
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        status = self._status(message.service)
        yield health_pb2.HealthCheckResponse(status=status)
        await self._shutdown.wait()  # the only change to come
        if self._status(message.service) != status:
            yield health_pb2.HealthCheckResponse(status=self._status(message.service))


# --------------------------------------------------------------------------- connections


class _AnyioStream(anyio.abc.ByteStream):
    """A trio stream with the anyio socket-stream interface purerpc's framing uses."""

    def __init__(self, stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]) -> None:
        # watched: a write the client does not take in time closes the connection
        self.bounded = SendBoundedStream(stream)
        transport = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        self._socket = transport.socket

    @property
    def extra_attributes(self) -> dict[Any, Callable[[], Any]]:
        return {anyio.abc.SocketAttribute.raw_socket: lambda: self._socket}

    async def receive(self, max_bytes: int = 65536) -> bytes:
        try:
            data = await self.bounded.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise anyio.BrokenResourceError from exc
        if not data:
            raise anyio.EndOfStream
        return data

    async def send(self, item: bytes) -> None:
        try:
            await self.bounded.send_all(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise anyio.BrokenResourceError from exc

    async def send_eof(self) -> None:
        raise NotImplementedError("gRPC connections are never half-closed")

    async def aclose(self) -> None:
        await self.bounded.aclose()


@dataclasses.dataclass(eq=False)
class _Connection:
    """One client connection: a task per call, each in a cancel scope a stream reset cancels."""

    server: _Server
    peer: str = ""  # the client's address, as its calls present it
    draining: bool = False
    active: int = 0
    highest_stream: int = 0
    scopes: dict[int, trio.CancelScope] = dataclasses.field(default_factory=dict)
    resets: set[int] = dataclasses.field(default_factory=set)
    listening: trio.CancelScope = dataclasses.field(default_factory=trio.CancelScope)
    socket: ServerSocket | None = None

    async def serve(self, stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]) -> None:
        if isinstance(stream, trio.SSLStream):
            # Before purerpc's reader and writer both use the stream: when a handshake fails,
            # trio leaves a second task waiting for it forever.
            with trio.fail_after(TLS_HANDSHAKE_TIMEOUT):
                await stream.do_handshake()
        connection = H2Connection(
            GRPCConfiguration(client_side=False, max_message_length=self.server.max_message_length),
            self.on_reset,
        )
        client_stream = _AnyioStream(stream)
        # watched until purerpc's writer is done, which still writes as the connection closes
        with (
            self.server.watchdog.watching(client_stream.bounded),
            trio.CancelScope() as connection_scope,
        ):
            async with ServerSocket(connection, client_stream) as grpc_socket:
                self.socket = grpc_socket
                async with trio.open_nursery() as calls:
                    greeting = trio.CancelScope()
                    calls.start_soon(self.expect_greeting, connection, connection_scope, greeting)
                    with self.listening:
                        if self.server.draining:
                            self.drain()
                        async for grpc_stream in grpc_socket.listen():
                            self.dispatch(calls, grpc_stream)
                    greeting.cancel()
                    if not self.listening.cancelled_caught:
                        # The client closed the connection, or it broke: nobody is left to
                        # answer, and nothing queued can be delivered. Stop everything,
                        # purerpc's writer too.
                        connection_scope.cancel()

    @staticmethod
    async def expect_greeting(
        connection: H2Connection, connection_scope: trio.CancelScope, scope: trio.CancelScope
    ) -> None:
        """Close the connection unless the client sends the HTTP/2 preface in time.

        Without this, a client that sends part of the preface and then waits
        would hold its connection open for ever.
        """
        with scope:
            with trio.move_on_after(PREFACE_TIMEOUT):
                await connection.greeted.wait()
                return
            log.debug(
                "gRPC: closing a connection that sent no HTTP/2 preface in %s s", PREFACE_TIMEOUT
            )
            connection_scope.cancel()

    def dispatch(self, calls: trio.Nursery, stream: GRPCProtoStream) -> None:
        assert self.socket is not None
        self.highest_stream = max(self.highest_stream, stream.stream_id)
        if stream.stream_id in self.resets:  # reset in the same read as its headers
            self.resets.discard(stream.stream_id)
            self.socket.forget(stream.stream_id)
            return
        scope = self.scopes[stream.stream_id] = trio.CancelScope()
        self.active += 1
        calls.start_soon(self.run_call, stream, scope)

    def on_reset(self, stream_id: int) -> None:
        """The client reset a stream (cancelled the call, or its deadline passed)."""
        if stream_id in self.scopes:
            self.resets.add(stream_id)
            self.scopes[stream_id].cancel()
        elif stream_id > self.highest_stream:
            self.resets.add(stream_id)

    async def run_call(self, stream: GRPCProtoStream, scope: trio.CancelScope) -> None:
        try:
            status = None
            # the request id (put here by the server's run_call) also ends the call, so that a
            # client gets it with an error that came before any response message
            trailers: dict[str, str] = {}
            with scope:
                status = await self.server.run_call(
                    stream, refuse=self.draining, peer=self.peer, trailers=trailers
                )
            if scope.cancelled_caught and self.server.cutting:  # the shutdown grace is over
                status = status_for(errors.ShuttingDown("the server is shutting down"))
            if status is not None and stream.stream_id not in self.resets:
                try:
                    await stream.close(status, custom_metadata=tuple(trailers.items()))
                except (h2.exceptions.H2Error, TypeError) as exc:
                    log.debug("gRPC: could not end stream %d: %r", stream.stream_id, exc)
        finally:
            self.end_call(stream)

    def end_call(self, stream: GRPCProtoStream) -> None:
        assert self.socket is not None
        stream_id = stream.stream_id
        self.scopes.pop(stream_id, None)
        self.resets.discard(stream_id)
        self.socket.forget(stream_id)
        self.active -= 1
        if self.draining and not self.active:
            self.close()

    def drain(self) -> None:
        """Refuse new calls; close the connection once the calls in flight are over."""
        self.draining = True
        if not self.active:
            self.close()

    def cut(self) -> None:
        """Cancel the calls in flight (each then ends with UNAVAILABLE)."""
        for scope in self.scopes.values():
            scope.cancel()

    def close(self) -> None:
        """Say goodbye (GOAWAY) and stop reading; what is queued is still sent."""
        if self.socket is not None:
            self.socket.say_goodbye()
        self.listening.cancel()


class _Server:
    """Dispatches calls to services and keeps track of connections for the shutdown drain."""

    def __init__(
        self,
        services: dict[str, Service],
        *,
        max_message_length: int,
        send_timeout: float = math.inf,
        refused: Callable[[_Call, errors.ChatError], None] = lambda call, error: None,
    ) -> None:
        self.services = services
        self.refused = refused  # told of every call that ends with an error (see _Chat.refused)
        self.max_message_length = max_message_length
        # bounds every send to a client (run by serve_grpc around the connections)
        self.watchdog = SendWatchdog(send_timeout)
        self.draining = False
        self.cutting = False  # the shutdown grace is over: calls in flight are being cut
        self.connections: set[_Connection] = set()
        self._all_closed = trio.Event()

    async def serve_connection(
        self, stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
    ) -> None:
        """Serve one accepted connection until it closes (trio closes ``stream`` afterwards)."""
        connection = _Connection(self, peer=stream_peer(stream))
        self.connections.add(connection)
        try:
            await connection.serve(stream)
        except* Exception as group:  # the client went away or spoke something else than gRPC
            # except*: the calls' nursery raises a group, which may also hold Cancelled when the
            # server is being stopped; `except Exception` would let such a group through
            log.debug("gRPC connection ended: %r", group)
        finally:
            self.connections.discard(connection)
            if self.draining and not self.connections:
                self._all_closed.set()

    async def drain(self, grace: float) -> None:
        """Close idle connections; wait up to ``grace`` seconds for the calls in flight.

        Calls still running then are cancelled (their asks stored as ``cancelled``)
        and end with UNAVAILABLE; the connections have GOODBYE_SECONDS to send that.
        """
        self.draining = True
        for connection in list(self.connections):
            connection.drain()
        if not self.connections:
            self._all_closed.set()
        with trio.move_on_after(grace) as timer:
            await self._all_closed.wait()
        if timer.cancelled_caught:
            log.warning(
                "gRPC: cancelling the calls still running after %s s of shutdown grace", grace
            )
            self.cutting = True
            for connection in list(self.connections):
                connection.cut()
            with trio.move_on_after(GOODBYE_SECONDS):
                await self._all_closed.wait()

    async def run_call(
        self, stream: GRPCProtoStream, *, refuse: bool, peer: str, trailers: dict[str, str]
    ) -> Status | None:
        """Run the call on ``stream``; return the status to end it with (None: nobody to tell).

        ``trailers`` gets the metadata the call ends with (its request id). A
        call that ends with a ChatError is reported to ``refused`` first. A
        response message the client has not taken within CLIENT_SEND_TIMEOUT
        seconds ends the call with CANCELLED, as if the client had gone (it is
        told, should it read).
        """
        request = await stream.receive_event()
        if not isinstance(request, RequestReceived):
            return status_for(errors.InternalError("expected request headers"))
        call = _Call(request, peer, accept_request_id(_first(request, "x-request-id")))
        trailers["x-request-id"] = call.request_id
        service = self.services.get(request.service_name)
        method = service.methods.get(request.method_name) if service else None
        if method is None or method.signature.cardinality not in (
            Cardinality.UNARY_UNARY,
            Cardinality.UNARY_STREAM,
        ):
            return status_for(errors.MethodNotAllowed(f"method {call.method} is not implemented"))
        timeout = request.timeout.total_seconds() if request.timeout is not None else math.inf
        response = _Response(stream, call.request_id)
        try:
            if refuse and request.service_name != HEALTH_SERVICE:  # health says NOT_SERVING
                raise errors.ShuttingDown("the server is shutting down")
            stream.expect_message_type(method.signature.request_type)
            with trio.move_on_after(timeout) as deadline, self.watchdog.watching(response):
                response.scope = deadline  # what the watchdog cancels for a send too slow
                message = call.message = await _single_message(stream)
                if method.signature.cardinality is Cardinality.UNARY_UNARY:
                    await response.send(await method.method_fn(message, request=call))
                else:
                    replies = method.method_fn(message, request=call)
                    async with contextlib.aclosing(replies):
                        async for reply in replies:
                            await response.send(reply)
        except h2.exceptions.StreamClosedError:
            return None  # the stream was reset under us
        except Exception as exc:
            if isinstance(exc, errors.ChatError):
                error = exc
            else:  # logged with its traceback; the client learns nothing more
                error = errors.unexpected(exc, f"gRPC {call.method}")
            self.refused(call, error)
            if isinstance(error, errors.RateLimited):  # a key's limits: when to ask again
                trailers["retry-after"] = str(error.retry_after_seconds)
            return status_for(error)
        too_slow = response.too_slow
        if too_slow is not None:  # as if the client had gone; it is told, should it read
            log.info(
                "gRPC %s: giving up on a client that stopped reading: %s", call.method, too_slow
            )
            return Status(StatusCode.CANCELLED, str(too_slow))
        if deadline.cancelled_caught:
            return Status(StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed")
        return Status(StatusCode.OK)


class _Response(Watched):
    """Sends response messages, starting the response (headers, with the request id) before the first.

    Watched by the server's watchdog while the call runs: when a send waits too
    long, :attr:`too_slow` is set and :attr:`scope` (the call's deadline scope)
    is cancelled.
    """

    def __init__(self, stream: GRPCProtoStream, request_id: str) -> None:
        super().__init__()
        self._stream = stream
        self._request_id = request_id
        self._started = False
        self.scope: trio.CancelScope | None = None  # set before the first send

    async def send(self, message: Any) -> None:
        """Send one message; the call's scope is cancelled if the client does not take it in time.

        purerpc waits here for the stream's HTTP/2 flow-control window, which a
        client that stops reading never reopens.
        """
        self.begin()
        try:
            if not self._started:
                metadata = (("x-request-id", self._request_id),)
                await self._stream.start_response(custom_metadata=metadata)
                self._started = True
            await self._stream.send_message(message)
        finally:
            self.end()

    async def expire(self, error: ClientTooSlow) -> None:
        """End the wait of the send in progress (for the window): the call's scope is cancelled."""
        assert self.scope is not None
        self.scope.cancel()


async def _single_message(stream: GRPCProtoStream) -> Any:
    """The one request message of a unary-request call, once the client has finished sending."""
    message = None
    while True:
        try:
            event = await stream.receive_event()
        except DecodeError:
            raise errors.InvalidInput("the request message could not be decoded") from None
        if isinstance(event, BadRequestData):
            too_large = event.status.status_code == StatusCode.RESOURCE_EXHAUSTED
            raise (errors.RequestTooLarge if too_large else errors.InvalidInput)(
                event.status.status_message
            )
        if isinstance(event, RequestEnded):
            break
        if isinstance(event, MessageReceived):
            if message is not None:
                raise errors.InvalidInput("expected one request message, got more")
            message = event.data
    if message is None:
        raise errors.InvalidInput("expected one request message, got none")
    return message
