"""The OpenAPI document: quart-schema's, made exact where routes alone cannot say it.

- ``conversation_id``, ``turn_id`` and ``key_name`` path parameters carry their pattern and length;
- request bodies are marked required, but a regenerate's (it is optional);
- every operation lists the error responses it can give, all with the
  ``ErrorBody`` schema, so clients (and schema-based fuzzers) know them;
- the OpenAI-compatible routes under ``/v1`` list theirs with OpenAI's error
  shape (``OpenAIErrorBody``, :data:`OPENAI_ERRORS`), their streamed answers
  as ``text/event-stream``, and the ``X-Conversation-Id`` header.
"""

from __future__ import annotations

from typing import Any

import pydantic
from quart_schema import OpenAPIProvider
from werkzeug.routing import BaseConverter

ID_PATTERN = r"^[A-Za-z0-9_\-.:]{1,128}$"
TURN_ID_PATTERN = r"^[A-Za-z0-9_\-]{1,64}$"

ERROR_DESCRIPTIONS = {
    "400": "Invalid input (bad conversation id, bad field, body not a JSON object)",
    "401": "Missing or wrong API key (only when API_KEYS is set or keys are stored); on /admin"
    " routes a missing or wrong ADMIN_KEY",
    "403": "The model is not in MODELS or not among the key's models; on /admin routes an"
    " ordinary API key instead of ADMIN_KEY",
    "404": "Unknown conversation, or unknown turn (parent_id, turn_id); on /admin routes the"
    " admin API is off (ADMIN_KEY unset) or no key has that name",
    "409": "A key of that name exists, was revoked, or is one of API_KEYS (or is revoked: it"
    " cannot change)",
    "413": "Prompt too long for the context window, or body larger than MAX_BODY_BYTES",
    "429": "The model provider is rate limiting, this key has too many answers in progress, or"
    " it is over its limits (rate_limited, budget_exhausted: see Retry-After)",
    "502": "The model provider failed, could not be reached, or rejected the server's key",
    "503": "Storage unavailable or the server is shutting down",
    "504": "The model provider timed out",
}
USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        name: {"type": "integer"} for name in ("prompt_tokens", "completion_tokens", "total_tokens")
    },
}
# The data of each SSE event: `start`, `delta`, `end` or `error`.
SSE_EVENT_DATA = {
    "anyOf": [
        {
            "title": "start",
            "type": "object",
            "required": ["conversation_id", "turn_id"],
            "properties": {"conversation_id": {"type": "string"}, "turn_id": {"type": "string"}},
        },
        {
            "title": "delta",
            "type": "object",
            "required": ["text"],
            "properties": {"text": {"type": "string"}},
        },
        {
            "title": "end",
            "type": "object",
            "required": ["conversation_id", "model", "finish_reason", "usage", "turn_id", "turn"],
            "properties": {
                "conversation_id": {"type": "string"},
                "model": {"type": "string"},
                "finish_reason": {"type": "string"},
                "usage": USAGE,
                "turn_id": {"type": "string"},
                "turn": {"type": "integer"},
            },
        },
        {
            "title": "ended",
            "description": "an answer's end said again, unnumbered: it had ended with nothing"
            " stored after the event named",
            "type": "object",
            "required": ["conversation_id", "turn_id", "finish_reason"],
            "properties": {
                "conversation_id": {"type": "string"},
                "turn_id": {"type": "string"},
                "finish_reason": {"type": "string"},
            },
        },
        {
            "title": "error",
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        },
    ]
}
# One Server-Sent Event: its number (all but an error), its name and its JSON data.
SSE_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "id": {"type": "string", "pattern": "^[1-9][0-9]*$"},
        "event": {"enum": ["start", "delta", "end", "error"]},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": SSE_EVENT_DATA,
        },
    },
}
ASK_ERRORS = ("400", "401", "403", "404", "413", "429", "502", "503", "504")
ADMIN_ERRORS = ("400", "401", "403", "404", "409", "413", "503")
CONVERSATION_ERRORS = ("400", "401", "404", "413", "503")
LIST_ERRORS = ("400", "401", "503")
SETTINGS_ERRORS = ("400", "401", "403", "404", "413", "503")  # 403: a model outside MODELS
OPEN_PATHS = ("/healthz", "/readyz", "/docs", "/openapi.json", "/metrics")
# The error statuses of each /v1 route (a relayed request may get the provider's 400, 404, 409,
# 413 or 422 back; see errors.from_relayed_upstream). Routes not listed give OPENAI_DEFAULT.
OPENAI_ERRORS = {
    "/v1/models": ("401",),
    "/v1/models/{model_id}": ("401", "404"),
    "/v1/chat/completions": (
        "400",
        "401",
        "403",
        "404",
        "409",
        "413",
        "422",
        "429",
        "502",
        "503",
        "504",
    ),  # fmt: skip
    "/v1/responses": ("400", "401", "403", "404", "413", "429", "502", "503", "504"),
    "/v1/responses/{response_id}/cancel": ("400", "401", "404", "413", "503"),
    "/v1/conversations": ("400", "401", "413", "503"),
    "/v1/conversations/{conversation_id}": ("400", "401", "404", "413", "503"),
    "/v1/conversations/{conversation_id}/items": ("400", "401", "404", "413", "503"),
}
OPENAI_DEFAULT = ("400", "401", "404", "503")
OPENAI_ERROR_DESCRIPTIONS = {
    **ERROR_DESCRIPTIONS,
    "400": "Invalid request (bad field, a part a conversation cannot store, prompt too long),"
    " or the model provider refused the relayed request",
    "404": "Unknown model, conversation, turn or route; or the provider's 404 (relay)",
    "409": "The model provider refused the relayed request with 409",
    "413": "Body larger than MAX_BODY_BYTES, or the provider's 413 (relay)",
    "422": "The model provider refused the relayed request with 422",
}
# A streamed chat completion (stream: true), one Server-Sent Event each: data: events holding a
# chat.completion.chunk object, then data: [DONE] (or one data: event holding an error object).
CHAT_COMPLETION_STREAM = {
    "schema": {
        "type": "object",
        "required": ["data"],
        "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
    }
}
# A streamed response (stream: true): OpenAI's Responses events, each an SSE event named by its
# type, from response.created to response.completed (or .incomplete, .failed).
RESPONSE_STREAM = {"schema": {"type": "string"}}
CONVERSATION_HEADER = {
    "name": "X-Conversation-Id",
    "in": "header",
    "required": False,
    "description": "Conversation mode (as the body field conversation): the server keeps the"
    " history and stores the turn",
    "schema": {"type": "string", "pattern": ID_PATTERN, "minLength": 1, "maxLength": 128},
}


def error_responses_for(path: str) -> tuple[str, ...]:
    if path == "/v1" or path.startswith("/v1/"):
        return OPENAI_ERRORS.get(path, OPENAI_DEFAULT)
    if path == "/readyz":
        return ("503",)
    if path in OPEN_PATHS:
        return ()
    if path.startswith("/ask/") or "/regenerate" in path or path.endswith("/compact"):
        return ASK_ERRORS
    if path.endswith("/settings"):
        return SETTINGS_ERRORS
    if path.startswith("/conversations/"):
        return CONVERSATION_ERRORS
    if path.startswith("/admin/"):
        return ADMIN_ERRORS
    return LIST_ERRORS


class UsageBody(pydantic.BaseModel):
    """Tokens: prompt, completion and their sum."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorDetail(pydantic.BaseModel):
    code: str = pydantic.Field(description="Stable machine-readable code, e.g. prompt_too_long")
    message: str = pydantic.Field(description="What went wrong, for humans")


class ErrorBody(pydantic.BaseModel):
    """Every error response."""

    error: ErrorDetail


class OpenAIErrorDetail(pydantic.BaseModel):
    message: str = pydantic.Field(description="What went wrong, for humans")
    type: str = pydantic.Field(description="OpenAI's kind of error, e.g. invalid_request_error")
    param: str | None = pydantic.Field(description="The request field at fault, if any")
    code: str = pydantic.Field(description="EasyBackend's stable code, e.g. invalid_input")


class OpenAIErrorBody(pydantic.BaseModel):
    """Every error under /v1, in OpenAI's shape."""

    error: OpenAIErrorDetail


class EasyBackendOpenAPI(OpenAPIProvider):
    """quart-schema's provider with the refinements listed in the module docstring."""

    def build_path_parameter(self, name: str, converter: BaseConverter) -> dict[str, Any]:
        parameter = super().build_path_parameter(name, converter)
        if name == "conversation_id":
            parameter["schema"] = {
                "type": "string",
                "pattern": ID_PATTERN,
                "minLength": 1,
                "maxLength": 128,
            }
        elif name == "key_name":
            parameter["schema"] = {
                "type": "string",
                "pattern": r"^[A-Za-z0-9_.\-]{1,64}$",
                "minLength": 1,
                "maxLength": 64,
            }
        elif name == "turn_id":
            parameter["schema"] = {
                "type": "string",
                "pattern": TURN_ID_PATTERN,
                "minLength": 1,
                "maxLength": 64,
            }
        return parameter

    def build_request_body(self, model: Any, source: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        body, definitions = super().build_request_body(model, source)
        body["required"] = True
        return body, definitions

    def schema(self) -> dict[str, Any]:
        spec = super().schema()
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        for body in (ErrorBody, OpenAIErrorBody):
            error_schema = body.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(error_schema.pop("$defs", {}))
            schemas[body.__name__] = error_schema
        for path, operations in spec.get("paths", {}).items():
            openai = path.startswith("/v1/")
            reference = {
                "$ref": f"#/components/schemas/{'OpenAIErrorBody' if openai else 'ErrorBody'}"
            }
            descriptions = OPENAI_ERROR_DESCRIPTIONS if openai else ERROR_DESCRIPTIONS
            for method, operation in operations.items():
                responses = operation.setdefault("responses", {})
                if path == "/v1/chat/completions":
                    responses[200]["content"]["text/event-stream"] = CHAT_COMPLETION_STREAM
                    responses[200]["description"] = (
                        "A chat.completion; with stream: true, data: events of"
                        " chat.completion.chunk objects, then data: [DONE]"
                    )
                    operation.setdefault("parameters", []).append(CONVERSATION_HEADER)
                if path == "/v1/responses" and method == "post":
                    responses[200]["content"]["text/event-stream"] = RESPONSE_STREAM
                    responses[200]["description"] = (
                        "A response; with stream: true, Server-Sent Events from"
                        " response.created to response.completed"
                    )
                if path.endswith("/stream") and 200 not in responses:
                    responses[200] = {
                        "description": "Server-Sent Events, numbered by their id: one start,"
                        " delta events, then one end or one error event",
                        "content": {"text/event-stream": {"schema": SSE_EVENT}},
                    }
                if path == "/ask/{conversation_id}" and method == "post":
                    responses[202] = {
                        "description": "background: the answer goes on; poll or follow its turn",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                if path == "/metrics":
                    responses[200] = {
                        "description": "Prometheus metrics in the text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                if (
                    "/regenerate" in path or path.endswith("/compact")
                ) and "requestBody" in operation:
                    operation["requestBody"]["required"] = False
                if method == "delete" and path == "/conversations/{conversation_id}":
                    responses.pop(200, None)
                    responses[204] = {"description": "Done; no content"}
                for status in error_responses_for(path):
                    responses[int(status)] = {
                        "description": descriptions[status],
                        "content": {"application/json": {"schema": reference}},
                    }
        return spec
