"""Per-key fair locks: one holder per key at a time, waiters served in arrival order."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Hashable

import trio


class KeyedLock:
    """A trio.Lock per key, created on first use and dropped when nobody holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[trio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        """Hold the lock of ``key`` for the body of the ``async with``.

        trio.Lock is fair, so waiters get it in the order they asked. A task
        cancelled while waiting leaves the queue without taking the lock.
        """
        lock, users = self._locks.get(key) or (trio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)

    def __contains__(self, key: Hashable) -> bool:
        """Someone holds or awaits the lock of ``key`` (a plain dict lookup: safe from a worker
        thread, which sees the state of an instant)."""
        return key in self._locks
