"""Work off the answer's critical path, in a nursery the chat service owns (DESIGN "Background
work has a parent").

:class:`Background` runs summaries, titles and the expiry sweep. ``app.serve``
starts :meth:`Background.run` in its root nursery before the listeners, so the
work lives as long as the server: during a shutdown's grace jobs go on (an
answer that finishes then may still be summarized), and when the grace ends
the nursery is cancelled with everything else. A job is never a detached task.

Bounded: at most ``BACKGROUND_JOBS`` jobs run at once (the others wait for a
slot), at most :data:`MAX_PENDING` are held (a job offered beyond is dropped:
the trigger comes again with the next turn), and one job per key (a
conversation's summary, its title) is held at a time. A job that fails is
logged and forgotten; it never fails the server or an ask. A service that is
not running (a command, a test of the core alone) takes no job.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable

import trio

log = logging.getLogger("easybackend.background")

MAX_PENDING = 10_000  # jobs held (waiting or running) at most


class Background:
    """The service's nursery for background work (see the module docstring)."""

    def __init__(self, concurrency: int) -> None:
        self._slots = trio.CapacityLimiter(concurrency)
        self._nursery: trio.Nursery | None = None
        self._held: set[Hashable] = set()
        self._loops: list[Callable[[], Awaitable[None]]] = []
        self._scope = trio.CancelScope()
        self._started = False
        self._stopped = trio.Event()

    def add_loop(self, loop: Callable[[], Awaitable[None]]) -> None:
        """Run ``loop`` for as long as :meth:`run` runs (added before it starts)."""
        self._loops.append(loop)

    @property
    def running(self) -> bool:
        return self._nursery is not None

    def held(self, key: Hashable) -> bool:
        """A job of ``key`` is waiting or running."""
        return key in self._held

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the loops and the jobs until cancelled (the server's end cancels it).

        On cancellation (or :meth:`stop`) the jobs in progress are cancelled
        with it (a job waiting for a conversation's lock leaves the queue; a
        model call is closed; a store write once started finishes); nothing is
        detached. Runs once per instance.
        """
        self._started = True
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    for loop in self._loops:
                        nursery.start_soon(self._contained, loop, "loop")
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            self._nursery = None
            self._held.clear()
            self._stopped.set()

    async def stop(self) -> None:
        """Cancel the loops and the jobs, and return once they have all ended (at once if
        :meth:`run` never ran). Further jobs are not taken."""
        self._scope.cancel()
        if self._started:
            await self._stopped.wait()

    def spawn(self, key: Hashable, job: Callable[[], Awaitable[None]], what: str) -> bool:
        """Start ``job`` unless one of ``key`` is held, the queue is full or nothing runs.

        Returns whether it was started. ``what`` names it in the log when it fails.
        """
        nursery = self._nursery
        if nursery is None or key in self._held or len(self._held) >= MAX_PENDING:
            return False
        self._held.add(key)
        nursery.start_soon(self._job, key, job, what)
        return True

    async def _job(self, key: Hashable, job: Callable[[], Awaitable[None]], what: str) -> None:
        try:
            async with self._slots:
                await self._contained(job, what)
        finally:
            self._held.discard(key)

    @staticmethod
    async def _contained(work: Callable[[], Awaitable[None]], what: str) -> None:
        """Await ``work``; an exception is logged, never raised (cancellation is)."""
        try:
            await work()
        except Exception:
            log.exception("background %s failed", what)
