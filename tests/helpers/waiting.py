"""Bounded polling of state that lives in another process, thread or file."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` until it holds; fails the test after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll the awaitable ``check`` (a read through the server's own API, say) until it holds;
    fails the test after ``timeout`` seconds, the read in progress included."""
    with trio.fail_after(timeout):
        while not await check():
            await trio.sleep(0.005)
