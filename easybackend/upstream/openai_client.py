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
  between two reads of the stream (and for the first one) and between two
  complete lines of it, and ``UPSTREAM_TIMEOUT`` for the whole call (checked
  after every read, so a trickling answer may overrun it by one idle period at
  most). A stalled provider becomes :class:`~easybackend.errors.UpstreamTimeout`,
  never a hung client.

What the provider sends is checked before anything uses it (see
:class:`_Answer`): one line of the event stream may hold at most
:func:`max_line_bytes` bytes; malformed JSON, a ``choices`` entry, ``delta``,
``content`` or ``finish_reason`` of the wrong type is
:class:`~easybackend.errors.UpstreamError`; a ``model`` or ``usage`` that is
not a short printable name or whole numbers in ``0..MAX_REPORTED_TOKENS`` is
ignored (the requested model and our own token counts are used instead); NUL
and lone surrogates in the text become U+FFFD. Redirects are followed only
within the provider's origin (scheme, host and port): one to another origin
is an UpstreamError naming that origin, since following it would re-send the
prompt and the history to someone else.
"""

from __future__ import annotations

import dataclasses
import email.utils
import functools
import importlib.util
import json
import logging
import math
import random
import re
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx2
import openai
import trio

from ..errors import (
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    from_relayed_upstream,
    from_upstream,
)
from ..metrics import Metrics
from ..settings import ConfigError, Settings
from .config import UpstreamConfig, shown_key
from .transport import LeanTransport

log = logging.getLogger("easybackend.upstream")

MAX_RETRY_AFTER = 30.0  # seconds: a provider asking to wait longer gets its error passed on
BACKOFF_BASE = 0.5
BACKOFF_CAP = 8.0
COOL_DOWN_CAP = 300.0  # seconds: the longest exponential cool-down of a failing key

# One line of the event stream: at least this many bytes, more when MAX_ANSWER_CHARS is large
# (see max_line_bytes); a longer line fails the call instead of growing a buffer.
MIN_LINE_BYTES = 1024 * 1024
# What the provider may report, checked before it is stored or used (see _Answer).
MAX_MODEL_NAME = 256  # characters
MAX_FINISH_REASON = 64  # characters
# Usage figures above this are not believed (no model takes that many tokens in one call); the
# bound also keeps a turn's and a conversation's totals inside gRPC's int32 fields.
MAX_REPORTED_TOKENS = 100_000_000
PROXY_SCHEMES = ("http", "https", "socks5", "socks5h")  # what httpx can speak to a proxy
_UNSAFE_TEXT = re.compile("[\x00\ud800-\udfff]")  # NUL and lone surrogates: not storable
OK, CANCELLED = "ok", "cancelled"  # outcomes of an upstream call besides the error codes


@dataclasses.dataclass(frozen=True, slots=True)
class Completion:
    """The last item of a stream: why it ended, and the provider's usage figures if it sent them."""

    finish_reason: str
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None


@dataclasses.dataclass(frozen=True, slots=True)
class Answering:
    """The first item of a stream: the upstream (its configured name) whose answer follows."""

    upstream: str


@dataclasses.dataclass(frozen=True, slots=True)
class UpstreamCall:
    """One chat-completion request."""

    messages: Sequence[dict[str, str]]
    model: str
    temperature: float
    max_tokens: int | None
    top_p: float | None = None  # sent only when given


class OpenAIUpstream:
    """Streams answers from an OpenAI-compatible endpoint."""

    def __init__(
        self, settings: Settings, metrics: Metrics, *, base_url: str | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        if settings.upstreams and base_url is None:
            providers = [_Provider(config, settings) for config in settings.upstreams]
        else:  # today's one upstream: OPENAI_BASE_URL and OPENAI_API_KEY (or the demo's)
            providers = [_Provider(None, settings, base_url=base_url)]
        self.router = Router(providers)
        self._client = providers[0].routes[0].client  # the first route's (tests, close)
        self._requests: dict[tuple[str, str], Any] = {}  # easybackend_upstream_requests' children

    async def stream(self, call: UpstreamCall) -> AsyncIterator[str | Answering | Completion]:
        """Yield one :class:`Answering` (which upstream answers), the answer's text as it
        arrives, then one :class:`Completion`.

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
        response, route = await self._open(call, deadline)
        batches = _line_batches(response, self._limits(deadline))
        answer = _Answer()
        outcome = CANCELLED  # unless it ends, or fails, first
        try:
            yield Answering(route.provider.name)
            while (text := await self._next(batches, answer)) is not None:
                yield text
            await _drain(batches)
            outcome = OK if answer.finish_reason is not None else UpstreamError.code
        except UpstreamError as exc:
            outcome = exc.code
            raise
        finally:
            route.provider.in_progress -= 1
            self._count(route, outcome)
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

    async def _open(self, call: UpstreamCall, deadline: float) -> tuple[httpx2.Response, Route]:
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
        if call.top_p is not None:
            body["top_p"] = call.top_p
        return await self._post(body, deadline, model=call.model)

    async def _post(
        self,
        body: object,
        deadline: float,
        *,
        model: str,
        relayed: bool = False,
        whole: bool = False,
    ) -> tuple[httpx2.Response, Route]:
        """POST ``body`` (an object, or JSON bytes sent as they are) to ``/chat/completions``.

        Returns the response with its body unread and the route (upstream and
        key) that gave it, whose provider counts one more answer in progress:
        the caller takes it off when the answer is done, and counts the call's
        outcome (:meth:`_count`); a failed attempt is counted here, by its
        error code, and a cancelled one as ``cancelled``. Retries transient
        failures (see the module docstring) until ``deadline``: on the next
        route serving ``model`` at once when there is one (the failed key cools
        down), else on the same after the wait. A ``relayed`` body is the
        client's own: the provider's refusal of it is the client's error
        (:func:`~easybackend.errors.from_relayed_upstream`). For a ``whole``
        (non-streaming) answer the wait for the response's head may last until
        the deadline: such an answer comes all at once, when the model is done.
        """
        payload = {"content": body} if isinstance(body, bytes) else {"body": body}
        options: dict[str, Any] = {}  # the SDK's per-request options
        if whole:
            settings = self.settings
            options["timeout"] = httpx2.Timeout(
                settings.upstream_timeout,
                connect=settings.upstream_connect_timeout,
                read=settings.upstream_timeout,
            )
        router = self.router
        tried: set[Route] = set()
        for attempt in range(self.settings.upstream_retries + 1):
            route = router.pick(model, tried)
            if route is None:
                raise self._failed(router.unavailable(model))
            route.provider.in_progress += 1
            try:
                with trio.fail_at(deadline):
                    # The SDK's generic POST (its documented way to a raw response): the same
                    # request, headers, key and error mapping as chat.completions.create, minus
                    # the re-validation of parameters built here, which grows with the history.
                    response = await route.client.post(
                        "/chat/completions",
                        cast_to=httpx2.Response,
                        **payload,
                        options=options,  # type: ignore[arg-type]
                        stream=True,
                        stream_cls=openai.AsyncStream[httpx2.Response],
                    )
                route.succeeded()
                return response, route
            except trio.TooSlowError:
                route.provider.in_progress -= 1
                self._count(route, UpstreamTimeout.code)
                raise self._failed(
                    UpstreamTimeout("the model provider did not answer in time")
                ) from None
            except Exception as exc:
                route.provider.in_progress -= 1
                translate = (
                    functools.partial(from_relayed_upstream, secret=route.key)
                    if relayed
                    else from_upstream
                )
                error = self._failed(translate(exc))
                self._count(route, error.code)
                wait = _retry_wait(exc, attempt)
                last_attempt = attempt == self.settings.upstream_retries
                tried.add(route)
                if router.pooled and _is_rejected_key(exc):
                    route.take_out()
                    if not last_attempt and router.pick(model, tried, peek=True) is not None:
                        continue
                    raise error from exc
                if router.pooled and _is_transient(exc):
                    route.cool_down(wait if wait is not None else _retry_after_of(exc))
                    self.metrics.upstream_cool_downs.labels(route.provider.name).inc()
                    if not last_attempt and router.pick(model, tried, peek=True) is not None:
                        log.warning(
                            "upstream %s key #%d failed (%s); trying another route",
                            route.provider.name,
                            route.index + 1,
                            error.code,
                        )
                        self.metrics.upstream_retries.inc()
                        continue
                if wait is None or last_attempt or trio.current_time() + wait >= deadline:
                    raise error from exc
                log.warning(
                    "upstream call failed (%s); retry %d in %.2fs", error.code, attempt + 1, wait
                )
                self.metrics.upstream_retries.inc()
                await trio.sleep(wait)
                tried.clear()
                route.cooling_until = 0.0  # waited for: the retry may use it again
            except BaseException:  # cancelled while the head was awaited
                route.provider.in_progress -= 1
                self._count(route, CANCELLED)
                raise
        raise AssertionError("unreachable")

    async def relay_stream(
        self, body: bytes, model: str, *, answered_by: Callable[[str], None] | None = None
    ) -> AsyncIterator[list[Relayed]]:
        """Send a client's streaming request as it is; yield its chunks as they arrive.

        ``body`` (JSON) goes to the provider unchanged (the caller has set
        ``stream`` and ``stream_options``). Each item holds the chunks of one read of the
        event stream, each as its JSON text (exactly as the provider sent it)
        and that text parsed, which is an object. It ends at ``data: [DONE]``.

        Raises :class:`~easybackend.errors.UpstreamError` as :meth:`stream`
        does (retries before the first byte, timeouts, line limits, a broken
        stream, an error event, JSON that does not parse or is not an object,
        a stream that ends with neither ``[DONE]`` nor a finish reason), and
        :class:`~easybackend.errors.UpstreamRejected` for the provider's 4xx
        refusal. On cancellation, or when the consumer closes the generator
        early, the HTTP response is closed at once (the provider stops).
        ``answered_by`` is called with the answering upstream's name once the
        provider has answered the call (before the first chunk).
        """
        deadline = trio.current_time() + self.settings.upstream_timeout
        response, route = await self._post(body, deadline, model=model, relayed=True)
        batches = _line_batches(response, self._limits(deadline))
        ending = _RelayEnding()
        outcome = CANCELLED  # unless it ends, or fails, first
        try:
            if answered_by is not None:
                answered_by(route.provider.name)
            while (chunks := await self._next(batches, ending)) is not None:
                yield chunks
            await _drain(batches)
            outcome = OK if ending.done or ending.finished else UpstreamError.code
        except UpstreamError as exc:
            outcome = exc.code
            raise
        finally:
            route.provider.in_progress -= 1
            self._count(route, outcome)
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await batches.aclose()  # type: ignore[attr-defined]
                await response.aclose()
        if not ending.done and not ending.finished:
            raise self._failed(UpstreamError("the model provider broke off the answer"))

    async def relay_whole(
        self, body: bytes, model: str, *, answered_by: Callable[[str], None] | None = None
    ) -> Relayed:
        """Send a client's non-streaming request (JSON) as it is; its answer, as sent and parsed.

        The answer's body may be up to :func:`max_line_bytes` long and must
        come within ``UPSTREAM_TIMEOUT``; it must be a JSON object without an
        ``error``. Raises as :meth:`relay_stream` does. On cancellation the
        HTTP response is closed at once. ``answered_by`` is called as
        :meth:`relay_stream` calls it.
        """
        deadline = trio.current_time() + self.settings.upstream_timeout
        response, route = await self._post(body, deadline, model=model, relayed=True, whole=True)
        route.provider.in_progress -= 1  # read at once below: counted while it was awaited
        outcome = CANCELLED  # unless it is read, or fails, first
        try:
            if answered_by is not None:
                answered_by(route.provider.name)
            relayed = await self._read_whole(response, deadline)
            outcome = OK
            return relayed
        except UpstreamError as exc:
            outcome = exc.code
            raise
        finally:
            self._count(route, outcome)

    async def _read_whole(self, response: httpx2.Response, deadline: float) -> Relayed:
        """The whole body of a non-streaming answer, as sent and parsed (see :meth:`relay_whole`)."""
        limit = max_line_bytes(self.settings.max_answer_chars)
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        parts = response.aiter_raw() if encoding in ("", "identity") else response.aiter_bytes()
        received: list[bytes] = []
        size = 0
        try:
            with trio.fail_at(deadline):
                async for part in parts:
                    size += len(part)
                    if size > limit:
                        raise self._failed(
                            UpstreamError(f"the model provider's answer is over {limit} bytes")
                        )
                    received.append(part)
        except trio.TooSlowError:
            raise self._failed(
                UpstreamTimeout(
                    f"the model provider did not finish within {self.settings.upstream_timeout:g} seconds"
                )
            ) from None
        except httpx2.TimeoutException as exc:
            raise self._failed(UpstreamTimeout("the model provider stopped sending")) from exc
        except httpx2.HTTPError as exc:
            raise self._failed(UpstreamError("the model provider broke off the answer")) from exc
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await response.aclose()
        data = b"".join(received)
        try:
            answer = _parse_event(data)
        except UpstreamError as exc:
            raise self._failed(exc) from None
        if type(answer) is not dict or "error" in answer:
            raise self._failed(UpstreamError("the model provider answered with an error"))
        return data, answer

    def _limits(self, deadline: float) -> _LineLimits:
        settings = self.settings
        return _LineLimits(
            deadline=deadline,
            total=settings.upstream_timeout,
            idle=settings.upstream_idle_timeout,
            max_line_bytes=max_line_bytes(settings.max_answer_chars),
        )

    async def _next(
        self, batches: AsyncIterator[list[bytes]], reader: _Answer | _RelayEnding
    ) -> Any:
        """What ``reader`` (an answer's :class:`_Answer`, a relay's :class:`_RelayEnding`)
        makes of the next lines that give it something (text, chunks), or None at the end of
        the stream.

        Raises UpstreamError on a broken stream, an error event, a malformed
        event or a stall. The idle timeout is the HTTP client's read timeout
        (no cancel scope per read: they cost more than the piece); the total
        timeout and the line limits are checked by :func:`_line_batches` after
        every read, so an answer may overrun it by at most one idle period.
        """
        try:
            while not reader.done:
                lines = await anext(batches, None)
                if lines is None:
                    return None
                if made := reader.feed(lines):
                    return made
            return None
        except UpstreamError as exc:
            raise self._failed(exc) from None
        except httpx2.HTTPError as exc:
            raise self._read_failure(exc) from exc

    def _read_failure(self, exc: httpx2.HTTPError) -> UpstreamError:
        """What a failed read of the event stream is to the client (counted): a timeout or a
        stream broken off."""
        if isinstance(exc, httpx2.TimeoutException):
            idle = self.settings.upstream_idle_timeout
            return self._failed(
                UpstreamTimeout(f"the model provider sent nothing for {idle:g} seconds")
            )
        return self._failed(UpstreamError("the model provider broke off the answer"))

    def _failed(self, error: UpstreamError) -> UpstreamError:
        self.metrics.upstream_errors.labels(error.code).inc()
        return error

    def _count(self, route: Route, outcome: str) -> None:
        """One call to ``route``'s upstream ended with ``outcome`` (ok, cancelled or an error code)."""
        counted = self._requests.get((route.provider.name, outcome))
        if counted is None:
            counted = self.metrics.upstream_requests.labels(route.provider.name, outcome)
            self._requests[(route.provider.name, outcome)] = counted
        counted.inc()

    async def aclose(self) -> None:
        """Close the connection pools."""
        for provider in self.router.providers:
            for route in provider.routes:
                await route.client.close()


class _AzureClient(openai.AsyncOpenAI):
    """Azure OpenAI: the key in an ``api-key`` header (base_url is the deployment's URL)."""

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"api-key": self.api_key}

    def _auth_headers(self, security: object) -> dict[str, str]:  # the SDK's per-request hook
        return {"api-key": self.api_key}

    def _validate_headers(self, headers: object, custom_headers: object) -> None:
        return None  # the key is in api-key, which the SDK's check does not know


def _client_for(
    settings: Settings, key: str, base_url: str | None, config: UpstreamConfig | None
) -> openai.AsyncOpenAI:
    """One SDK client (and connection pool) for one upstream key."""
    connect = (config and config.connect_timeout) or settings.upstream_connect_timeout
    idle = (config and config.idle_timeout) or settings.upstream_idle_timeout
    total = (config and config.timeout) or settings.upstream_timeout
    timeout = httpx2.Timeout(total, connect=connect, read=idle)
    proxy = config.proxy if config else None
    http_client = openai.DefaultAsyncHttpxClient(
        timeout=timeout,
        # a proxy needs httpx's own transport; LeanTransport speaks to the provider directly
        transport=None if proxy else _transport(settings.upstream_transport),
        proxy=proxy,
        # for httpx's own transport (with a proxy); LeanTransport has no limit
        limits=httpx2.Limits(max_connections=None, max_keepalive_connections=256),
        event_hooks={"response": [_refuse_redirect_to_another_origin]},
    )
    options: dict[str, Any] = {}
    cls: type[openai.AsyncOpenAI] = openai.AsyncOpenAI
    if config is not None and config.kind == "azure":
        cls = _AzureClient
        options["default_query"] = {"api-version": config.api_version}
    return cls(
        api_key=key,
        base_url=base_url,
        max_retries=0,
        timeout=timeout,
        http_client=http_client,
        **options,
    )


class Route:
    """One upstream key: its client, and whether it may be used now."""

    __slots__ = ("provider", "index", "key", "client", "cooling_until", "failures", "out")

    def __init__(self, provider: _Provider, index: int, key: str, client: openai.AsyncOpenAI):
        self.provider = provider
        self.index = index  # 0-based in the upstream's api_keys; shown 1-based
        self.key = key
        self.client = client
        self.cooling_until = 0.0  # trio time; 0: not cooling
        self.failures = 0  # in a row, for the exponential cool-down
        self.out = False  # rejected (401/403): out until restart

    def __repr__(self) -> str:  # never the key
        return f"<Route {self.provider.name} key #{self.index + 1}>"

    def shown_key(self) -> str:
        """The key as index and last four characters, for the ``upstreams`` command and /readyz."""
        return shown_key(self.index, self.key)

    def state(self, now: float) -> str:
        if self.out:
            return "rejected"
        if self.cooling_until > now:
            return f"cooling {self.cooling_until - now:.0f}s"
        return "ready"

    def succeeded(self) -> None:
        self.failures = 0
        self.cooling_until = 0.0

    def cool_down(self, wait: float | None) -> None:
        """Keep the key unused for the provider's ``Retry-After``, else exponentially longer."""
        self.failures += 1
        if wait is None:
            wait = min(COOL_DOWN_CAP, BACKOFF_BASE * 2 ** (self.failures - 1))
        self.cooling_until = trio.current_time() + wait
        log.warning(
            "upstream %s key #%d cools down for %.1fs", self.provider.name, self.index + 1, wait
        )

    def take_out(self) -> None:
        if not self.out:
            self.out = True
            log.error(
                "upstream %s key #%d was rejected by the provider (401/403): not used again "
                "until restart",
                self.provider.name,
                self.index + 1,
            )


class _Provider:
    """One upstream: its keys (routes), the models it serves, its load."""

    def __init__(
        self, config: UpstreamConfig | None, settings: Settings, *, base_url: str | None = None
    ) -> None:
        self.config = config
        self.name = config.name if config else "default"
        self.weight = config.weight if config else 1.0
        self.max_concurrency = config.max_concurrency if config else None
        self.models = frozenset(config.models) if config else None  # None: every model
        self.in_progress = 0
        self._next_key = 0
        if config is None:
            keys: tuple[str, ...] = (settings.openai_api_key or "demo",)
            url = base_url or settings.openai_base_url
        else:
            keys, url = config.api_keys, config.base_url
        self.base_url = url
        self.routes = [
            Route(self, index, key, _client_for(settings, key, url, config))
            for index, key in enumerate(keys)
        ]

    def serves(self, model: str) -> bool:
        return self.models is None or model in self.models

    def free(self) -> bool:
        return self.max_concurrency is None or self.in_progress < self.max_concurrency

    def next_route(self, tried: set[Route], now: float, *, peek: bool) -> Route | None:
        """The next usable key, round robin (so the keys share the load)."""
        routes = self.routes
        count = len(routes)
        for step in range(count):
            route = routes[(self._next_key + step) % count]
            if route.out or route in tried or route.cooling_until > now:
                continue
            if not peek:
                self._next_key = (self._next_key + step + 1) % count
            return route
        return None


class Router:
    """Chooses an (upstream, key) for each call: by model, weight and answers in progress."""

    def __init__(self, providers: list[_Provider]) -> None:
        self.providers = providers
        self.pooled = sum(len(p.routes) for p in providers) > 1  # failover between routes
        # today's one upstream and key (no file): every model goes there, no routing state
        self._single = None if self.pooled or providers[0].models else providers[0].routes[0]
        self._by_model: dict[str, list[_Provider]] = {}

    def serving(self, model: str) -> list[_Provider]:
        providers = self._by_model.get(model)
        if providers is None:
            providers = [p for p in self.providers if p.serves(model)]
            if len(self._by_model) < 10_000:
                self._by_model[model] = providers
        return providers

    def pick(self, model: str, tried: set[Route], *, peek: bool = False) -> Route | None:
        """A route for ``model`` not in ``tried``, or None when none is usable now."""
        if (single := self._single) is not None:  # today's one upstream and key
            return None if single in tried else single
        now = trio.current_time()
        best: Route | None = None
        best_load = math.inf
        for provider in self.serving(model):
            if not provider.free():
                continue
            load = (provider.in_progress + 1) / provider.weight
            if load >= best_load:
                continue
            route = provider.next_route(tried, now, peek=True)
            if route is not None:
                best, best_load = route, load
        if best is not None and not peek:
            best = best.provider.next_route(tried, now, peek=False)
        return best

    def unavailable(self, model: str) -> UpstreamUnavailable:
        """The error when no route for ``model`` is usable: it names the soonest retry."""
        providers = self.serving(model)
        if not providers:
            return UpstreamUnavailable(f"no upstream serves the model {model}")
        now = trio.current_time()
        waits = [
            route.cooling_until - now
            for provider in providers
            for route in provider.routes
            if not route.out and route.cooling_until > now
        ]
        if not waits:
            return UpstreamUnavailable(f"every upstream of the model {model} is busy or down")
        soonest = max(1, math.ceil(min(waits)))
        return UpstreamUnavailable(
            f"every upstream of the model {model} is down; retry in {soonest} seconds",
            retry_after=soonest,
        )

    def describe(self) -> list[dict[str, object]]:
        """Each upstream and its keys' states (keys as index and last four characters)."""
        now = trio.current_time()
        return [
            {
                "name": provider.name,
                "models": sorted(provider.models) if provider.models is not None else ["*"],
                "in_progress": provider.in_progress,
                "keys": [
                    {"key": route.shown_key(), "state": route.state(now)}
                    for route in provider.routes
                ],
            }
            for provider in self.providers
        ]


def _is_rejected_key(exc: Exception) -> bool:
    return isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError)


def _is_transient(exc: Exception) -> bool:
    if isinstance(exc, openai.APIConnectionError):
        return True
    return isinstance(exc, openai.APIStatusError) and (
        exc.status_code == 429 or exc.status_code >= 500
    )


def _retry_after_of(exc: Exception) -> float | None:
    if isinstance(exc, openai.APIStatusError):
        return _retry_after(exc.response.headers)
    return None


class _Answer:
    """What the event stream has said so far: the end, the model, usage and finish reason.

    Everything is checked as it arrives (see the module docstring): what is
    kept here is safe to store and to send on every protocol.
    """

    __slots__ = ("_last_model", "done", "finish_reason", "model", "usage")

    def __init__(self) -> None:
        self.done = False
        self.finish_reason: str | None = None
        self.model: str | None = None
        self.usage: dict[str, int | None] | None = None
        self._last_model: object = None  # the model field as last sent, checked or not

    def feed(self, lines: list[bytes]) -> str:
        """Take in some lines of the event stream; returns the answer text they carry.

        Raises UpstreamError on an error event or a malformed one (JSON that
        does not parse, however it fails, or content of the wrong shape).
        """
        pieces = []
        for line in lines:
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, event names
            data = line[5:].strip()
            if data == b"[DONE]":
                self.done = True
                break
            chunk = _parse_event(data)
            if type(chunk) is not dict or "error" in chunk:
                raise UpstreamError(
                    "the model provider reported an error in the middle of the answer"
                )
            if (model := chunk.get("model")) != self._last_model:  # checked once per name
                self._take_model(model)
            if usage := chunk.get("usage"):
                self._take_usage(usage)
            if not (choices := chunk.get("choices")):
                continue
            if type(choices) is not list:
                raise _malformed("choices is not a list")
            content, finish_reason = _first_choice(choices[0])
            if content:
                # NUL and lone surrogates come only from \u escapes: skip the scan without one
                pieces.append(_UNSAFE_TEXT.sub("\ufffd", content) if b"\\u" in data else content)
            self.finish_reason = finish_reason or self.finish_reason
        return "".join(pieces)

    def _take_model(self, model: object) -> None:
        """Keep a model name that is a short printable string; ignore (and log) any other."""
        self._last_model = model
        if not model:
            return
        if _is_short_name(model, MAX_MODEL_NAME):
            self.model = model  # type: ignore[assignment]
        else:
            log.warning("ignoring a malformed model name from the model provider")

    def _take_usage(self, usage: object) -> None:
        """Keep believable usage figures; ignore (and log) any others."""
        if (checked := _checked_usage(usage)) is not None:
            self.usage = checked
        else:
            log.warning("ignoring malformed usage figures from the model provider")


# One relayed chunk (or a whole relayed answer): its JSON text as the provider sent it, parsed.
Relayed = tuple[bytes, dict[str, Any]]


class _RelayEnding:
    """What a relayed event stream has said of its end: ``[DONE]``, a finish reason."""

    __slots__ = ("done", "finished")

    def __init__(self) -> None:
        self.done = False  # data: [DONE] arrived
        self.finished = False  # some choice had a finish reason

    def feed(self, lines: list[bytes]) -> list[Relayed]:
        """The chunks of some lines of the event stream; raises UpstreamError on a bad one."""
        chunks = []
        for line in lines:
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, event names
            data = line[5:].strip()
            if data == b"[DONE]":
                self.done = True
                break
            chunk = _parse_event(data)
            if type(chunk) is not dict or "error" in chunk:
                raise UpstreamError(
                    "the model provider reported an error in the middle of the answer"
                )
            if not self.finished and (choices := chunk.get("choices")):
                if type(choices) is not list:
                    raise _malformed("choices is not a list")
                self.finished = any(
                    isinstance(choice, dict) and choice.get("finish_reason") for choice in choices
                )
            chunks.append((data, chunk))
        return chunks


def _parse_event(data: bytes) -> object:
    """The JSON of one event; raises UpstreamError however parsing fails (deep nesting too)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise _malformed("its JSON does not parse") from exc


def _first_choice(choice: object) -> tuple[str | None, str | None]:
    """The content and finish reason of a ``choices`` entry; raises UpstreamError on a bad shape."""
    if not isinstance(choice, dict):
        raise _malformed("a choice is not an object")
    delta = choice.get("delta")
    if delta is None:
        content = None
    elif isinstance(delta, dict):
        content = delta.get("content")
        if content is not None and not isinstance(content, str):
            raise _malformed("the delta's content is not a string")
    else:
        raise _malformed("a choice's delta is not an object")
    finish_reason = choice.get("finish_reason")
    if finish_reason is not None and not _is_short_name(finish_reason, MAX_FINISH_REASON):
        raise _malformed(f"finish_reason is not a string of at most {MAX_FINISH_REASON} characters")
    return content, finish_reason


def _checked_usage(usage: object) -> dict[str, int | None] | None:
    """Usage with whole token counts in 0..MAX_REPORTED_TOKENS (or absent), else None."""
    if not isinstance(usage, dict):
        return None
    checked: dict[str, int | None] = {}
    for field in ("prompt_tokens", "completion_tokens"):
        value = usage.get(field)
        if value is not None and (type(value) is not int or not 0 <= value <= MAX_REPORTED_TOKENS):
            return None
        checked[field] = value
    return checked


def _is_short_name(value: object, limit: int) -> bool:
    """A non-empty printable string (no NUL, controls or lone surrogates) of at most ``limit``."""
    return isinstance(value, str) and 0 < len(value) <= limit and value.isprintable()


def _malformed(what: str) -> UpstreamError:
    return UpstreamError(f"the model provider sent a malformed event ({what})")


def max_line_bytes(max_answer_chars: int) -> int:
    """The longest line of the event stream accepted: 1 MiB, or 4 bytes per answer character.

    Real providers send one small event per piece; the bound lets even a
    provider that sends the whole allowed answer in one event through.
    """
    return max(MIN_LINE_BYTES, 4 * max_answer_chars)


@dataclasses.dataclass(frozen=True, slots=True)
class _LineLimits:
    """What one read of the event stream is checked against."""

    deadline: float  # trio time by which the whole answer must have come
    total: float  # UPSTREAM_TIMEOUT, for the message
    idle: float  # longest wait for a complete line, in seconds
    max_line_bytes: int


async def _line_batches(
    response: httpx2.Response, limits: _LineLimits
) -> AsyncIterator[list[bytes]]:
    """The body's complete lines, one list per read, as bytes: no text decoding.

    The raw body when it is not content-encoded (the usual case for event
    streams), else httpx's decoded bytes. Lines are split at ``\n`` (a ``\r``
    before it stays: the parser strips it); a last line without one comes at
    the end. The bytes of an unfinished line are kept as they came and joined
    once, when its end arrives, so a long line costs time linear in its length.

    Raises UpstreamTimeout when, after a read, the total deadline has passed or
    no line has been completed for ``limits.idle`` seconds; UpstreamError when
    a line is longer than ``limits.max_line_bytes``.
    """
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    parts = response.aiter_raw() if encoding in ("", "identity") else response.aiter_bytes()
    held: list[bytes] = []  # the unfinished line, in the parts it came in
    held_bytes = 0
    last_line_at = trio.current_time()
    async for part in parts:
        now = trio.current_time()
        if now >= limits.deadline:
            raise UpstreamTimeout(
                f"the model provider did not finish within {limits.total:g} seconds"
            )
        lines = part.split(b"\n")
        if len(lines) == 1:  # no end of line in this read
            held.append(part)
            held_bytes += len(part)
            _check_unfinished_line(held_bytes, now - last_line_at, limits)
            continue
        last_line_at = now
        if held:
            held.append(lines[0])
            lines[0] = b"".join(held)
            held.clear()
        rest = lines.pop()
        if rest:
            held.append(rest)
        held_bytes = len(rest)
        if len(lines[0]) > limits.max_line_bytes or len(part) > limits.max_line_bytes:
            _check_lines(lines, limits.max_line_bytes)
        yield lines
    if held:
        yield [b"".join(held)]


def _check_unfinished_line(held_bytes: int, waited: float, limits: _LineLimits) -> None:
    if held_bytes > limits.max_line_bytes:
        raise _line_too_long(limits.max_line_bytes)
    if waited >= limits.idle:
        raise UpstreamTimeout(
            f"the model provider sent no complete event for {limits.idle:g} seconds"
        )


def _check_lines(lines: list[bytes], max_bytes: int) -> None:
    if any(len(line) > max_bytes for line in lines):
        raise _line_too_long(max_bytes)


def _line_too_long(max_bytes: int) -> UpstreamError:
    return UpstreamError(
        f"the model provider sent an event stream line longer than {max_bytes} bytes"
    )


async def _drain(batches: AsyncIterator[list[bytes]]) -> None:
    """Read what follows the end of the answer, briefly, so the connection can be reused.

    Best effort: a failure or a body that does not end within a second only
    means the connection is closed instead of reused; the answer stands.
    """
    with trio.move_on_after(1):
        try:
            async for _ in batches:
                pass
        except (UpstreamError, httpx2.HTTPError):
            pass


async def _refuse_redirect_to_another_origin(response: httpx2.Response) -> None:
    """An httpx response hook: raise UpstreamError for a redirect that leaves the origin.

    httpx calls it for every response before it follows a redirect (with
    either transport); a redirect within the provider's origin is followed.
    The error names the origin only (no path, no query, no credentials).
    """
    if not response.has_redirect_location:
        return
    here = response.request.url
    try:
        there = here.join(response.headers["location"])
        origin = _origin(there)
    except (httpx2.InvalidURL, ValueError):
        raise UpstreamError(
            f"the model provider answered HTTP {response.status_code} with a malformed redirect"
        ) from None
    if origin != _origin(here):
        scheme, host, port = origin
        shown_host = f"[{host}]" if ":" in host else host
        raise UpstreamError(
            f"the model provider redirected the call (HTTP {response.status_code}) to another "
            f"origin, {scheme}://{shown_host}:{port}; redirects to another origin are not "
            "followed: check OPENAI_BASE_URL"
        )


def _origin(url: httpx2.URL) -> tuple[str, str, int]:
    port = url.port or (443 if url.scheme == "https" else 80)
    return url.scheme, url.host, port


def check_proxy_environment() -> None:
    """Raise ConfigError when a proxy variable names a proxy httpx cannot use.

    httpx reads ``HTTP_PROXY``, ``HTTPS_PROXY`` and ``ALL_PROXY`` (either case;
    a value without a scheme means ``http://``). Called at start-up, so a bad
    one stops the server with one line instead of a traceback on the first ask.
    """
    for name, url in urllib.request.getproxies().items():
        if name not in ("http", "https", "all"):
            continue  # httpx reads no other
        variable = f"{name.upper()}_PROXY"
        scheme = url.split("://", 1)[0].lower() if "://" in url else "http"
        if scheme not in PROXY_SCHEMES:
            raise ConfigError(
                f"{variable} names a {scheme}:// proxy; supported are "
                + ", ".join(f"{known}://" for known in PROXY_SCHEMES)
            )
        if scheme.startswith("socks") and importlib.util.find_spec("socksio") is None:
            raise ConfigError(
                f"{variable} names a SOCKS proxy, which needs the socksio package "
                "(pip install 'httpx2[socks]')"
            )
    try:
        httpx2.AsyncClient(trust_env=True)
    except (ValueError, ImportError, httpx2.InvalidURL) as exc:
        raise ConfigError(
            f"HTTP_PROXY, HTTPS_PROXY or ALL_PROXY is not a proxy URL httpx can use ({type(exc).__name__})"
        ) from None


def _transport(chosen: str) -> LeanTransport | None:
    """The transport ``UPSTREAM_TRANSPORT`` chose: the lean one, or None for httpx's own.

    A proxy in the environment wins over ``lean``: httpx honours ``HTTP_PROXY``,
    ``HTTPS_PROXY``, ``ALL_PROXY`` and ``NO_PROXY`` (read through
    ``urllib.request.getproxies``) only with its own transport, so a proxied
    deployment keeps it. The choice is logged.
    """
    proxies = sorted(f"{scheme.upper()}_PROXY" for scheme in urllib.request.getproxies())
    named = [variable for variable in proxies if variable != "NO_PROXY"]
    if named and chosen == "lean":
        log.info(
            "upstream transport: httpx's own, not the lean one, since %s names a proxy",
            " and ".join(named),
        )
        return None
    if chosen == "lean":
        log.debug("upstream transport: lean")
        return LeanTransport()
    log.info("upstream transport: httpx's own (UPSTREAM_TRANSPORT=httpx)")
    return None


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
