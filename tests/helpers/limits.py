"""The limits from the tests' side: a clock the tests move, set on a server's limits.

A server's windows and budgets read ``service.limits.clock`` (epoch seconds);
tests replace it with a :class:`Clock` so that a window fills, refills and a
UTC day turns when the test says, never by waiting.
"""

from __future__ import annotations

import calendar
import time

from .servers import Server


def utc(text: str) -> float:
    """``YYYY-MM-DDTHH:MM:SS`` (UTC) as epoch seconds."""
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%S")))


class Clock:
    """A clock that stands still until moved."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def freeze(server: Server, at: float | None = None) -> Clock:
    """Stop ``server``'s limits clock at ``at`` (default: now); the clock, to move it."""
    clock = Clock(time.time() if at is None else at)
    assert server.running.service is not None
    server.running.service.limits.clock = clock
    return clock
