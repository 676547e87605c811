"""What happened to each ask: one access log line and the metrics, on every protocol.

:class:`AskRecord` follows one ask from its arrival to its end (answered,
failed or cancelled) and, once, writes the access line (logger
``easybackend.access``, INFO; prompts and keys never appear in it, only the
key's name and the name of the upstream that answered, ``-`` when none did)
and updates the metrics. :func:`record_refusal` does the same for an ask
refused before the core took it (a wrong key, a full queue, a server shutting
down, a body the transport could not read), so every ask a client sent gets
its line and its count, whichever protocol refused it and where.
"""

from __future__ import annotations

import logging
import time

import trio

from ..errors import ChatError, InternalError
from ..metrics import Metrics
from .caller import Caller

access_log = logging.getLogger("easybackend.access")

CANCELLED = "cancelled"


def is_cancellation(exc: BaseException | None) -> bool:
    """True for a cancellation or an early close of the ask (not an error of the ask itself)."""
    return isinstance(exc, trio.Cancelled | GeneratorExit) or (
        isinstance(exc, BaseExceptionGroup)
        and exc.subgroup((trio.Cancelled, GeneratorExit)) is not None
    )


class AskRecord:
    """Timing, tokens and outcome of one ask."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        protocol: str,
        request_id: str,
        conversation_id: str,
        key_name: str | None,
    ) -> None:
        self.metrics = metrics
        self.protocol = protocol
        self.request_id = request_id
        self.conversation_id = conversation_id  # as shown: "-" when it is not a valid id
        self.key_name = key_name
        self.started = time.perf_counter()
        self.first_token: float | None = None
        self.outcome = "error"
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.upstream: str | None = None  # the upstream that answered, once one did
        metrics.active_streams.labels(protocol).inc()

    def answered_by(self, upstream: str) -> None:
        """The upstream named ``upstream`` (its configured name) answers this ask.

        Its name goes in the access line (``upstream=``) and labels the ask's time
        to first token in ``easybackend_upstream_time_to_first_token_seconds``.
        """
        self.upstream = upstream

    def first_piece(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()
            self.metrics.time_to_first_token.labels(self.protocol).observe(
                self.first_token - self.started
            )

    def answered(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.outcome = "ok"
        self.tokens(prompt_tokens, completion_tokens)

    def tokens(self, prompt_tokens: int, completion_tokens: int) -> None:
        """The tokens the ask cost (a cancelled ask's partial turn counts too)."""
        self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens

    def failed(self, exc: BaseException) -> None:
        """Classify the exception that ended the ask."""
        if self.outcome == "ok" and is_cancellation(exc):
            return  # closed after its End (a whole-answer consumer): answered and stored
        if isinstance(exc, ChatError):
            self.outcome = exc.code
        elif is_cancellation(exc):
            self.outcome = CANCELLED
        else:
            self.outcome = InternalError.code

    def close(self) -> None:
        """Write the access line and the metrics (once, when the ask has ended)."""
        duration = time.perf_counter() - self.started
        metrics = self.metrics
        metrics.active_streams.labels(self.protocol).dec()
        metrics.asks.labels(self.protocol, self.outcome).inc()
        metrics.duration.labels(self.protocol).observe(duration)
        metrics.tokens.labels("prompt").inc(self.prompt_tokens)
        metrics.tokens.labels("completion").inc(self.completion_tokens)
        if self.upstream is not None and self.first_token is not None:
            metrics.upstream_time_to_first_token.labels(self.upstream).observe(
                self.first_token - self.started
            )
        ttft_ms = (
            None if self.first_token is None else round((self.first_token - self.started) * 1000, 1)
        )
        fields = {
            "request_id": self.request_id,
            "protocol": self.protocol,
            "conversation_id": self.conversation_id,
            "key": self.key_name or "-",
            "upstream": self.upstream or "-",
            "outcome": self.outcome,
            "ttft_ms": ttft_ms,
            "duration_ms": round(duration * 1000, 1),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }
        access_log.info(
            "ask %s",
            " ".join(f"{name}={'-' if value is None else value}" for name, value in fields.items()),
            extra={"access": fields},
        )


def record_for(metrics: Metrics, caller: Caller, conversation_id: str) -> AskRecord:
    """The record of an ask by ``caller`` (``conversation_id`` as shown in the access line)."""
    return AskRecord(
        metrics,
        protocol=caller.protocol,
        request_id=caller.request_id,
        conversation_id=conversation_id,
        key_name=caller.key_name,
    )


def record_refusal(
    metrics: Metrics,
    error: ChatError,
    *,
    protocol: str,
    request_id: str,
    conversation_id: str,
    key_name: str | None,
) -> None:
    """Account for an ask refused before it was answered: its access line and its metrics.

    The line and the counters are those of an ask that failed with ``error``
    at once (outcome ``error.code``, no tokens).
    """
    record = AskRecord(
        metrics,
        protocol=protocol,
        request_id=request_id,
        conversation_id=conversation_id,
        key_name=key_name,
    )
    record.failed(error)
    record.close()
