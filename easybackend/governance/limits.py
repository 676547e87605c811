"""The limits of a key (SPEC §14): requests and tokens per minute, token budgets per UTC day
and month, and requests per minute of each end user within a key (``USER_RPM``).

**Where they are checked.** Once, in the core, for every protocol: an ask
(:meth:`ChatService.ask`) and a relayed ``/v1`` request (``chat/relay.py``)
call :meth:`Limits.admit` after their input and model are checked and before
anything is sent upstream, and :meth:`Limits.charge` with the tokens they
cost when they end. A refused ask raises :class:`~easybackend.errors.RateLimited`
(``rate_limited``) or :class:`~easybackend.errors.BudgetExhausted`
(``budget_exhausted``), each with ``retry_after`` (seconds), which every
transport sends: HTTP 429 and ``Retry-After``, gRPC ``RESOURCE_EXHAUSTED`` and
``retry-after`` metadata, WebSocket ``retry_after``, ``/v1`` OpenAI's 429. The
refusal reaches the access line and the metrics as every failed ask does, and
:attr:`Metrics.limit_refusals` counts it by key name and limit.

**Windows (rpm, tpm, USER_RPM): GCRA.** Each window is one number, its
*theoretical arrival time* ``tat``: a request costs ``60 / limit`` seconds, and
it is taken when ``max(tat, now) + cost - now <= 60``, which moves ``tat`` by
the cost. So a key with ``rpm`` 60 may send 60 requests at once, then one a
second: at most ``rpm`` at once, refilled at ``rpm`` per minute, never more
than twice ``rpm`` in any one minute. A refused request changes nothing and
is told how long until it would be taken. ``tpm`` is the same bucket counted
in tokens, whose cost is known only once the answer ends: an ask is taken
while the key's bucket has room for one more token, and its tokens (prompt and
completion) are added when it ends, so one large answer can overdraw the
bucket, and the key's next asks wait until it has drained. ``USER_RPM`` counts
each ``user`` of a key (the optional end-user id of an ask) apart.

**Budgets (tokens_per_day, tokens_per_month).** The tokens of a key's asks
(prompt + completion, as stored with their turns, and the relay's as the
provider reported them) in the current UTC day and month. An ask is refused
once the budget is spent; ``retry_after`` is the time until the next UTC
midnight (or the first of the next month). **An answer in progress when the
budget runs out is allowed to finish**: its tokens count, the asks after it
are refused.

**Across instances.** With SQLite (one process owns the database) the windows
and the spent budgets are kept in this process: an ask costs no database
round trip for them; the usage is written to ``key_usage`` in batches, every
:data:`FLUSH_SECONDS` and at shutdown, and what the keys spent in a UTC day
and month is read from it once, by the first ask of that day that has a
budget (a restart, or a new day, loses nothing). With
PostgreSQL every instance shares them: the windows are rows of
``rate_windows`` taken with one atomic upsert each (two instances taking the
same window at once are served one after the other), and the budgets are
read from ``key_usage``, which each ask of a key with a budget or ``tpm``
adds to when it ends — one round trip before an ask that has limits, one
after it. The usage of the other asks is written in batches, as with SQLite;
a key with no limit, asking without ``user`` (or no ``USER_RPM``), costs no
round trip at all.

**Errors.** :meth:`Limits.admit` raises RateLimited, BudgetExhausted,
InvalidInput (a ``user`` that is no short text) or StorageUnavailable (the
shared windows cannot be read: the ask is refused rather than let through
unchecked). :meth:`Limits.charge` never raises for the database: usage that
cannot be written is kept and written by the next flush (logged once).

**Cancellation.** :meth:`Limits.admit` on PostgreSQL is one transaction that,
once started, finishes in its worker thread (a cancelled ask may so have
taken its windows). :meth:`Limits.charge` is meant to be shielded by its
caller (the core shields it): the usage of a cancelled ask counts too.
"""

from __future__ import annotations

import calendar
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import trio

from ..errors import BudgetExhausted, InvalidInput, RateLimited, StorageUnavailable
from ..metrics import Metrics
from ..storage.sql_usage import Reads, UsageRow, WindowFull
from .keys import Grant

log = logging.getLogger("easybackend.limits")

PERIOD = 60.0  # seconds: the minute of rpm, tpm and USER_RPM
FLUSH_SECONDS = 1.0  # between two writes of the usage kept in this process
PRUNE_SECONDS = 60.0  # between two sweeps of the windows that have emptied
MAX_USER = 512  # characters of an end-user id (OpenAI's limit on ``user``)
MAX_KEPT_WINDOWS = 100_000  # windows kept in this process before emptied ones are dropped

# The limits, as refusals, metrics and the docs name them.
RPM, TPM, USER_RPM = "rpm", "tpm", "user_rpm"
PER_DAY, PER_MONTH = "tokens_per_day", "tokens_per_month"


class UsageTable(Protocol):
    """What the limits need of a store (:class:`~easybackend.storage.sql_store.SQLStore`).

    Every method raises StorageUnavailable when the database fails.
    """

    async def add_usage(self, rows: Sequence[UsageRow]) -> None:
        """Add the rows' figures to ``key_usage``, in one transaction."""
        ...

    async def usage_rows(
        self, key_name: str | None, first_day: str, last_day: str
    ) -> list[UsageRow]:
        """The usage of one key (None: all) from ``first_day`` to ``last_day``."""
        ...

    async def spent(self, key_name: str | None, day: str, month: str) -> list[tuple[str, int, int]]:
        """(key name, tokens of ``day``, tokens of ``month``) of one key (None: all)."""
        ...

    async def admit_windows(
        self,
        peek: Sequence[str],
        budget: tuple[str, str, str] | None,
        go_on: Callable[[dict[str, float | None], tuple[int, int] | None], bool],
        take: Sequence[tuple[str, float, float]],
        now: float,
    ) -> Reads | None:
        """:func:`easybackend.storage.sql_usage.admit` in one transaction (raises WindowFull)."""
        ...

    async def charge_usage(
        self, rows: Sequence[UsageRow], windows: Sequence[tuple[str, float]], now: float
    ) -> None:
        """Add usage and charge windows ((name, seconds)), in one transaction."""
        ...

    async def give_back_windows(self, windows: Sequence[tuple[str, float]]) -> None:
        """Take each window's cost (name, seconds) off its time, in one transaction."""
        ...

    async def prune_windows(self, now: float) -> int:
        """Delete the shared windows that have emptied."""
        ...


def day_of(now: float) -> str:
    """The UTC day of ``now``: ``YYYY-MM-DD``."""
    return time.strftime("%Y-%m-%d", time.gmtime(now))


def month_of(now: float) -> str:
    """The UTC month of ``now``: ``YYYY-MM``."""
    return time.strftime("%Y-%m", time.gmtime(now))


def next_day(now: float) -> float:
    """The next UTC midnight after ``now`` (epoch seconds)."""
    moment = time.gmtime(now)
    return calendar.timegm((moment.tm_year, moment.tm_mon, moment.tm_mday, 0, 0, 0)) + 86400.0


def next_month(now: float) -> float:
    """00:00 UTC on the first day of the month after ``now``'s (epoch seconds)."""
    moment = time.gmtime(now)
    year, month = (
        (moment.tm_year + 1, 1) if moment.tm_mon == 12 else (moment.tm_year, moment.tm_mon + 1)
    )
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


def checked_user(user: object, field: str = "user") -> str | None:
    """The end-user id of an ask: None, or 1-MAX_USER characters of text; raises InvalidInput."""
    if user is None:
        return None
    if not isinstance(user, str) or not user or len(user) > MAX_USER or not user.isprintable():
        raise InvalidInput(
            f"{field} must be a string of 1-{MAX_USER} printable characters (an end-user id)",
            param=field,
        )
    return user


@dataclasses.dataclass(frozen=True, slots=True)
class _Window:
    """One window of an ask: its name, its limit, and what the ask costs of it (seconds)."""

    name: str
    limit: str  # RPM, TPM or USER_RPM
    per_minute: int

    @property
    def cost(self) -> float:
        """Seconds one request (or token) moves the window: 60 / its limit."""
        return PERIOD / self.per_minute

    def wait(self, tat: float | None, now: float, cost: float | None = None) -> float:
        """Seconds until the window has room for ``cost`` (default one unit); 0 if it has now."""
        start = now if tat is None or tat < now else tat
        over = start + (self.cost if cost is None else cost) - now - PERIOD
        return over if over > 0 else 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class _Plan:
    """What an ask must pass: windows to take, the tokens window to peek at, the budgets."""

    key: str
    take: tuple[_Window, ...]  # rpm of the user, then of the key: taken together or not at all
    tpm: _Window | None
    per_day: int | None
    per_month: int | None

    @property
    def budgeted(self) -> bool:
        return self.per_day is not None or self.per_month is not None


@dataclasses.dataclass(frozen=True, slots=True)
class Ticket:
    """An admitted ask: whose usage it is, and the tokens window its tokens go to."""

    key: str  # the key's name, "" with keys off
    tpm: _Window | None = None
    named: bool = False  # the ask presented a key (its tokens are exported by key name)
    budgeted: bool = False  # the key has a budget: its usage is counted at once (shared)
    taken: tuple[tuple[str, float], ...] = ()  # the windows taken (name, seconds), to give back


class Limits:
    """The windows, budgets and usage of one server (see the module docstring).

    ``shared``: the windows and budgets live in the database (PostgreSQL), else
    in this process. ``clock`` (epoch seconds) may be replaced, in tests.
    """

    def __init__(
        self, table: UsageTable, metrics: Metrics, *, user_rpm: int | None, shared: bool
    ) -> None:
        self.table = table
        self.metrics = metrics
        self.user_rpm = user_rpm
        self.shared = shared
        self.clock: Callable[[], float] = time.time
        self._tat: dict[str, float] = {}  # this process's windows (not shared)
        self._spent: dict[tuple[str, str], int] = {}  # (key, day or month) → tokens (not shared)
        self._pending: dict[tuple[str, str, str], list[int]] = {}  # usage not yet written
        self._loaded: set[str] = set()  # the days and months _spent holds in full (not shared)
        self._io = trio.Lock()  # a flush and a read of what was spent, one at a time
        self._forgot = 0.0  # when emptied windows were last forgotten (not shared)
        self._flush_failed = False

    # -- admission ---------------------------------------------------------------------------

    def _plan(self, grant: Grant | None, key_name: str | None, user: str | None) -> _Plan | None:
        key = key_name or ""
        take: list[_Window] = []
        if user is not None and self.user_rpm is not None:
            take.append(_Window(f"user:{key}:{user}", USER_RPM, self.user_rpm))
        if grant is None:
            return _Plan(key, tuple(take), None, None, None) if take else None
        if grant.rpm is not None:
            take.append(_Window(f"rpm:{key}", RPM, grant.rpm))
        tpm = _Window(f"tpm:{key}", TPM, grant.tpm) if grant.tpm is not None else None
        plan = _Plan(key, tuple(take), tpm, grant.tokens_per_day, grant.tokens_per_month)
        return plan if take or tpm or plan.budgeted else None

    async def admit(self, grant: Grant | None, key_name: str | None, user: str | None) -> Ticket:
        """Take the ask's windows, or refuse it (see the module docstring for what raises).

        ``grant`` is the key's as it stands now (None with keys off), ``user``
        the ask's end-user id, already checked (:func:`checked_user`).
        """
        key = key_name or ""
        plan = self._plan(grant, key_name, user)
        if plan is None:
            return Ticket(key, named=key_name is not None)
        now = self.clock()
        if self.shared:
            await self._admit_shared(plan, now)
        else:
            if plan.budgeted:
                await self._load_spent(now)
            self._admit_here(plan, now)
        taken = tuple((window.name, window.cost) for window in plan.take)
        return Ticket(
            key, plan.tpm, named=key_name is not None, budgeted=plan.budgeted, taken=taken
        )

    async def give_back(self, ticket: Ticket) -> None:
        """Give back the windows ``ticket`` took: its ask was refused after it was admitted,
        before anything was sent upstream (an unknown parent turn, the conversation's own
        model not allowed), so it costs the key nothing. A database failure is logged, not
        raised (the ask is refused anyway); a cancelled call may have given them back."""
        if not ticket.taken:
            return
        if not self.shared:
            for name, cost in ticket.taken:
                if name in self._tat:
                    self._tat[name] -= cost
            return
        try:
            await self.table.give_back_windows(ticket.taken)
        except StorageUnavailable as exc:
            log.warning("giving back the windows of a refused ask failed: %s", exc.message)

    async def _load_spent(self, now: float) -> None:
        """Read what every key spent in ``now``'s UTC day and month, once per day (not shared).

        What is read is the written usage plus what this process keeps to write, so an ask
        charged before (or while) the period is read is counted once. Raises
        StorageUnavailable (the next budgeted ask tries again).
        """
        day, month = day_of(now), month_of(now)
        if day in self._loaded:
            return
        async with self._io:
            if day in self._loaded:
                return
            fresh: dict[tuple[str, str], int] = {}
            for key, today, this_month in await self.table.spent(None, day, month):
                fresh[(key, day)], fresh[(key, month)] = today, this_month
            for (key, when, _), (_, prompt, completion) in self._pending.items():
                for period in (day, month):
                    if when.startswith(period):
                        fresh[(key, period)] = fresh.get((key, period), 0) + prompt + completion
            self._spent = {
                where: tokens
                for where, tokens in self._spent.items()
                if where[1] not in (day, month)
            }
            self._spent.update(fresh)
            self._loaded.update((day, month))

    def _admit_here(self, plan: _Plan, now: float) -> None:
        """This process's windows: every check first, then the windows taken together."""
        times = {window.name: self._tat.get(window.name) for window in plan.take}
        if plan.tpm is not None:
            times[plan.tpm.name] = self._tat.get(plan.tpm.name)
        used = None
        if plan.budgeted:
            used = (
                self._spent.get((plan.key, day_of(now)), 0),
                self._spent.get((plan.key, month_of(now)), 0),
            )
        refusals = self._refusals(plan, times, used, now, windows=True)
        if refusals:
            self._refuse(plan, refusals, now)
        for window in plan.take:
            tat = times[window.name]
            self._tat[window.name] = (now if tat is None or tat < now else tat) + window.cost
        if len(self._tat) > MAX_KEPT_WINDOWS and now - self._forgot >= FLUSH_SECONDS:
            self._forget_empty(now)  # many users at once: at most one sweep a second

    async def _admit_shared(self, plan: _Plan, now: float) -> None:
        """The database's windows: one transaction (see :func:`~..storage.sql_usage.admit`)."""
        peek = [plan.tpm.name] if plan.tpm is not None else []
        budget = (plan.key, day_of(now), month_of(now)) if plan.budgeted else None

        def go_on(times: dict[str, float | None], used: tuple[int, int] | None) -> bool:
            return not self._refusals(plan, times, used, now, windows=False)

        take = [(window.name, window.cost, PERIOD) for window in plan.take]
        try:
            reads = await self.table.admit_windows(peek, budget, go_on, take, now)
        except WindowFull as full:
            window = next(window for window in plan.take if window.name == full.name)
            refusals = [(window.limit, window.wait(full.tat, now))]
        else:
            if reads is None:
                return
            refusals = self._refusals(plan, *reads, now, windows=False)
        self._refuse(plan, refusals, now)

    def _refusals(
        self,
        plan: _Plan,
        times: dict[str, float | None],
        used: tuple[int, int] | None,
        now: float,
        *,
        windows: bool,
    ) -> list[tuple[str, float]]:
        """(limit, seconds to wait) of each check the ask fails (``windows``: those it takes too)."""
        failed: list[tuple[str, float]] = []
        if used is not None:
            if plan.per_month is not None and used[1] >= plan.per_month:
                failed.append((PER_MONTH, next_month(now) - now))
            if plan.per_day is not None and used[0] >= plan.per_day:
                failed.append((PER_DAY, next_day(now) - now))
        if plan.tpm is not None and (wait := plan.tpm.wait(times.get(plan.tpm.name), now)) > 0:
            failed.append((TPM, wait))
        if windows:
            for window in plan.take:
                if (wait := window.wait(times.get(window.name), now)) > 0:
                    failed.append((window.limit, wait))
        return failed

    def _refuse(self, plan: _Plan, refusals: list[tuple[str, float]], now: float) -> None:
        """Raise the refusal of ``refusals``: a budget's if any, else the window's; ``retry_after``
        is the longest wait (an ask retried then passes every check that failed now)."""
        limit, wait = max(refusals, key=lambda refusal: refusal[1])
        budgets = [refusal for refusal in refusals if refusal[0] in (PER_DAY, PER_MONTH)]
        self.metrics.limit_refusals.labels(plan.key, limit).inc()
        shown = f"{wait:.1f}" if wait < 10 else f"{wait:.0f}"
        if budgets:
            name = PER_MONTH if any(budget[0] == PER_MONTH for budget in budgets) else PER_DAY
            amount, period = (
                (plan.per_month, "UTC month") if name == PER_MONTH else (plan.per_day, "UTC day")
            )
            raise BudgetExhausted(
                f"this key has used its {name} ({amount} tokens this {period}); retry in {shown} s",
                retry_after=wait,
                limit=name,
            )
        raise RateLimited(_window_message(plan, limit, shown), retry_after=wait, limit=limit)

    # -- usage -------------------------------------------------------------------------------

    async def charge(self, ticket: Ticket, model: str, prompt: int, completion: int) -> None:
        """Count an ended ask's tokens: its key's usage (by UTC day and model), its budgets, its
        tokens window, the per-key metric. Never raises for the database (see the module
        docstring); its caller shields it from cancellation."""
        now = self.clock()
        total = prompt + completion
        if ticket.named:
            self.metrics.key_tokens.labels(ticket.key, "prompt").inc(prompt)
            self.metrics.key_tokens.labels(ticket.key, "completion").inc(completion)
        row = (ticket.key, day_of(now), model, 1, prompt, completion)
        if not self.shared:
            self._keep([row])
            for period in (day_of(now), month_of(now)):
                self._spent[(ticket.key, period)] = self._spent.get((ticket.key, period), 0) + total
            if ticket.tpm is not None and total:
                tat = self._tat.get(ticket.tpm.name)
                start = now if tat is None or tat < now else tat
                self._tat[ticket.tpm.name] = start + total * ticket.tpm.cost
            return
        if ticket.tpm is None and not ticket.budgeted:
            self._keep([row])  # nobody waits for it: written with the next flush
            return
        windows = [(ticket.tpm.name, total * ticket.tpm.cost)] if ticket.tpm and total else []
        try:
            await self.table.charge_usage([row], windows, now)
        except StorageUnavailable as exc:
            self._keep([row])  # written by the next flush; the tokens window misses it
            log.warning("cannot write an ask's usage now (it is kept for later): %s", exc.message)

    def _keep(self, rows: Sequence[UsageRow]) -> None:
        for key, day, model, requests, prompt, completion in rows:
            kept = self._pending.setdefault((key, day, model), [0, 0, 0])
            kept[0] += requests
            kept[1] += prompt
            kept[2] += completion

    async def flush(self) -> None:
        """Write the usage kept in this process. Raises StorageUnavailable (the usage is kept).

        Waits for a write already under way (the background task's), so a read that flushes
        first sees every usage this process counted before it.
        """
        async with self._io:
            if not self._pending:
                return
            rows = [(*where, *figures) for where, figures in self._pending.items()]
            self._pending = {}
            try:
                await self.table.add_usage(rows)  # type: ignore[arg-type]
            except BaseException:
                self._keep(rows)  # type: ignore[arg-type]
                raise

    async def spent_now(self, key_name: str) -> tuple[int, int]:
        """The tokens ``key_name`` ("" with keys off) spent today and this month (UTC): the
        written usage and what this process keeps to write, each counted once, in both
        periods. Raises StorageUnavailable."""
        now = self.clock()
        day, month = day_of(now), month_of(now)
        if not self.shared:
            await self._load_spent(now)
            return self._spent.get((key_name, day), 0), self._spent.get((key_name, month), 0)
        async with self._io:  # no flush moves kept usage into the table between the two reads
            found = await self.table.spent(key_name, day, month)
            today, this_month = (found[0][1], found[0][2]) if found else (0, 0)
            for (key, when, _), (_, prompt, completion) in self._pending.items():
                if key == key_name and when.startswith(month):
                    this_month += prompt + completion
                    if when == day:
                        today += prompt + completion
        return today, this_month

    async def usage_rows(
        self, key_name: str | None, first_day: str, last_day: str
    ) -> list[UsageRow]:
        """The stored usage (what this process keeps written first). Raises StorageUnavailable."""
        await self.flush()
        return await self.table.usage_rows(key_name, first_day, last_day)

    # -- the background task -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Report started, then write the usage kept every FLUSH_SECONDS and forget emptied
        windows (and past periods) every PRUNE_SECONDS, until cancelled.

        On cancellation (the server stopping, after its asks ended) the usage kept is
        written one last time, shielded, for at most FLUSH_SECONDS * 5.
        """
        task_status.started()
        pruned = self.clock()
        try:
            while True:
                await trio.sleep(FLUSH_SECONDS)
                await self._flush_logged()
                now = self.clock()
                if now - pruned >= PRUNE_SECONDS:
                    pruned = now
                    await self._prune(now)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(FLUSH_SECONDS * 5):
                await self._flush_logged()

    async def _flush_logged(self) -> None:
        try:
            await self.flush()
        except StorageUnavailable as exc:
            if not self._flush_failed:
                log.warning("cannot write the usage (kept for the next try): %s", exc.message)
            self._flush_failed = True
            return
        if self._flush_failed:
            log.info("the usage can be written again")
            self._flush_failed = False

    async def _prune(self, now: float) -> None:
        """Forget emptied windows and past periods (here), or emptied shared windows."""
        if not self.shared:
            self._forget_empty(now)
            current = {day_of(now), month_of(now)}
            self._spent = {
                where: tokens for where, tokens in self._spent.items() if where[1] in current
            }
            self._loaded &= current
            return
        try:
            await self.table.prune_windows(now)
        except StorageUnavailable:
            pass  # the next sweep tries again

    def _forget_empty(self, now: float) -> None:
        self._forgot = now
        self._tat = {name: tat for name, tat in self._tat.items() if tat > now}


def _window_message(plan: _Plan, limit: str, shown: str) -> str:
    """What a refusal by a window says (never the end user's id: it may be personal)."""
    window = next((w for w in (*plan.take, plan.tpm) if w is not None and w.limit == limit), None)
    count = window.per_minute if window is not None else 0
    if limit == USER_RPM:
        return (
            f"this end user (user) of the key has sent its {count} requests per minute"
            f" (USER_RPM); retry in {shown} s"
        )
    if limit == TPM:
        return f"this key has used its {count} tokens per minute (tpm); retry in {shown} s"
    return f"this key has sent its {count} requests per minute (rpm); retry in {shown} s"
