"""The HTTP transport: a quart-trio app that adapts requests to :class:`ChatService` calls.

Routes: ``POST /ask/{id}`` (whole answer as JSON), ``POST /ask/{id}/stream``
(Server-Sent Events), their regenerate twins ``POST
/conversations/{id}/turns/{turn_id}/regenerate[/stream]``, ``GET /healthz``,
the conversation management routes (:mod:`.http_conversations`), and the
OpenAPI document with Swagger UI (``/openapi.json``, ``/docs``), the web console
(``/``, :mod:`.http_console`), and the
OpenAI-compatible API under ``/v1`` (:mod:`.openai_api`). Every error is JSON
``{"error": {"code", "message"}}`` with the status :data:`STATUS_BY_ERROR`
gives its class (under ``/v1``: OpenAI's shape and table,
:mod:`.openai_api.errors`); what the HTTP layer refuses itself (a body over
the limit, a wrong method, an unknown route) is turned into the matching ChatError
first, and an unexpected exception into an InternalError (logged once).

Every request but those to the open paths is made a
:class:`~easybackend.chat.caller.Caller` first (its key, ``X-Request-Id``,
the peer and ``X-Forwarded-For``), which every handler hands to the core; an
ask refused before the core took it (a wrong key, a shutdown, a body that
does not validate) is reported to :meth:`ChatService.refused`, so it has its
access line and its metrics like any other.

When the client disconnects, quart-trio cancels the handler (or the SSE body
being sent); the chat core then closes the upstream call and stores the
partial answer as ``cancelled``.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pydantic
import trio
from quart import Quart, Response, g, request
from quart_schema import (
    Info,
    QuartSchema,
    RequestSchemaValidationError,
    document_request,
    document_response,
    hide,
    tag,
    validate_request,
)
from quart_trio import QuartTrio
from quart_trio.wrappers import TrioRequest
from werkzeug import exceptions as werkzeug_errors

from .. import errors
from ..chat.caller import Caller
from ..chat.client_json import parse_client_json
from ..chat.events import Event
from ..chat.service import AskRequest, ChatService, validate_conversation_id
from ..chat.views import answer_state
from ..errors import (
    ChatError,
    HTTPError,
    InternalError,
    InvalidInput,
    MethodNotAllowed,
    NotFound,
    RequestTooLarge,
    ShuttingDown,
    StorageUnavailable,
    wire_form,
)
from ..request_ids import accept_request_id, new_request_id
from . import openai_api
from .http_admin import admin_routes, is_admin_path, model_routes
from .http_answers import answer_routes
from .http_console import DOCS_STATIC_PREFIX, console_routes, is_console_path
from .http_conversations import conversation_routes
from .openai_api import errors as openai_errors
from .openapi import EasyBackendOpenAPI, UsageBody
from .sse import end_data, ended_frame, event_stream, sse_body

DOC_PATHS = {"/docs", "/openapi.json"}
REGENERATE_ENDPOINTS = {"regenerate", "regenerate_stream"}  # asks outside /ask/
SSE_ENDPOINTS = {"ask_stream", "regenerate_stream"}
# The HTTP status of every error class (the README's error table is checked against it).
STATUS_BY_ERROR: dict[type[ChatError], int] = {
    errors.InvalidInput: 400,
    errors.HTTPError: 400,  # the HTTP layer's own status is kept (see http_error below)
    errors.UpstreamRejected: 400,  # the /v1 relay only, where the provider's status is kept
    errors.Unauthenticated: 401,
    errors.Forbidden: 403,  # the admin API only
    errors.ModelNotAllowed: 403,
    errors.NotFound: 404,
    errors.MethodNotAllowed: 405,
    errors.KeyConflict: 409,  # the admin API only
    errors.PromptTooLong: 413,
    errors.RequestTooLarge: 413,
    errors.TooManyRequests: 429,
    errors.RateLimited: 429,  # with Retry-After
    errors.BudgetExhausted: 429,  # with Retry-After
    errors.UpstreamRateLimited: 429,
    errors.InternalError: 500,
    errors.UpstreamError: 502,
    errors.UpstreamAuthFailed: 502,
    errors.UpstreamUnavailable: 503,  # with Retry-After when a route cools down
    errors.StorageUnavailable: 503,
    errors.ShuttingDown: 503,
    errors.UpstreamTimeout: 504,
}


USER_DESCRIPTION = (
    "The end user this ask is for (a bot's user, within its key): USER_RPM limits each apart."
)


class AskBody(pydantic.BaseModel):
    """An ask. Only ``prompt`` is required; the rest override the server's settings for this turn.
    Values keep their JSON types, as in the core: ``"max_tokens": true``, ``1.0`` or ``"1"``,
    ``"background": 1`` are refused (400)."""

    model_config = pydantic.ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [{"prompt": "你好"}, {"prompt": "Tell me a joke", "temperature": 1.2}]
        },
    )

    prompt: str = pydantic.Field(
        min_length=1, description="The user's message, passed through as written."
    )
    model: str | None = pydantic.Field(
        None, min_length=1, description="Model for this turn (default GPT_ENGINE)."
    )
    temperature: float | None = pydantic.Field(
        None, ge=0, le=2, description="Sampling temperature, 0-2."
    )
    max_tokens: int | None = pydantic.Field(None, gt=0, description="Cap on the answer's tokens.")
    system: str | None = pydantic.Field(None, description="System prompt for this turn only.")
    parent_id: str | None = pydantic.Field(
        None,
        description='The turn to answer after (a branch); "root" starts a new first turn.'
        " Default: the conversation's head.",
    )
    user: str | None = pydantic.Field(None, description=USER_DESCRIPTION)
    background: bool = pydantic.Field(
        False,
        description="Keep answering when the client goes away (the answer is stored whole);"
        " a whole-answer ask then returns 202 at once with the turn to poll or follow.",
    )


class RegenerateBody(pydantic.BaseModel):
    """A regenerate: the turn's prompt asked again. Every field is optional (so is the body);
    values keep their JSON types, as in an ask's."""

    model_config = pydantic.ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [{}, {"temperature": 1.5}]}
    )

    model: str | None = pydantic.Field(
        None, min_length=1, description="Model for this turn (default GPT_ENGINE)."
    )
    temperature: float | None = pydantic.Field(
        None, ge=0, le=2, description="Sampling temperature, 0-2."
    )
    max_tokens: int | None = pydantic.Field(None, gt=0, description="Cap on the answer's tokens.")
    system: str | None = pydantic.Field(None, description="System prompt for this turn only.")
    user: str | None = pydantic.Field(None, description=USER_DESCRIPTION)
    background: bool = pydantic.Field(
        False, description="Keep answering when the client goes away (see the ask's)."
    )


class AnswerBody(pydantic.BaseModel):
    """A whole answer."""

    model_config = pydantic.ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "conversation_id": "123",
                    "response": "你好！有什么可以帮你的吗？",
                    "model": "gpt-4.1-mini",
                    "finish_reason": "stop",
                    "usage": {"prompt_tokens": 12, "completion_tokens": 10, "total_tokens": 22},
                    "turn_id": "5c668971bf44ff809097e1a5",
                    "turn": 1,
                }
            ]
        }
    )

    conversation_id: str
    response: str
    model: str
    finish_reason: str = pydantic.Field(description="stop, length, content_filter, … or cancelled")
    usage: UsageBody
    turn_id: str = pydantic.Field(description="The new turn's id; it is the conversation's head")
    turn: int = pydantic.Field(description="The new turn's position on its path, from 1")


class HealthBody(pydantic.BaseModel):
    status: str


def error_response(error: ChatError, status: int | None = None) -> Response:
    """The JSON error response for ``error``: its class's status unless ``status`` is given.

    A refusal by a key's limits also says when to retry: ``retry_after`` (seconds) in the
    error, as the ``Retry-After`` header the app adds does.
    """
    shown: dict[str, object] = {"code": error.code, "message": error.message}
    if isinstance(error, errors.RateLimited) or (
        isinstance(error, errors.UpstreamUnavailable) and error.retry_after is not None
    ):
        shown["retry_after"] = error.retry_after_seconds
    body = json.dumps({"error": shown}, ensure_ascii=False)
    return Response(
        body, status=status or wire_form(error, STATUS_BY_ERROR), mimetype="application/json"
    )


class _Request(TrioRequest):
    """A request whose body is read as JSON whatever its Content-Type (as the original did)."""

    async def get_json(self, force: bool = False, silent: bool = False, cache: bool = True) -> Any:
        """The body parsed by the one client-JSON parser, cached per ``silent``.

        A body that is not UTF-8 JSON (or nests too deep) raises InvalidInput, a 400
        that says what is wrong with it; with ``silent`` it gives None instead. A body
        over MAX_BODY_BYTES raises werkzeug's 413. On cancellation nothing is cached.
        """
        if cache and self._cached_json[silent] is not Ellipsis:
            return self._cached_json[silent]
        body = await self.get_data(cache=cache)
        try:
            result = parse_client_json(body, "the request body")
        except InvalidInput:
            if not silent:
                raise
            result = None
        if cache:
            self._cached_json[silent] = result
        return result


class Stopping:
    """The HTTP side of a shutdown, shared by the app and the server that runs it.

    Once the shutdown has begun, new asks are refused with 503 ``shutting_down``
    and every HTTP/1 response carries ``Connection: close``, so that a kept-alive
    connection is not reused. When the grace ends, the asks still in progress
    are cancelled (the chat core stores their partial answers as ``cancelled``)
    and answer 503 ``shutting_down``; a streamed answer ends with an ``error``
    event of that code.
    """

    def __init__(self) -> None:
        self.begun = False
        self.grace_over = False
        self._cuttable: set[trio.CancelScope] = set()

    async def follow(self, shutdown: trio.Event, grace: float) -> None:
        """Begin when ``shutdown`` is set, end the grace ``grace`` seconds later."""
        await shutdown.wait()
        self.begun = True
        await trio.sleep(grace)
        self.grace_over = True
        for scope in list(self._cuttable):
            scope.cancel()

    @contextlib.contextmanager
    def cut_at_grace_end(self) -> Iterator[trio.CancelScope]:
        """A cancel scope that is cancelled when the grace ends (at once if it has)."""
        with trio.CancelScope() as scope:
            if self.grace_over:
                scope.cancel()
            self._cuttable.add(scope)
            try:
                yield scope
            finally:
                self._cuttable.discard(scope)

    async def next_event(self, events: AsyncIterator[Event]) -> Event:
        """The ask's next event; raises ShuttingDown if the grace ends first."""
        with self.cut_at_grace_end():
            return await anext(events)
        raise ShuttingDown("the server is shutting down")


def create_app(service: ChatService, stopping: Stopping | None = None) -> Quart:
    """The HTTP application for ``service``; ``stopping`` tells it of a shutdown."""
    stopping = stopping if stopping is not None else Stopping()
    app = QuartTrio(__name__)
    app.request_class = _Request
    app.config.update(
        MAX_CONTENT_LENGTH=service.settings.max_body_bytes,
        RESPONSE_TIMEOUT=None,  # answers stream for as long as the model talks
        BODY_TIMEOUT=60,
    )
    QuartSchema(
        app,
        info=Info(
            title="EasyBackend",
            version="0.1.0",
            description="ChatGPT-style conversations with server-side memory.",
        ),
        redoc_ui_path=None,
        scalar_ui_path=None,
        swagger_ui_path=None,  # served by http_console from the installed swagger-ui-bundle
        openapi_provider_class=EasyBackendOpenAPI,
    )

    def failed(error: ChatError, status: int | None = None) -> Response:
        """The response for ``error``; an ask the core never took is reported as refused."""
        if is_ask() and not g.get("asked", False):
            g.asked = True  # reported once
            service.refused(
                error,
                protocol=ask_protocol(),
                request_id=g.get("request_id") or new_request_id(),
                conversation_id=(request.view_args or {}).get("conversation_id"),
                caller=g.get("caller"),
            )
        if openai_api.is_openai_path(request.path):  # /v1: OpenAI's error shape
            response = openai_errors.error_response(error, status)
        else:
            response = error_response(error, status)
        if isinstance(error, errors.Unauthenticated):
            response.headers["WWW-Authenticate"] = 'Bearer realm="easybackend"'
        if isinstance(error, errors.RateLimited) or (
            isinstance(error, errors.UpstreamUnavailable) and error.retry_after is not None
        ):  # under /v1 too: the SDKs read it
            response.headers["Retry-After"] = str(error.retry_after_seconds)
        return response

    @app.errorhandler(ChatError)
    async def chat_error(exc: ChatError) -> Response:
        return failed(exc)

    @app.errorhandler(Exception)
    async def unexpected_error(exc: Exception) -> Response:
        """An exception no handler expected: logged with its traceback, a JSON 500 without details."""
        return failed(errors.unexpected(exc, f"HTTP {request.method} {request.path}"))

    settings = service.settings
    open_paths = (
        {"/healthz", "/readyz"}
        | (DOC_PATHS if settings.public_docs else set())
        | ({"/metrics"} if settings.public_metrics else set())
    )

    def is_ask() -> bool:
        return request.method == "POST" and (
            request.path.startswith("/ask/")
            or request.endpoint in REGENERATE_ENDPOINTS
            or request.endpoint in openai_api.ASK_ENDPOINTS
        )

    def ask_protocol() -> str:
        if openai_api.is_openai_path(request.path):
            return openai_api.PROTOCOL
        return "sse" if request.endpoint in SSE_ENDPOINTS else "http"

    @app.before_request
    async def authenticate() -> None:
        """Every route but the open ones is made a Caller (g.caller); raises Unauthenticated.

        Also takes the request id from X-Request-Id (or makes one); it is sent back.
        """
        g.request_id = accept_request_id(request.headers.get("X-Request-Id"))
        g.caller = None
        if request.method == "OPTIONS" or request.path in open_paths:
            return
        if is_console_path(request.path, console=settings.console):
            return
        if settings.public_docs and request.path.startswith(DOCS_STATIC_PREFIX):
            return
        if is_admin_path(request.path):  # ADMIN_KEY, not an API key (see http_admin)
            return
        g.caller = service.caller(
            protocol=ask_protocol(),
            authorization=request.headers.get("Authorization"),
            request_id=g.request_id,
            peer=request.remote_addr,
            forwarded_for=request.headers.getlist("X-Forwarded-For"),
        )

    @app.before_request
    async def refuse_asks_when_stopping() -> None:
        """Once the shutdown has begun, an ask is refused (503 shutting_down)."""
        if stopping.begun and is_ask():
            raise ShuttingDown("the server is shutting down")

    @app.after_request
    async def close_when_stopping(response: Response) -> Response:
        """Once the shutdown has begun, an HTTP/1 connection is not kept alive."""
        if stopping.begun and request.http_version.startswith("1"):
            response.headers["Connection"] = "close"
        return response

    allowed_origins = set(service.settings.cors_origins)

    @app.after_request
    async def cors(response: Response) -> Response:
        response.headers["X-Request-Id"] = getattr(g, "request_id", None) or new_request_id()
        origin = request.headers.get("Origin")
        if origin and ("*" in allowed_origins or origin.rstrip("/") in allowed_origins):
            response.headers["Access-Control-Allow-Origin"] = (
                "*" if "*" in allowed_origins else origin
            )
            response.headers["Access-Control-Allow-Headers"] = (
                "Authorization, Content-Type, X-Request-Id, X-Conversation-Id"
            )
            response.headers["Access-Control-Allow-Methods"] = (
                "GET, POST, PUT, PATCH, DELETE, OPTIONS"
            )
            response.headers["Access-Control-Max-Age"] = "600"
            response.vary.add("Origin")
        return response

    @app.errorhandler(RequestSchemaValidationError)
    async def schema_error(exc: RequestSchemaValidationError) -> Response:
        return failed(InvalidInput(_describe_validation(exc.validation_error)))

    @app.errorhandler(werkzeug_errors.HTTPException)
    async def http_error(exc: werkzeug_errors.HTTPException) -> Response:
        """What the HTTP layer refused itself, as the ChatError of that refusal."""
        status = exc.code or 500
        message = exc.description or exc.name
        if status == 413:
            limit = service.settings.max_body_bytes
            return failed(RequestTooLarge(f"the request body is larger than {limit} bytes"))
        if status == 500:  # an InternalServerError raised on purpose: nothing to log
            return failed(InternalError(errors.INTERNAL_MESSAGE))
        error = _HTTP_REFUSALS.get(status, HTTPError)(message)
        response = failed(error, status)
        if isinstance(exc, werkzeug_errors.MethodNotAllowed) and exc.valid_methods:
            response.headers["Allow"] = ", ".join(exc.valid_methods)  # required on a 405
        return response

    def caller() -> Caller:
        """The request's Caller (made by ``authenticate``; every non-open route has one)."""
        made: Caller | None = g.caller
        assert made is not None, "an open path asked for a caller"
        return made

    def ask_request(conversation_id: str, body: AskBody) -> AskRequest:
        g.asked = True  # the core accounts for it from here on
        return AskRequest(conversation_id=conversation_id, caller=caller(), **body.model_dump())

    async def regenerate_request(conversation_id: str, turn_id: str) -> AskRequest:
        """The regenerate of ``turn_id``; its body (optional) holds the overrides. Raises InvalidInput."""
        body = await request.get_data()
        try:
            overrides = RegenerateBody.model_validate(await request.get_json() if body else {})
        except pydantic.ValidationError as exc:
            raise InvalidInput(_describe_validation(exc)) from None
        g.asked = True
        return AskRequest(
            conversation_id=conversation_id,
            prompt="",
            regenerate=turn_id,
            caller=caller(),
            **overrides.model_dump(),
        )

    async def whole_answer(ask: AskRequest) -> Response:
        if ask.background:  # answered in the background: poll or follow the turn
            answer = await service.ask_in_background(ask)
            body = answer_state(ask.conversation_id, answer, None)
            return Response(json.dumps(body, ensure_ascii=False), 202, mimetype="application/json")
        with stopping.cut_at_grace_end():
            answer = await service.complete(ask)
            body = {"response": answer.text, **end_data(answer.end)}
            return Response(json.dumps(body, ensure_ascii=False), mimetype="application/json")
        raise ShuttingDown("the server is shutting down")  # the grace ended first

    async def streamed_answer(ask: AskRequest) -> Response:
        first: Event | None = None
        ended = None
        if ask.background:  # the answer goes on without this client, which follows it
            log = await service.ask_in_background(ask)
            events = log.follow()
            ended = functools.partial(
                ended_frame, service, log.conversation_id, log.turn_id, caller=ask.caller
            )
        else:
            events = service.ask(ask)
            try:
                first = await stopping.next_event(events)
            except BaseException:
                await events.aclose()
                raise
        return event_stream(sse_body(first, events, stopping, ended))

    @app.post("/ask/<conversation_id>")
    @validate_request(AskBody)
    @document_response(AnswerBody, 200)
    @tag(["ask"])
    async def ask(conversation_id: str, data: AskBody) -> Response:
        """Ask and get the whole answer.

        The conversation is created by its first ask and remembered: each ask
        sends the system prompt, the most recent turns of the path to the new
        turn's parent that fit the context window and the new prompt to the
        model, then stores the new turn, which becomes the conversation's head.
        The parent is the head unless ``parent_id`` names another turn (a
        branch; ``"root"`` starts a new first turn); an unknown one is a 404
        before anything is sent to the model.
        """
        return await whole_answer(ask_request(conversation_id, data))

    @app.post("/ask/<conversation_id>/stream")
    @validate_request(AskBody)
    @tag(["ask"])
    async def ask_stream(conversation_id: str, data: AskBody) -> Response:
        """Ask and receive the answer as Server-Sent Events.

        Events: ``delta`` (`{"text": …}`) for each piece of the answer, then
        exactly one ``end`` (`{"conversation_id", "model", "finish_reason",
        "usage", "turn_id", "turn"}`) or one ``error`` (`{"code", "message"}`).
        Errors that occur before the first piece (invalid input, prompt too
        long, unknown parent, upstream refused) are plain JSON error responses
        with their HTTP status. Closing the connection cancels the answer; the
        part already sent is stored with finish reason ``cancelled``.
        """
        return await streamed_answer(ask_request(conversation_id, data))

    @app.post("/conversations/<conversation_id>/turns/<turn_id>/regenerate")
    @document_request(RegenerateBody)
    @document_response(AnswerBody, 200)
    @tag(["ask"])
    async def regenerate(conversation_id: str, turn_id: str) -> Response:
        """Answer a turn's prompt again, as a new sibling of it (whole answer, like an ask).

        The new turn's context is the path to the turn's parent; it becomes the
        head. The body is optional and holds per-turn overrides.
        """
        return await whole_answer(await regenerate_request(conversation_id, turn_id))

    @app.post("/conversations/<conversation_id>/turns/<turn_id>/regenerate/stream")
    @document_request(RegenerateBody)
    @tag(["ask"])
    async def regenerate_stream(conversation_id: str, turn_id: str) -> Response:
        """Regenerate, the answer as Server-Sent Events (the events of ``/ask/{id}/stream``)."""
        return await streamed_answer(await regenerate_request(conversation_id, turn_id))

    @app.route("/ask/<path:conversation_id>", methods=["POST"])
    @hide
    async def ask_bad_id(conversation_id: str) -> Response:
        """Any other path below /ask/ holds a '/' and so names an invalid conversation id."""
        validate_conversation_id(conversation_id)
        raise NotFound(f"no route POST /ask/{conversation_id}")

    app.register_blueprint(console_routes(console=settings.console))
    app.register_blueprint(conversation_routes(service, caller))
    app.register_blueprint(answer_routes(service, caller, stopping))
    app.register_blueprint(model_routes(service, caller))
    app.register_blueprint(admin_routes(service))
    app.register_blueprint(openai_api.openai_routes(service, caller, stopping))

    @app.get("/readyz")
    @document_response(HealthBody, 200)
    @tag(["operations"])
    async def readyz() -> Response:
        """Readiness: 200 while the conversation store answers, else 503 (not ready)."""
        if await service.ready():
            if not settings.upstreams:
                return Response('{"status": "ready"}', mimetype="application/json")
            # with CONFIG_FILE: each upstream and its keys' states (keys as number, last 4)
            details = {"status": "ready", "upstreams": service.upstream.router.describe()}
            return Response(json.dumps(details, ensure_ascii=False), mimetype="application/json")
        return error_response(
            StorageUnavailable("the conversation store does not answer or takes no writes")
        )

    @app.get("/metrics")
    @tag(["operations"])
    async def metrics() -> Response:
        """Prometheus metrics (text format)."""
        return Response(service.metrics.render(), content_type=service.metrics.content_type)

    @app.get("/healthz")
    @document_response(HealthBody, 200)
    @tag(["operations"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process is up and serving HTTP."""
        return {"status": "ok"}

    return app


# Statuses the HTTP layer refuses with, as the error each one is (any other: HTTPError).
_HTTP_REFUSALS: dict[int, type[ChatError]] = {
    400: InvalidInput,
    404: NotFound,
    405: MethodNotAllowed,
}


def _describe_validation(error: object) -> str:
    if isinstance(error, pydantic.ValidationError):
        problems = []
        for item in error.errors():
            if not item["loc"]:  # the body as a whole: not a JSON object (or not sent as JSON)
                problems.append("the request body must be a JSON object")
                continue
            where = ".".join(str(part) for part in item["loc"])
            problems.append(f"{where}: {item['msg']}")
        return "; ".join(problems)
    return "the request body must be a JSON object"
