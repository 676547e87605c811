"""Errors under ``/v1`` in OpenAI's shape, so that OpenAI's SDKs raise their own typed exceptions.

Every error is ``{"error": {"message", "type", "param", "code"}}``: ``code`` is
the ChatError's own code (the one every protocol sends), ``type`` is OpenAI's
word for the kind of error and ``param`` the request field at fault (or
null). The status comes from :data:`STATUS_BY_ERROR`, keyed by class like the
other transports' tables (a lookup walks the bases:
:func:`easybackend.errors.wire_form`), and is what the SDKs map to their
exceptions: 400 ``BadRequestError``, 401 ``AuthenticationError``, 403
``PermissionDeniedError``, 404 ``NotFoundError``, 409 ``ConflictError``, 422
``UnprocessableEntityError``, 429 ``RateLimitError``, 5xx
``InternalServerError``. A refusal by a key's limits (``rate_limited``,
``budget_exhausted``) also carries ``Retry-After`` (set by the HTTP app), and
so does ``upstream_unavailable`` (503) when every route of the model is
cooling down: the SDKs wait that long before their own retry. A refusal the
provider gave a relayed request (:class:`~easybackend.errors.UpstreamRejected`)
keeps the provider's status.

An error after a streamed answer has begun is one ``data:`` event holding the
same object (:func:`error_event`), which the SDKs raise as ``APIError``.
"""

from __future__ import annotations

import json

from quart import Response

from ... import errors
from ...errors import ChatError, wire_form

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"

# The status and OpenAI error type of every error class.
STATUS_BY_ERROR: dict[type[ChatError], tuple[int, str]] = {
    errors.InvalidInput: (400, INVALID_REQUEST),
    errors.HTTPError: (400, INVALID_REQUEST),  # the HTTP layer's own status is kept
    errors.PromptTooLong: (400, INVALID_REQUEST),  # as OpenAI answers a context too long
    errors.UpstreamRejected: (400, INVALID_REQUEST),  # the provider's status is kept
    errors.Unauthenticated: (401, "authentication_error"),
    errors.Forbidden: (403, "permission_error"),
    errors.ModelNotAllowed: (403, "permission_error"),
    errors.KeyConflict: (409, INVALID_REQUEST),
    errors.NotFound: (404, INVALID_REQUEST),
    errors.MethodNotAllowed: (405, INVALID_REQUEST),
    errors.RequestTooLarge: (413, INVALID_REQUEST),
    errors.TooManyRequests: (429, "rate_limit_error"),
    errors.RateLimited: (429, "rate_limit_error"),  # with Retry-After
    errors.BudgetExhausted: (429, "insufficient_quota"),  # OpenAI's type for a spent quota
    errors.UpstreamRateLimited: (429, "rate_limit_error"),
    errors.InternalError: (500, SERVER_ERROR),
    errors.UpstreamError: (502, SERVER_ERROR),
    errors.UpstreamAuthFailed: (502, SERVER_ERROR),
    errors.UpstreamUnavailable: (503, SERVER_ERROR),  # with Retry-After when a route cools down
    errors.StorageUnavailable: (503, "service_unavailable_error"),
    errors.ShuttingDown: (503, "service_unavailable_error"),
    errors.UpstreamTimeout: (504, SERVER_ERROR),
}


def status_of(error: ChatError) -> int:
    """The HTTP status of ``error`` under /v1 (the provider's, for a relayed refusal)."""
    if isinstance(error, errors.UpstreamRejected):
        return error.status
    return wire_form(error, STATUS_BY_ERROR)[0]


def error_object(error: ChatError) -> dict[str, dict[str, object]]:
    """``{"error": {"message", "type", "param", "code"}}`` for ``error``."""
    return {
        "error": {
            "message": error.message,
            "type": wire_form(error, STATUS_BY_ERROR)[1],
            "param": error.param,
            "code": error.code,
        }
    }


def error_response(error: ChatError, status: int | None = None) -> Response:
    """The JSON error response for ``error``: its status (see :func:`status_of`) unless given."""
    body = json.dumps(error_object(error), ensure_ascii=False)
    return Response(body, status=status or status_of(error), mimetype="application/json")


def error_event(error: ChatError) -> bytes:
    """The ``data:`` event that ends a streamed answer with ``error`` (no ``[DONE]`` follows)."""
    return b"data: %s\n\n" % json.dumps(error_object(error), ensure_ascii=False).encode()
