"""Prometheus metrics, in a registry of the server's own (served at ``/metrics``).

One :class:`Metrics` per server: several servers in one process (tests) do
not share counters. The chat core records asks; the upstream client records
its errors and retries; transports only expose :meth:`Metrics.render`.

The ``upstream`` label is an upstream's configured name (``default`` for the
one ``OPENAI_BASE_URL`` names): a bounded set, never a key or a URL.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Every metric EasyBackend exports."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.asks = Counter(
            "easybackend_asks",
            "Asks answered, by protocol and outcome (ok, cancelled, or the error code)",
            ["protocol", "outcome"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "easybackend_time_to_first_token_seconds",
            "From the ask's arrival to the first piece of the answer",
            ["protocol"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.duration = Histogram(
            "easybackend_ask_duration_seconds",
            "From the ask's arrival to its end (answer stored, error or cancellation)",
            ["protocol"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "easybackend_tokens",
            "Tokens sent to (prompt) and received from (completion) the model",
            ["direction"],
            registry=self.registry,
        )
        # Key names only (API_KEYS and the key table: bounded), never a secret or an end user.
        self.key_tokens = Counter(
            "easybackend_key_tokens",
            "Tokens of the asks of each key, by key name and direction (prompt, completion)",
            ["key", "direction"],
            registry=self.registry,
        )
        self.limit_refusals = Counter(
            "easybackend_limit_refusals",
            "Asks refused by a key's limit, by key name and limit (rpm, tpm, user_rpm,"
            " tokens_per_day, tokens_per_month)",
            ["key", "limit"],
            registry=self.registry,
        )
        self.active_streams = Gauge(
            "easybackend_active_streams",
            "Asks in progress, by protocol",
            ["protocol"],
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "easybackend_upstream_errors",
            "Failed calls to the model provider, by kind (the error code), retried ones included",
            ["kind"],
            registry=self.registry,
        )
        self.upstream_retries = Counter(
            "easybackend_upstream_retries",
            "Calls to the model provider repeated after a transient failure",
            registry=self.registry,
        )
        self.upstream_requests = Counter(
            "easybackend_upstream_requests",
            "Calls to each upstream, by outcome (ok, cancelled, or the error code); a call"
            " failed over to another upstream or key counts as one failed call",
            ["upstream", "outcome"],
            registry=self.registry,
        )
        self.upstream_time_to_first_token = Histogram(
            "easybackend_upstream_time_to_first_token_seconds",
            "From the ask's arrival to the first piece of the answer, by the upstream that answered",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.upstream_cool_downs = Counter(
            "easybackend_upstream_cool_downs",
            "Times a key of each upstream was set aside for a while after a transient failure",
            ["upstream"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)
