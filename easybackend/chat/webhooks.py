"""The webhook of background answers (SPEC §18): a signed POST when one ends.

With ``WEBHOOK_URL`` set, the chat core hands :meth:`Webhooks.notify` one
event per background answer that ends; this module only serializes it and
delivers it. The event the core builds (docs/deploy.md "Webhook")::

    {"type": "answer.completed" | "answer.failed" | "answer.cancelled",
     "conversation_id": ..., "turn_id": ..., "key": ..., "status": ..., "finish_reason": ...,
     "model": ..., "usage": {...}, "created_at": <unix seconds>, "text": <answer>}

A delivery is ``POST WEBHOOK_URL`` with the event as compact UTF-8 JSON and
the headers ``Content-Type: application/json``, ``User-Agent: EasyBackend``,
``X-EasyBackend-Timestamp`` (unix seconds), ``X-EasyBackend-Signature``
(``sha256=`` and the hex HMAC-SHA256, keyed with ``WEBHOOK_SECRET``, of
``"<timestamp>.<body>"``) and ``X-EasyBackend-Delivery`` (one id per event,
the same on each of its retries). A 2xx ends it. A connection error, a
timeout (``WEBHOOK_TIMEOUT`` per attempt), 429 or 5xx is retried up to
``WEBHOOK_RETRIES`` times, after the receiver's ``Retry-After`` or else an
exponential backoff with jitter (1 s, 2 s, 4 s … at most 60 s); each retry is
signed again with a fresh timestamp. Any other status (a redirect, a 4xx) is
not retried. Every failure is one warning line naming the status or the
error and the URL without its query and user part; the secret is never
logged (and ``logs.secrets_of`` blanks it out should anything else log it).

The HTTP client is one ``httpx2.AsyncClient`` for the service's life. It
follows the proxy environment as the upstream client does (``HTTP_PROXY``,
``HTTPS_PROXY``, ``ALL_PROXY``, ``NO_PROXY``, httpx's standard handling) and
trusts ``SSL_CERT_FILE``/``SSL_CERT_DIR``; it follows no redirect.

Bounded: at most :attr:`Webhooks.max_pending` deliveries are held (waiting,
sending or between retries), at most :attr:`Webhooks.concurrency` send at
once; an event beyond the bound is refused with one warning per overflow.
Nothing here ever blocks or fails an answer.
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import json
import logging
import math
import random
import time
import urllib.parse
import uuid
from collections.abc import Callable
from typing import Any

import httpx2
import trio

from ..settings import Settings

log = logging.getLogger("easybackend.webhooks")

USER_AGENT = "EasyBackend"
SIGNATURE_PREFIX = "sha256="
CLOSE_TIMEOUT = 2.0  # seconds closing the HTTP client may take at the end
STOP_GRACE = 5.0  # seconds pending deliveries get at shutdown, once the answers have ended


def signature_of(secret: str | bytes, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: the HMAC-SHA256, keyed with ``secret``, of ``"<timestamp>.<body>"``."""
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, timestamp.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()
    return SIGNATURE_PREFIX + digest


def verify_signature(
    secret: str,
    timestamp: str,
    body: bytes,
    signature: str,
    *,
    tolerance: float = 300,
    now: float | None = None,
) -> bool:
    """Whether ``signature`` (the ``X-EasyBackend-Signature`` header) signs ``body`` at
    ``timestamp`` (the ``X-EasyBackend-Timestamp`` header) with ``secret``.

    False as well when the timestamp is not whole unix seconds or lies more than
    ``tolerance`` seconds from ``now`` (default: the clock), before or after: a
    replayed old delivery is refused. The signatures are compared in constant time.
    Never raises.
    """
    try:
        moment = int(timestamp.strip())
    except (AttributeError, ValueError):
        return False
    current = time.time() if now is None else now
    if not math.isfinite(current) or abs(current - moment) > tolerance:
        return False
    try:
        expected = signature_of(secret, timestamp.strip(), body)
        return hmac.compare_digest(expected.encode("ascii"), signature.strip().encode("ascii"))
    except (AttributeError, TypeError, UnicodeError):
        return False


def shown_url(url: str) -> str:
    """``url`` fit for a log line: scheme, host, port and path; no user part, no query."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(the webhook URL)"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path or '/'}"


def retry_after_seconds(headers: httpx2.Headers) -> float | None:
    """The receiver's ``Retry-After`` (seconds, or an HTTP date) as seconds from now, if any."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


class _ShownURLFilter(logging.Filter):
    """On httpx2's logger (its ``HTTP Request: POST <url> …`` line at INFO): the webhook URL
    shown without its query and user part, whatever level that logger is set to."""

    def __init__(self, url: str, shown: str) -> None:
        super().__init__()
        self.url = url
        self.shown = shown

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(
            isinstance(arg, httpx2.URL) for arg in record.args
        ):
            record.args = tuple(
                self.shown if isinstance(arg, httpx2.URL) and str(arg) == self.url else arg
                for arg in record.args
            )
        return True


class Webhooks:
    """The deliveries of the webhook of background answers (see the module docstring).

    The class attributes are the bounds and the backoff; a test may set them on
    an instance before :meth:`run` (``backoff_base=0.01``, ``clock=…``).
    """

    max_pending = 10_000  # deliveries held (waiting, sending, between retries) at most
    concurrency = 16  # deliveries sending at once
    backoff_base = 1.0  # seconds before the first retry; doubled before each next one
    backoff_cap = 60.0  # the longest backoff
    retry_after_cap = 600.0  # the longest Retry-After waited (a longer one waits this)
    clock: Callable[[], float] = staticmethod(time.time)  # the timestamps' clock

    def __init__(self, settings: Settings) -> None:
        self.url = settings.webhook_url
        self._secret = settings.webhook_secret.encode()
        self.timeout = settings.webhook_timeout
        self.retries = settings.webhook_retries
        self._shown_url = shown_url(self.url) if self.url else ""
        self._nursery: trio.Nursery | None = None
        self._client: httpx2.AsyncClient | None = None
        self._slots: trio.CapacityLimiter | None = None
        self._pending = 0
        self._overflowing = False  # an overflow's warning was logged; cleared once one fits
        self._closing = False
        self._drained = trio.Event()  # set once closing with nothing pending
        self._scope = trio.CancelScope()
        self._started = False
        self._stopped = trio.Event()

    @property
    def configured(self) -> bool:
        """``WEBHOOK_URL`` is set."""
        return bool(self.url)

    @property
    def pending(self) -> int:
        """Deliveries held now: waiting for a slot, sending, or waiting to retry."""
        return self._pending

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver the events :meth:`notify` takes, until cancelled or :meth:`stop`.

        Without ``WEBHOOK_URL`` it reports started and returns at once. On
        cancellation the deliveries in progress are cancelled with it (a request
        being sent is dropped, its connection closed) and the HTTP client is
        closed (shielded, at most :data:`CLOSE_TIMEOUT` seconds). Runs once per
        instance; a delivery's failure is logged, never raised.
        """
        if not self.configured or self._closing:
            task_status.started()
            return
        self._started = True
        client = httpx2.AsyncClient(
            timeout=httpx2.Timeout(self.timeout),
            headers={"User-Agent": USER_AGENT},
            follow_redirects=False,
            trust_env=True,  # HTTP(S)_PROXY, ALL_PROXY, NO_PROXY, SSL_CERT_FILE, as upstream
        )
        self._client = client
        self._slots = trio.CapacityLimiter(self.concurrency)
        hide_url = _ShownURLFilter(str(httpx2.URL(self.url)), self._shown_url)
        logging.getLogger("httpx2").addFilter(hide_url)
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                await client.aclose()
            logging.getLogger("httpx2").removeFilter(hide_url)
            self._stopped.set()

    def notify(self, event: dict[str, Any]) -> bool:
        """Queue one delivery of ``event``; never blocks, never raises.

        Returns False (and delivers nothing) when no webhook is configured, the
        service is not running (or stopping), ``event`` is not JSON-serializable,
        or :attr:`max_pending` deliveries are already held (a warning is logged
        once per overflow). Call it from a task of the trio run that runs
        :meth:`run`.
        """
        try:
            nursery = self._nursery
            if nursery is None or self._closing:
                return False
            if self._pending >= self.max_pending:
                if not self._overflowing:
                    self._overflowing = True
                    log.warning(
                        "webhook: %d deliveries are pending already; further events are "
                        "dropped until some finish",
                        self._pending,
                    )
                return False
            try:
                body = json.dumps(
                    event, ensure_ascii=False, separators=(",", ":"), allow_nan=False
                ).encode("utf-8")
            except (TypeError, ValueError) as exc:
                log.warning(
                    "webhook: an event that is not JSON was dropped (%s)", type(exc).__name__
                )
                return False
            kind = event.get("type")
            kind = kind[:40] if isinstance(kind, str) else "event"  # names it in the log
            self._pending += 1
            try:
                nursery.start_soon(self._deliver, body, str(uuid.uuid4()), kind)
            except RuntimeError:  # the nursery is closing
                self._delivery_ended()
                return False
            self._overflowing = False
            return True
        except Exception:  # never raise into the answer
            log.exception("webhook: an event could not be queued")
            return False

    async def stop(self, grace: float) -> None:
        """Take no more events; let the pending deliveries go on (retries included) for up to
        ``grace`` seconds, then cancel those left and return once :meth:`run` has ended and
        the HTTP client is closed. At once when nothing is pending or run never ran. If the
        caller is cancelled meanwhile, the deliveries are cancelled too."""
        self._closing = True
        if self._pending == 0:
            self._drained.set()
        try:
            with trio.move_on_after(max(0.0, grace)):
                await self._drained.wait()
        finally:
            self._scope.cancel()
        if self._started:
            await self._stopped.wait()

    # -- one delivery -------------------------------------------------------------------------

    async def _deliver(self, body: bytes, delivery_id: str, kind: str) -> None:
        """Attempt, retry, give up: until a 2xx, a status not worth retrying, or the retries are
        spent. Every failure is logged here; nothing is raised but cancellation."""
        try:
            for attempt in range(self.retries + 1):
                failure, retryable, retry_after = await self._attempt(body, delivery_id)
                if failure is None:
                    return
                where = f"webhook delivery {delivery_id} ({kind}) to {self._shown_url}"
                if not retryable:
                    log.warning("%s failed: %s; not retried", where, failure)
                    return
                if attempt == self.retries:
                    log.warning(
                        "%s failed: %s; given up after %d retries", where, failure, self.retries
                    )
                    return
                wait = self._wait_before_retry(attempt, retry_after)
                log.warning(
                    "%s failed: %s; retry %d of %d in %.2f s",
                    where,
                    failure,
                    attempt + 1,
                    self.retries,
                    wait,
                )
                await trio.sleep(wait)
        except Exception as exc:  # a bug, not the receiver: still never the server's failure
            log.warning(
                "webhook delivery %s (%s) failed: %s", delivery_id, kind, type(exc).__name__
            )
        finally:
            self._delivery_ended()

    async def _attempt(
        self, body: bytes, delivery_id: str
    ) -> tuple[str | None, bool, float | None]:
        """One signed POST, signed now. Returns ``(failure, retryable, retry_after)``:
        ``failure`` None when delivered, else the status or the error; ``retry_after`` the
        receiver's ``Retry-After`` in seconds, if it sent one."""
        assert self._client is not None and self._slots is not None and self.url is not None
        timed_out = f"no answer within {self.timeout:g} s"
        async with self._slots:
            timestamp = str(int(self.clock()))
            headers = {
                "Content-Type": "application/json",
                "X-EasyBackend-Timestamp": timestamp,
                "X-EasyBackend-Signature": signature_of(self._secret, timestamp, body),
                "X-EasyBackend-Delivery": delivery_id,
            }
            status: int | None = None
            retry_after: float | None = None
            with trio.move_on_after(self.timeout):  # the attempt as a whole, slow drips too
                try:
                    async with self._client.stream(
                        "POST", self.url, content=body, headers=headers
                    ) as response:  # the response's body is never read
                        status = response.status_code
                        retry_after = retry_after_seconds(response.headers)
                except httpx2.TimeoutException:
                    return timed_out, True, None
                except httpx2.TransportError as exc:
                    return self._error_text(exc), True, None
            if status is None:  # the deadline above
                return timed_out, True, None
        if 200 <= status < 300:
            log.debug("webhook delivery %s: HTTP %d", delivery_id, status)
            return None, False, None
        return f"HTTP {status}", status == 429 or status >= 500, retry_after

    def _wait_before_retry(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before retry ``attempt + 1``: the receiver's Retry-After (at most
        :attr:`retry_after_cap`), else half to all of ``backoff_base * 2**attempt`` (at most
        :attr:`backoff_cap`), at random."""
        if retry_after is not None:
            return min(retry_after, self.retry_after_cap)
        nominal = min(self.backoff_cap, self.backoff_base * 2**attempt)
        return nominal * random.uniform(0.5, 1.0)

    def _error_text(self, exc: Exception) -> str:
        """The error's class and message, the URL in it shown without query or user part."""
        text = str(exc).replace(self.url or "", self._shown_url)
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

    def _delivery_ended(self) -> None:
        self._pending -= 1
        if self._closing and self._pending == 0:
            self._drained.set()
