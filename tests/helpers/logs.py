"""What the server logs and exports: the log-leak watch, access lines, metrics.

Every key the tests use contains SECRET; prompts that must never be logged
contain PROMPT-SENTINEL. ``LOG_WATCH`` (installed on the root logger by
conftest.py) keeps each INFO-and-above line that holds either, in this
process; conftest.py fails the run when any process of it (a pytest-xdist
worker included) saw one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import httpx2
import trio
from prometheus_client.parser import text_string_to_metric_families

FORBIDDEN_IN_LOGS = ("SECRET", "PROMPT-SENTINEL")

ACCESS_FIELDS = {
    "request_id",
    "protocol",
    "conversation_id",
    "key",
    "upstream",
    "outcome",
    "ttft_ms",
    "duration_ms",
    "prompt_tokens",
    "completion_tokens",
}


class _LogWatch(logging.Handler):
    """Keeps the INFO-and-above log lines that hold a key or a sentinel prompt."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.leaks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        if any(word in line for word in FORBIDDEN_IN_LOGS):
            self.leaks.append(f"{record.name} {record.levelname}: {line[:300]}")


LOG_WATCH = _LogWatch()


# -- access lines -------------------------------------------------------------------------------


class _Catch(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclasses.dataclass
class AccessLines:
    handler: _Catch

    @property
    def records(self) -> list[logging.LogRecord]:
        return list(self.handler.records)

    @property
    def lines(self) -> list[dict[str, Any]]:
        """The structured fields of every access line so far."""
        return [record.access for record in self.handler.records]  # type: ignore[attr-defined]

    def by_request_id(self, request_id: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["request_id"] == request_id]

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Wait until at least ``count`` access lines were written; returns them all."""
        with trio.fail_after(timeout):
            while len(self.handler.records) < count:
                await trio.sleep(0.005)
        return self.lines


@contextlib.contextmanager
def capture_access() -> Iterator[AccessLines]:
    """Catch the access lines (logger ``easybackend.access``) written inside the block."""
    handler = _Catch()
    logger = logging.getLogger("easybackend.access")
    logger.addHandler(handler)
    try:
        yield AccessLines(handler)
    finally:
        logger.removeHandler(handler)


def check_access_line(line: dict[str, Any]) -> None:
    """Every field is there, with the right kind of value."""
    assert set(line) == ACCESS_FIELDS, line
    assert isinstance(line["request_id"], str) and line["request_id"], line
    assert line["protocol"] in ("http", "sse", "ws", "grpc", "openai", "summary", "title"), line
    assert isinstance(line["duration_ms"], int | float) and line["duration_ms"] >= 0, line
    assert line["ttft_ms"] is None or 0 <= line["ttft_ms"] <= line["duration_ms"], line
    assert isinstance(line["prompt_tokens"], int) and isinstance(line["completion_tokens"], int)


# -- metrics ------------------------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    """The value of the sample ``name`` with exactly ``labels`` (0 when it is not exported yet)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


async def scrape(client: httpx2.AsyncClient) -> str:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain"), response.headers
    return response.text
