"""The one error vocabulary of EasyBackend.

Every failure a client can see is a :class:`ChatError` subclass with a stable
``code``, and every ``code`` a client can receive is one of these classes.
Transports never invent their own: each keeps one table keyed by class that
maps an error to its wire form (``transports.http.STATUS_BY_ERROR``,
``transports.grpc.STATUS_BY_ERROR``; a WebSocket reply carries the class's
``code``). A lookup walks the class's bases (:func:`wire_form`), so a subclass
missing from a table gets its parent's entry; a test keeps every class in
every table.

:func:`from_upstream` is the single place where exceptions of the ``openai``
SDK are translated; it never copies an upstream error body verbatim, so a
provider that echoes a key or a prompt cannot leak it. A request the /v1
relay forwarded as the client sent it is the exception
(:func:`from_relayed_upstream`): the provider's refusal of it is quoted to
that client, the upstream key blanked. :func:`unexpected` is the one
catch-all for exceptions that are not ChatErrors: it logs the traceback once
and gives the client an :class:`InternalError` that tells nothing more.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from typing import TypeVar

import openai

log = logging.getLogger("easybackend.errors")

INTERNAL_MESSAGE = "internal server error"

Wire = TypeVar("Wire")


class ChatError(Exception):
    """Base class: an error with a stable machine-readable ``code``."""

    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param  # the request field at fault, when there is one (OpenAI's ``param``)


class InternalError(ChatError):
    """The server failed in a way it did not expect (a bug); its log has the traceback."""

    code = "internal_error"


class InvalidInput(ChatError):
    """The request is malformed: a bad conversation id, a missing prompt, a bad field."""

    code = "invalid_input"


class PromptTooLong(ChatError):
    """The prompt does not fit into the context budget even without any history."""

    code = "prompt_too_long"


class Unauthenticated(ChatError):
    """A backend API key is required and was missing or wrong."""

    code = "unauthenticated"


class Forbidden(ChatError):
    """An admin route was called with an ordinary API key instead of ADMIN_KEY."""

    code = "forbidden"


class ModelNotAllowed(ChatError):
    """The ask names a model outside MODELS or outside its key's own list of models."""

    code = "model_not_allowed"


class KeyConflict(ChatError):
    """A stored key by that name exists already, or was revoked (names are never reused)."""

    code = "key_conflict"


class TooManyRequests(ChatError):
    """The key (or address) has MAX_STREAMS_PER_KEY answers in progress, or a socket too many asks queued."""

    code = "too_many_requests"


class RateLimited(ChatError):
    """The key, or its end user, is over its requests or tokens per minute (rpm, tpm, USER_RPM)."""

    code = "rate_limited"

    def __init__(
        self, message: str, *, retry_after: float, limit: str = "rpm", param: str | None = None
    ) -> None:
        super().__init__(message, param=param)
        self.limit = limit  # which limit refused: rpm, tpm, user_rpm, tokens_per_day, …
        self.retry_after = retry_after  # seconds until an ask may be taken again

    @property
    def retry_after_seconds(self) -> int:
        """``retry_after`` as the whole seconds a ``Retry-After`` header gives (at least 1)."""
        return max(1, math.ceil(self.retry_after))


class BudgetExhausted(RateLimited):
    """The key has used its tokens_per_day or tokens_per_month (UTC): retry when the period turns."""

    code = "budget_exhausted"


class NotFound(ChatError):
    """A read or management operation named a conversation (or a route) that does not exist."""

    code = "not_found"


class RequestTooLarge(ChatError):
    """The request body or message is larger than MAX_BODY_BYTES."""

    code = "request_too_large"


class MethodNotAllowed(ChatError):
    """The route or service exists but not with this method (HTTP 405, gRPC UNIMPLEMENTED)."""

    code = "method_not_allowed"


class HTTPError(ChatError):
    """The HTTP layer refused the request for a reason of its own; its status is kept."""

    code = "http_error"


class ShuttingDown(ChatError):
    """The server is stopping: it accepts no new asks, and cuts those left when the grace ends."""

    code = "shutting_down"


class StorageUnavailable(ChatError):
    """The conversation store could not be read or written."""

    code = "storage_unavailable"


class UpstreamError(ChatError):
    """The model provider failed or answered with an error."""

    code = "upstream_error"


class UpstreamRateLimited(UpstreamError):
    """The model provider refused the call with 429 (rate limit or quota)."""

    code = "upstream_rate_limited"


class UpstreamTimeout(UpstreamError):
    """The model provider did not answer, or stopped sending, within the time allowed."""

    code = "upstream_timeout"


class UpstreamAuthFailed(UpstreamError):
    """The model provider rejected the upstream API key (a server misconfiguration)."""

    code = "upstream_auth_failed"


class UpstreamUnavailable(UpstreamError):
    """The model provider could not be reached at all."""

    code = "upstream_unavailable"

    def __init__(
        self, message: str, *, retry_after: float | None = None, param: str | None = None
    ) -> None:
        super().__init__(message, param=param)
        self.retry_after = retry_after  # seconds until the soonest upstream may answer, if known

    @property
    def retry_after_seconds(self) -> int:
        """``retry_after`` as whole seconds for a ``Retry-After`` header (at least 1)."""
        return max(1, math.ceil(self.retry_after or 0))


class UpstreamRejected(UpstreamError):
    """The model provider refused a relayed /v1 request as invalid (HTTP 4xx); /v1 keeps its status."""

    code = "upstream_rejected"

    def __init__(self, message: str, *, status: int = 400, param: str | None = None) -> None:
        super().__init__(message, param=param)  # param: the field the provider named, if any
        self.status = status  # the provider's: 400, 404, 409, 413, 422, …


def from_upstream(exc: BaseException) -> UpstreamError:
    """Translate an exception raised by the ``openai`` SDK into an :class:`UpstreamError`.

    The message says what happened in words of our own; the provider's error
    body is reduced to its status code so that nothing it echoes reaches a client.
    """
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, openai.APITimeoutError):
        return UpstreamTimeout("the model provider timed out")
    if isinstance(exc, openai.APIConnectionError):
        return UpstreamUnavailable("the model provider could not be reached")
    if isinstance(exc, openai.RateLimitError):
        return UpstreamRateLimited("the model provider is rate limiting requests; retry later")
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return UpstreamAuthFailed("the model provider rejected the server's upstream API key")
    if isinstance(exc, openai.APIStatusError):
        return UpstreamError(f"the model provider answered with HTTP {exc.status_code}")
    if isinstance(exc, openai.APIError):
        return UpstreamError("the model provider's answer was broken off or malformed")
    return UpstreamError(f"the call to the model provider failed ({type(exc).__name__})")


# A relayed refusal quotes at most this much of the provider's message.
MAX_QUOTED_MESSAGE = 500
# The provider's statuses that say a relayed request is invalid: passed on to its client.
RELAYED_STATUSES = frozenset({400, 404, 409, 413, 422})
_UNPRINTABLE = re.compile(r"[^\t\n\x20-\x7e\xa0-\ud7ff\ue000-\U0010ffff]")


def from_relayed_upstream(exc: BaseException, *, secret: str | None) -> UpstreamError:
    """:func:`from_upstream` for a relayed request (the client's own body, sent as it came).

    The provider's refusal of such a request as invalid (a status of
    RELAYED_STATUSES) is the client's to see: an :class:`UpstreamRejected`
    with that status, the request field it named and its message quoted (at
    most MAX_QUOTED_MESSAGE characters, unprintable ones dropped, ``secret`` —
    the upstream key — blanked out wherever it appears). Anything else (401
    and 403: the server's key; 402: the server's account; 429, 5xx…) is
    :func:`from_upstream`'s.
    """
    if not isinstance(exc, openai.APIStatusError) or exc.status_code not in RELAYED_STATUSES:
        return from_upstream(exc)
    status = exc.status_code
    body = exc.body if isinstance(exc.body, dict) else {}
    said = body.get("message")
    param = body.get("param")
    quoted = _quoted(said, secret) if isinstance(said, str) else ""
    message = f"the model provider refused the request (HTTP {status})"
    named = _quoted(param, secret)[:64] if isinstance(param, str) else ""
    return UpstreamRejected(
        f"{message}: {quoted}" if quoted else message, status=status, param=named or None
    )


def _quoted(text: str, secret: str | None) -> str:
    """``text`` fit to quote to a client: no ``secret``, no unprintable characters, not too long."""
    if secret:
        text = text.replace(secret, "***")
    text = _UNPRINTABLE.sub("", text).strip()
    if len(text) > MAX_QUOTED_MESSAGE:
        text = text[: MAX_QUOTED_MESSAGE - 1] + "…"
    return text


def unexpected(exc: BaseException, where: str) -> InternalError:
    """The one catch-all: log ``exc`` with its traceback once, return the client's InternalError.

    ``where`` says what was being done (``"answering a WebSocket ask"``). The
    returned error's message tells the client nothing about the failure.
    """
    log.error("%s failed", where, exc_info=(type(exc), exc, exc.__traceback__))
    return InternalError(INTERNAL_MESSAGE)


def every_error_class() -> list[type[ChatError]]:
    """Every ChatError subclass defined here, parents before children."""
    found: list[type[ChatError]] = []
    pending: list[type[ChatError]] = [ChatError]
    while pending:
        cls = pending.pop(0)
        for sub in cls.__subclasses__():
            if sub.__module__ == __name__ and sub not in found:
                found.append(sub)
                pending.append(sub)
    return found


def wire_form(error: ChatError | type[ChatError], table: Mapping[type[ChatError], Wire]) -> Wire:
    """``table``'s entry for the error's class, or for its nearest base in the table.

    Every table holds :class:`InternalError`, the entry of an error whose class
    (a bare ChatError) has none.
    """
    cls = error if isinstance(error, type) else type(error)
    for base in cls.__mro__:
        if base in table:
            return table[base]  # type: ignore[index]
    return table[InternalError]
