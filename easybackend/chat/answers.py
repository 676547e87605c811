"""Answers that survive a dropped connection (SPEC §18): numbered events, followers, background.

Every answer's events are numbered from 1: a :class:`~.service.Start` (seq 1,
the turn the answer will be stored as), its pieces, then its end. While an
answer runs, :class:`AnswerLog` holds those events (at most the answer's
``MAX_ANSWER_CHARS`` of text), so any number of clients may follow it from
any point (:meth:`AnswerLog.follow`); once its turn is stored, the log is
dropped and a late follower gets the stored turn replayed with the same
numbers (the turn keeps the lengths of its pieces). An answer that ended
with nothing stored (it failed, or was cancelled before its first piece) is
kept in :class:`AnswerLogs` for :data:`ENDED_KEPT_SECONDS` (at most
:data:`ENDED_KEPT`), so a poll or a reattach still sees how it ended.

:class:`BackgroundAnswers` runs the asks marked ``background``: each in a task
of the service's own nursery, consuming the answer itself, so the answer goes
on (and is stored whole) whatever becomes of the client that asked; the
client only follows its log. A shutdown gives them ``SHUTDOWN_GRACE`` like any
answer, then cancels them (stored as ``cancelled``). Logs are known to this
process only (see docs/deploy.md for several instances).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from ..errors import ChatError, ShuttingDown, TooManyRequests, unexpected

if TYPE_CHECKING:
    from .events import Event

log = logging.getLogger("easybackend.answers")

ENDED_KEPT = 200  # answers that ended with nothing stored, kept for polls and reattaches
ENDED_KEPT_SECONDS = 600.0
MAX_BACKGROUND = 1000  # background answers in progress at once, in this process

# An answer's states, as the native API and the Responses API show them.
IN_PROGRESS = "in_progress"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"


class AnswerLog:
    """The numbered events of one answer, for whoever follows it (see the module docstring)."""

    def __init__(self, owner: str, conversation_id: str, turn_id: str, background: bool) -> None:
        self.owner = owner
        self.conversation_id = conversation_id
        self.turn_id = turn_id
        self.background = background
        self.events: list[Event] = []  # events[i] has seq i + 1
        self.state = IN_PROGRESS
        self.error: ChatError | None = None  # how it failed (state FAILED)
        self.ended_at: float | None = None
        self._changed: trio.Event | None = None  # set at the next change; None: nobody waits

    def add(self, event: Event) -> None:
        """Append the answer's next event (the core gives them in order, from seq 1)."""
        self.events.append(event)
        self._wake()

    def end(self, state: str, error: ChatError | None = None) -> None:
        """The answer ended: ``state`` COMPLETED, FAILED (``error``) or CANCELLED."""
        self.state = state
        self.error = error
        self.ended_at = time.time()
        self._wake()

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    @property
    def text(self) -> str:
        """The answer so far."""
        return "".join(getattr(event, "text", "") for event in self.events[1:])

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def follow(self, after: int = 0) -> AsyncIterator[Event]:
        """The events after seq ``after``, as they come, until the answer's end.

        Raises the answer's ChatError if it failed (after its events). An answer
        cancelled once its partial turn was stored ends with an End of finish
        reason ``cancelled``; one cancelled with nothing stored just ends.
        Cancelling the follower changes nothing for the answer.
        """
        sent = max(0, after)
        while True:
            while sent < len(self.events):
                sent += 1
                yield self.events[sent - 1]
            if self.ended:
                if self.error is not None:
                    raise self.error
                return
            if self._changed is None:
                self._changed = trio.Event()
            await self._changed.wait()


class AnswerLogs:
    """The logs of the answers in progress in this process, and those that ended unstored."""

    def __init__(self) -> None:
        self._running: dict[tuple[str, str], AnswerLog] = {}
        self._ended: collections.OrderedDict[tuple[str, str], AnswerLog] = collections.OrderedDict()

    def open(self, owner: str, conversation_id: str, turn_id: str, background: bool) -> AnswerLog:
        answer = AnswerLog(owner, conversation_id, turn_id, background)
        self._running[(owner, turn_id)] = answer
        return answer

    def close(self, answer: AnswerLog, *, stored: bool) -> None:
        """The answer ended; ``stored``: its turn is stored (from now on it is replayed from
        there), else it is kept a while as it ended."""
        key = (answer.owner, answer.turn_id)
        if self._running.get(key) is answer:
            del self._running[key]
        if not stored:
            self._ended[key] = answer
            self._ended.move_to_end(key)
            self._forget_old()

    def background_running(self) -> dict[tuple[str, str], AnswerLog]:
        """The background answers in progress in this process, by (owner, turn id)."""
        return {key: log for key, log in self._running.items() if log.background}

    def find(self, owner: str, turn_id: str) -> AnswerLog | None:
        """The owner's answer in progress under ``turn_id``, or one that ended unstored lately."""
        key = (owner, turn_id)
        running = self._running.get(key)
        if running is not None:
            return running
        self._forget_old()
        return self._ended.get(key)

    def _forget_old(self) -> None:
        oldest = time.time() - ENDED_KEPT_SECONDS
        while self._ended and (
            len(self._ended) > ENDED_KEPT or next(iter(self._ended.values())).ended_at < oldest  # type: ignore[operator]
        ):
            self._ended.popitem(last=False)


@dataclasses.dataclass(eq=False)
class _Slot:
    scope: trio.CancelScope
    answer: AnswerLog | None = None


class BackgroundAnswers:
    """The service's nursery of background answers (see the module docstring)."""

    def __init__(self) -> None:
        self._nursery: trio.Nursery | None = None
        self._running: set[_Slot] = set()
        self._idle = trio.Event()
        self._idle.set()
        self.stopping = False
        self.stopped = trio.Event()  # set once run() has ended: no answer runs any more

    async def run(
        self,
        shutdown: trio.Event,
        grace: float,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Hold the nursery the answers run in until ``shutdown`` is set and they are drained
        (:meth:`drain` with ``grace``); cancelled (the server's end), they are cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await shutdown.wait()
                await self.drain(grace)
            finally:
                self._nursery = None
        self.stopped.set()

    async def start(
        self,
        answer: Callable[[Callable[[AnswerLog], None]], Awaitable[Any]],
    ) -> AnswerLog:
        """Run ``answer(started)`` in the nursery; return its log once it calls ``started``.

        ``answer`` consumes an ask to its end and calls ``started(log)`` once the
        ask's first event is in its log. An error before that (the ask was
        refused, the upstream refused it) is raised here and nothing runs on;
        after it, errors end up in the log. Raises ShuttingDown once a shutdown
        began (or nothing runs the nursery), TooManyRequests beyond
        :data:`MAX_BACKGROUND`. Cancelling the caller while it waits cancels
        the answer with it (nothing was handed out yet).
        """
        nursery = self.check()
        slot = _Slot(trio.CancelScope())
        handed = trio.Event()
        failure: list[BaseException] = []

        def started(log: AnswerLog) -> None:
            slot.answer = log
            handed.set()

        async def run() -> None:
            try:
                with slot.scope:
                    await answer(started)
            except Exception as exc:
                if handed.is_set():
                    unexpected(exc, "a background answer")  # the ask's own errors are in its log
                else:
                    failure.append(exc)
            finally:
                self._running.discard(slot)
                if not self._running:
                    self._idle.set()
                handed.set()

        self._running.add(slot)
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        nursery.start_soon(run)
        try:
            await handed.wait()
        except BaseException:
            if slot.answer is None:
                slot.scope.cancel()
            raise
        if slot.answer is None:
            if failure:
                raise failure[0]
            raise ShuttingDown("the server is shutting down")
        return slot.answer

    def check(self) -> trio.Nursery:
        """The nursery a new answer would run in; raises ShuttingDown once a shutdown began
        (or when nothing runs it), TooManyRequests when :data:`MAX_BACKGROUND` are running."""
        nursery = self._nursery
        if nursery is None or self.stopping:
            raise ShuttingDown("the server is shutting down")
        if len(self._running) >= MAX_BACKGROUND:
            raise TooManyRequests(
                f"{MAX_BACKGROUND} background answers are in progress; retry when one ends"
            )
        return nursery

    async def drain(self, grace: float) -> None:
        """Refuse new answers; let those running finish for ``grace`` seconds, then cancel
        them (each stores what it has as ``cancelled``) and return once all have ended."""
        self.stopping = True
        with trio.move_on_after(grace):
            await self._idle.wait()
        for slot in list(self._running):
            slot.scope.cancel()
        await self._idle.wait()
