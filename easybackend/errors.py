"""The one error vocabulary of EasyBackend.

Every failure a client can see is a :class:`ChatError` subclass with a stable
``code``. Transports never invent their own errors: each keeps one table that
maps a ``code`` to its wire form (an HTTP status, a gRPC status code, a
WebSocket reply). :func:`from_upstream` is the single place where exceptions
of the ``openai`` SDK are translated; it never copies an upstream error body
verbatim, so a provider that echoes a key or a prompt cannot leak it.
"""

from __future__ import annotations

import openai


class ChatError(Exception):
    """Base class: an error with a stable machine-readable ``code``."""

    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ChatError):
    """The request is malformed: a bad conversation id, a missing prompt, a bad field."""

    code = "invalid_input"


class PromptTooLong(ChatError):
    """The prompt does not fit into the context budget even without any history."""

    code = "prompt_too_long"


class Unauthenticated(ChatError):
    """A backend API key is required and was missing or wrong."""

    code = "unauthenticated"


class TooManyRequests(ChatError):
    """The key already has as many answers in progress as MAX_STREAMS_PER_KEY allows."""

    code = "too_many_requests"


class NotFound(ChatError):
    """A read or management operation named a conversation that does not exist."""

    code = "not_found"


class ShuttingDown(ChatError):
    """The server is stopping and accepts no new asks."""

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
