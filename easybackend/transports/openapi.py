"""The OpenAPI document: quart-schema's, made exact where routes alone cannot say it.

- ``conversation_id`` and ``turn_id`` path parameters carry the id's pattern and length;
- request bodies are marked required, but a regenerate's (it is optional);
- every operation lists the error responses it can give, all with the
  ``ErrorBody`` schema, so clients (and schema-based fuzzers) know them.
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
    "401": "Missing or wrong API key (only when API_KEYS is set)",
    "404": "Unknown conversation, or unknown turn (parent_id, turn_id)",
    "413": "Prompt too long for the context window, or body larger than MAX_BODY_BYTES",
    "429": "The model provider is rate limiting, or this key has too many answers in progress",
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
# The data of each SSE event: `delta`, `end` or `error`.
SSE_EVENT_DATA = {
    "anyOf": [
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
            "title": "error",
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        },
    ]
}
# One Server-Sent Event: its name and its JSON data.
SSE_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"enum": ["delta", "end", "error"]},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": SSE_EVENT_DATA,
        },
    },
}
ASK_ERRORS = ("400", "401", "404", "413", "429", "502", "503", "504")
CONVERSATION_ERRORS = ("400", "401", "404", "413", "503")
LIST_ERRORS = ("400", "401", "503")
OPEN_PATHS = ("/healthz", "/readyz", "/docs", "/openapi.json", "/metrics")


def error_responses_for(path: str) -> tuple[str, ...]:
    if path == "/readyz":
        return ("503",)
    if path in OPEN_PATHS:
        return ()
    if path.startswith("/ask/") or "/regenerate" in path:
        return ASK_ERRORS
    if path.startswith("/conversations/"):
        return CONVERSATION_ERRORS
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
        error_schema = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(error_schema.pop("$defs", {}))
        schemas["ErrorBody"] = error_schema
        reference = {"$ref": "#/components/schemas/ErrorBody"}
        for path, operations in spec.get("paths", {}).items():
            for method, operation in operations.items():
                responses = operation.setdefault("responses", {})
                if path.endswith("/stream") and 200 not in responses:
                    responses[200] = {
                        "description": "Server-Sent Events: delta events, then one end or one error event",
                        "content": {"text/event-stream": {"schema": SSE_EVENT}},
                    }
                if path == "/metrics":
                    responses[200] = {
                        "description": "Prometheus metrics in the text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                if "/regenerate" in path and "requestBody" in operation:
                    operation["requestBody"]["required"] = False
                if method == "delete" and path == "/conversations/{conversation_id}":
                    responses.pop(200, None)
                    responses[204] = {"description": "Done; no content"}
                for status in error_responses_for(path):
                    responses[int(status)] = {
                        "description": ERROR_DESCRIPTIONS[status],
                        "content": {"application/json": {"schema": reference}},
                    }
        return spec
