"""The one upstream client: streaming chat completions through the official ``openai`` SDK.

A single ``openai.AsyncOpenAI`` (and so a single connection pool) serves the
whole process; it runs on trio through anyio. Every call streams, also for
non-streaming asks, so cancellation and partial answers behave the same on
every path.

Resilience (the SDK's own retries are off, so that each one is seen):

- connection errors, 429 and 5xx are retried up to ``UPSTREAM_RETRIES`` times,
  only while opening the call, i.e. before the first token reached anyone;
  the wait is exponential with jitter, or the provider's ``Retry-After`` when
  it sends one (a wait longer than :data:`MAX_RETRY_AFTER` is not waited for:
  the client gets the rate-limit error at once);
- timeouts: ``UPSTREAM_CONNECT_TIMEOUT`` to connect, ``UPSTREAM_IDLE_TIMEOUT``
  between two pieces of the stream (and for the first one), and
  ``UPSTREAM_TIMEOUT`` for the whole call (checked as each piece arrives, so a
  trickling answer may overrun it by one idle period at most). A stalled
  provider becomes :class:`~easybackend.errors.UpstreamTimeout`, never a hung
  client.
"""

from __future__ import annotations

import dataclasses
import email.utils
import json
import logging
import random
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx2
import openai
import trio

from ..errors import UpstreamError, UpstreamTimeout, from_upstream
from ..metrics import Metrics
from ..settings import Settings
from .transport import LeanTransport

log = logging.getLogger("easybackend.upstream")

MAX_RETRY_AFTER = 30.0  # seconds: a provider asking to wait longer gets its error passed on
BACKOFF_BASE = 0.5
BACKOFF_CAP = 8.0


@dataclasses.dataclass(frozen=True, slots=True)
class Completion:
    """The last item of a stream: why it ended, and the provider's usage figures if it sent them."""

    finish_reason: str
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None


@dataclasses.dataclass(frozen=True, slots=True)
class UpstreamCall:
    """One chat-completion request."""

    messages: Sequence[dict[str, str]]
    model: str
    temperature: float
    max_tokens: int | None


class OpenAIUpstream:
    """Streams answers from an OpenAI-compatible endpoint."""

    def __init__(
        self, settings: Settings, metrics: Metrics, *, base_url: str | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        timeout = httpx2.Timeout(
            settings.upstream_timeout,
            connect=settings.upstream_connect_timeout,
            read=settings.upstream_idle_timeout,
        )
        self._client = openai.AsyncOpenAI(
            api_key=settings.openai_api_key or "demo",
            base_url=base_url or settings.openai_base_url,
            max_retries=0,
            timeout=timeout,
            http_client=openai.DefaultAsyncHttpxClient(
                timeout=timeout,
                transport=_transport_unless_proxied(),
                # for httpx's own transport (with a proxy); LeanTransport has no limit
                limits=httpx2.Limits(max_connections=None, max_keepalive_connections=256),
            ),
        )

    async def stream(self, call: UpstreamCall) -> AsyncIterator[str | Completion]:
        """Yield the answer's text as it arrives, then one :class:`Completion`.

        Each item is the text of the pieces that arrived together (one read
        of the body): a provider streaming faster than it is read gives fewer,
        longer items, which costs every transport less per piece.

        Raises :class:`~easybackend.errors.UpstreamError` (never an SDK
        exception). On cancellation, or when the consumer closes the
        generator early, the HTTP response is closed at once, which tells
        the provider to stop generating.

        The SDK sends the request and maps error statuses; the event stream
        itself is read as JSON lines here, which costs a fraction of building
        the SDK's chunk objects.
        """
        deadline = trio.current_time() + self.settings.upstream_timeout
        response = await self._open(call, deadline)
        batches = _line_batches(response)
        answer = _Answer()
        try:
            while (text := await self._next_text(batches, answer, deadline)) is not None:
                yield text
            with trio.move_on_after(1):  # read the body to its end: the connection is reused
                async for _ in batches:
                    pass
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await batches.aclose()  # type: ignore[attr-defined]
                await response.aclose()
        if answer.finish_reason is None:
            raise self._failed(
                UpstreamError("the model provider ended the answer without a finish reason")
            )
        usage = answer.usage
        yield Completion(
            finish_reason=answer.finish_reason,
            model=answer.model,
            prompt_tokens=usage.get("prompt_tokens") if usage else None,
            completion_tokens=usage.get("completion_tokens") if usage else None,
        )

    async def _open(self, call: UpstreamCall, deadline: float) -> httpx2.Response:
        """Start the streaming call, retrying transient failures (see the module docstring)."""
        body: dict[str, object] = {
            "model": call.model,
            "messages": call.messages,
            "temperature": call.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if call.max_tokens is not None:
            body["max_tokens"] = call.max_tokens
        for attempt in range(self.settings.upstream_retries + 1):
            try:
                with trio.fail_at(deadline):
                    # The SDK's generic POST (its documented way to a raw response): the same
                    # request, headers, key and error mapping as chat.completions.create, minus
                    # the re-validation of parameters built here, which grows with the history.
                    return await self._client.post(
                        "/chat/completions",
                        cast_to=httpx2.Response,
                        body=body,
                        stream=True,
                        stream_cls=openai.AsyncStream[httpx2.Response],
                    )
            except trio.TooSlowError:
                raise self._failed(
                    UpstreamTimeout("the model provider did not answer in time")
                ) from None
            except Exception as exc:
                error = self._failed(from_upstream(exc))
                wait = _retry_wait(exc, attempt)
                last_attempt = attempt == self.settings.upstream_retries
                if wait is None or last_attempt or trio.current_time() + wait >= deadline:
                    raise error from exc
                log.warning(
                    "upstream call failed (%s); retry %d in %.2fs", error.code, attempt + 1, wait
                )
                self.metrics.upstream_retries.inc()
                await trio.sleep(wait)
        raise AssertionError("unreachable")

    async def _next_text(
        self, batches: AsyncIterator[list[bytes]], answer: _Answer, deadline: float
    ) -> str | None:
        """The text of the next lines that carry some, or None at the end of the answer.

        Raises UpstreamError on a broken stream, an error event or a stall. The
        idle timeout is the HTTP client's read timeout (no cancel scope per
        read: they cost more than the piece); the total timeout is checked
        after every read, so an answer may overrun it by at most one idle period.
        """
        idle = self.settings.upstream_idle_timeout
        try:
            while not answer.done:
                lines = await anext(batches, None)
                if lines is None:
                    return None
                if trio.current_time() >= deadline:
                    raise UpstreamTimeout(
                        f"the model provider did not finish within {self.settings.upstream_timeout:g} seconds"
                    )
                if text := answer.feed(lines):
                    return text
            return None
        except UpstreamError as exc:
            raise self._failed(exc) from None
        except ValueError as exc:
            raise self._failed(UpstreamError("the model provider sent a malformed event")) from exc
        except httpx2.TimeoutException as exc:
            raise self._failed(
                UpstreamTimeout(f"the model provider sent nothing for {idle:g} seconds")
            ) from exc
        except httpx2.HTTPError as exc:
            raise self._failed(UpstreamError("the model provider broke off the answer")) from exc

    def _failed(self, error: UpstreamError) -> UpstreamError:
        self.metrics.upstream_errors.labels(error.code).inc()
        return error

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.close()


class _Answer:
    """What the event stream has said so far: the end, the model, usage and finish reason."""

    __slots__ = ("done", "finish_reason", "model", "usage")

    def __init__(self) -> None:
        self.done = False
        self.finish_reason: str | None = None
        self.model: str | None = None
        self.usage: dict[str, Any] | None = None

    def feed(self, lines: list[bytes]) -> str:
        """Take in some lines of the event stream; returns the answer text they carry.

        Raises UpstreamError on an error event, ValueError on a malformed one.
        """
        pieces = []
        for line in lines:
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, event names
            data = line[5:].strip()
            if data == b"[DONE]":
                self.done = True
                break
            chunk = json.loads(data)
            if not isinstance(chunk, dict) or "error" in chunk:
                raise UpstreamError(
                    "the model provider reported an error in the middle of the answer"
                )
            self.model = chunk.get("model") or self.model
            self.usage = chunk.get("usage") or self.usage
            for choice in (chunk.get("choices") or [])[:1]:
                if content := (choice.get("delta") or {}).get("content"):
                    pieces.append(content)
                self.finish_reason = choice.get("finish_reason") or self.finish_reason
        return "".join(pieces)


async def _line_batches(response: httpx2.Response) -> AsyncIterator[list[bytes]]:
    """The body's complete lines, one list per read, as bytes: no text decoding.

    The raw body when it is not content-encoded (the usual case for event
    streams), else httpx's decoded bytes. Lines are split at ``\n`` (a ``\r``
    before it stays: the parser strips it); a last line without one comes at
    the end.
    """
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    parts = response.aiter_raw() if encoding in ("", "identity") else response.aiter_bytes()
    rest = b""
    async for part in parts:
        lines = (rest + part).split(b"\n")
        rest = lines.pop()
        if lines:
            yield lines
    if rest:
        yield [rest]


def _transport_unless_proxied() -> LeanTransport | None:
    """The lean transport, or None (httpx's own) when the environment names a proxy.

    httpx honours ``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY`` and ``NO_PROXY``
    (read through ``urllib.request.getproxies``) only with its own transport,
    so a proxied deployment keeps it.
    """
    proxies = urllib.request.getproxies()
    return None if any(scheme != "no" for scheme in proxies) else LeanTransport()


def _retry_wait(exc: Exception, attempt: int) -> float | None:
    """Seconds to wait before retrying after ``exc``, or None when it is not worth retrying."""
    if isinstance(exc, openai.APIConnectionError):  # includes timeouts
        return _backoff(attempt)
    if not isinstance(exc, openai.APIStatusError):
        return None
    status = exc.status_code
    if status != 429 and status < 500:
        return None
    retry_after = _retry_after(exc.response.headers)
    if retry_after is None:
        return _backoff(attempt)
    return retry_after if retry_after <= MAX_RETRY_AFTER else None


def _backoff(attempt: int) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))


def _retry_after(headers: httpx2.Headers) -> float | None:
    """The provider's ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date), if any."""
    if (milliseconds := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(milliseconds) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())
