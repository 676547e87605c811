"""The HTTP transport: a quart-trio app that adapts requests to :class:`ChatService` calls.

Routes: ``POST /ask/{id}`` (whole answer as JSON), ``POST /ask/{id}/stream``
(Server-Sent Events), ``GET /healthz``, and the OpenAPI document with Swagger
UI (``/openapi.json``, ``/docs``). Every error is JSON
``{"error": {"code", "message"}}`` with the status of :data:`STATUS_BY_CODE`.

When the client disconnects, quart-trio cancels the handler (or the SSE body
being sent); the chat core then closes the upstream call and stores the
partial answer as ``cancelled``.
"""

from __future__ import annotations

import contextlib
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
    document_response,
    hide,
    tag,
    validate_request,
)
from quart_trio import QuartTrio
from quart_trio.wrappers import TrioRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from ..chat.caller import client_address
from ..chat.client_json import parse_client_json
from ..chat.service import AskRequest, ChatService, Delta, End, validate_conversation_id
from ..errors import ChatError, InvalidInput, NotFound, ShuttingDown
from ..request_ids import accept_request_id, new_request_id
from .http_conversations import conversation_routes
from .openapi import EasyBackendOpenAPI, UsageBody

DOC_PATHS = {"/docs", "/openapi.json"}
INTERNAL_MESSAGE = "the server failed to answer; see its log"
STATUS_BY_CODE = {
    "invalid_input": 400,
    "unauthenticated": 401,
    "not_found": 404,
    "too_many_requests": 429,
    "prompt_too_long": 413,
    "request_too_large": 413,
    "upstream_rate_limited": 429,
    "upstream_error": 502,
    "upstream_auth_failed": 502,
    "upstream_unavailable": 502,
    "storage_unavailable": 503,
    "shutting_down": 503,
    "upstream_timeout": 504,
}


class AskBody(pydantic.BaseModel):
    """An ask. Only ``prompt`` is required; the rest override the server's settings for this turn."""

    model_config = pydantic.ConfigDict(
        extra="forbid",
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
                }
            ]
        }
    )

    conversation_id: str
    response: str
    model: str
    finish_reason: str = pydantic.Field(description="stop, length, content_filter, … or cancelled")
    usage: UsageBody


class HealthBody(pydantic.BaseModel):
    status: str


def error_response(code: str, message: str, status: int | None = None) -> Response:
    body = json.dumps({"error": {"code": code, "message": message}}, ensure_ascii=False)
    return Response(
        body, status=status or STATUS_BY_CODE.get(code, 500), mimetype="application/json"
    )


def _sse(event: str, data: dict[str, object]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def _end_data(end: End) -> dict[str, object]:
    return {
        "conversation_id": end.conversation_id,
        "model": end.model,
        "finish_reason": end.finish_reason,
        "usage": end.usage.as_dict(),
    }


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

    async def next_event(self, events: AsyncIterator[Delta | End]) -> Delta | End:
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
        openapi_provider_class=EasyBackendOpenAPI,
    )

    @app.errorhandler(ChatError)
    async def chat_error(exc: ChatError) -> Response:
        response = error_response(exc.code, exc.message)
        if exc.code == "unauthenticated":
            response.headers["WWW-Authenticate"] = 'Bearer realm="easybackend"'
        return response

    settings = service.settings
    open_paths = (
        {"/healthz", "/readyz"}
        | (DOC_PATHS if settings.public_docs else set())
        | ({"/metrics"} if settings.public_metrics else set())
    )

    @app.before_request
    async def authenticate() -> None:
        """Every route but the open ones needs a key (when keys are configured); sets g.owner.

        Also takes the request id from X-Request-Id (or makes one); it is sent back.
        """
        g.request_id = accept_request_id(request.headers.get("X-Request-Id"))
        if request.method == "OPTIONS" or request.path in open_paths:
            g.owner = ""
            return
        g.owner = service.keys.owner_for_header(request.headers.get("Authorization"))

    @app.before_request
    async def refuse_asks_when_stopping() -> None:
        """Once the shutdown has begun, an ask is refused (503 shutting_down)."""
        if stopping.begun and request.method == "POST" and request.path.startswith("/ask/"):
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
                "Authorization, Content-Type, X-Request-Id"
            )
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, PUT, DELETE, OPTIONS"
            response.headers["Access-Control-Max-Age"] = "600"
            response.vary.add("Origin")
        return response

    @app.errorhandler(RequestSchemaValidationError)
    async def schema_error(exc: RequestSchemaValidationError) -> Response:
        return error_response("invalid_input", _describe_validation(exc.validation_error))

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        if status == 413:
            limit = service.settings.max_body_bytes
            return error_response(
                "request_too_large", f"the request body is larger than {limit} bytes", 413
            )
        if status == 500:  # an unexpected exception: quart has logged it with its traceback
            return error_response("internal_error", INTERNAL_MESSAGE, 500)
        code = {400: "invalid_input", 404: "not_found", 405: "method_not_allowed"}.get(
            status, "http_error"
        )
        response = error_response(code, exc.description or exc.name, status)
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            response.headers["Allow"] = ", ".join(exc.valid_methods)  # required on a 405
        return response

    def ask_request(conversation_id: str, body: AskBody, protocol: str) -> AskRequest:
        return AskRequest(
            conversation_id=conversation_id,
            owner=g.owner,
            protocol=protocol,
            request_id=g.request_id,
            client=client_address(request.remote_addr, request.headers.getlist("X-Forwarded-For"), service.settings),
            **body.model_dump(),
        )

    @app.post("/ask/<conversation_id>")
    @validate_request(AskBody)
    @document_response(AnswerBody, 200)
    @tag(["ask"])
    async def ask(conversation_id: str, data: AskBody) -> Response:
        """Ask and get the whole answer.

        The conversation is created by its first ask and remembered: each ask
        sends the system prompt, the most recent turns that fit the context
        window and the new prompt to the model, then stores the new turn.
        """
        with stopping.cut_at_grace_end():
            answer = await service.complete(ask_request(conversation_id, data, "http"))
            body = {"response": answer.text, **_end_data(answer.end)}
            return Response(json.dumps(body, ensure_ascii=False), mimetype="application/json")
        raise ShuttingDown("the server is shutting down")  # the grace ended first

    @app.post("/ask/<conversation_id>/stream")
    @validate_request(AskBody)
    @tag(["ask"])
    async def ask_stream(conversation_id: str, data: AskBody) -> Response:
        """Ask and receive the answer as Server-Sent Events.

        Events: ``delta`` (`{"text": …}`) for each piece of the answer, then
        exactly one ``end`` (`{"conversation_id", "model", "finish_reason",
        "usage"}`) or one ``error`` (`{"code", "message"}`). Errors that occur
        before the first piece (invalid input, prompt too long, upstream
        refused) are plain JSON error responses with their HTTP status.
        Closing the connection cancels the answer; the part already sent is
        stored with finish reason ``cancelled``.
        """
        events = service.ask(ask_request(conversation_id, data, "sse"))
        try:
            first = await stopping.next_event(events)
        except BaseException:
            await events.aclose()
            raise
        response = Response(_sse_body(first, events, stopping), mimetype="text/event-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        response.timeout = None
        return response

    @app.route("/ask/<path:conversation_id>", methods=["POST"])
    @hide
    async def ask_bad_id(conversation_id: str) -> Response:
        """Any other path below /ask/ holds a '/' and so names an invalid conversation id."""
        validate_conversation_id(conversation_id)
        raise NotFound(f"no route POST /ask/{conversation_id}")

    app.register_blueprint(conversation_routes(service))

    @app.get("/readyz")
    @document_response(HealthBody, 200)
    @tag(["operations"])
    async def readyz() -> Response:
        """Readiness: 200 while the conversation store answers, else 503 (not ready)."""
        if await service.ready():
            return Response('{"status": "ready"}', mimetype="application/json")
        return error_response("storage_unavailable", "the conversation store does not answer or takes no writes")

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


async def _sse_body(
    first: Delta | End, events: AsyncIterator[Delta | End], stopping: Stopping
) -> AsyncIterator[str]:
    """Encode chat events as SSE frames; a ChatError after the first frame becomes an ``error`` event.

    So does the end of the shutdown grace (``shutting_down``).
    """
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        try:
            event = first
            while True:
                if isinstance(event, Delta):
                    yield _sse("delta", {"text": event.text})
                else:
                    yield _sse("end", _end_data(event))
                    return
                event = await stopping.next_event(events)
        except ChatError as exc:
            yield _sse("error", {"code": exc.code, "message": exc.message})


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
