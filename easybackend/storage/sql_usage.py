"""The statements of usage and of the shared rate windows (tables ``key_usage`` and
``rate_windows``, see :mod:`.schema`).

Written like :mod:`.sql`: each function runs inside a transaction its store
opened, with ``?`` placeholders a :class:`~.sql.Dialect` turns into its own,
and raises the driver's errors (the store turns them into
StorageUnavailable). What the rows mean (the windows' arithmetic, budgets,
the grouping of usage) is :mod:`easybackend.governance.limits`'.

``key_usage`` holds one row per key name, UTC day (``YYYY-MM-DD``) and model:
the asks counted and their prompt and completion tokens; ``""`` is the name
of asks made with keys off. ``rate_windows`` holds one row per window (its
name, e.g. ``rpm:bot``) with the window's theoretical arrival time (GCRA: see
the limits module); only PostgreSQL uses it, so that every instance shares it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .sql import Connection, Dialect

# A row of usage: (key_name, day, model, requests, prompt_tokens, completion_tokens).
UsageRow = tuple[str, str, str, int, int, int]

_ADD = (
    "INSERT INTO key_usage (key_name, day, model, requests, prompt_tokens, completion_tokens)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key_name, day, model) DO UPDATE SET"
    " requests = key_usage.requests + excluded.requests,"
    " prompt_tokens = key_usage.prompt_tokens + excluded.prompt_tokens,"
    " completion_tokens = key_usage.completion_tokens + excluded.completion_tokens"
)


def add_usage(dialect: Dialect, db: Connection, rows: Sequence[UsageRow]) -> None:
    """Add each row's figures to the usage of its key, day and model."""
    if len(rows) == 1:
        dialect.execute(db, _ADD, rows[0])
    elif rows:
        dialect.executemany(db, _ADD, rows)


def import_usage(dialect: Dialect, db: Connection, rows: Sequence[UsageRow]) -> int:
    """Store each row whose key, day and model the table does not hold yet (one it holds is
    left as it is, so copying the same rows twice adds nothing); how many were stored."""
    stored = 0
    for row in rows:
        stored += dialect.execute(
            db,
            "INSERT INTO key_usage (key_name, day, model, requests, prompt_tokens,"
            " completion_tokens) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (key_name, day, model) DO NOTHING",
            row,
        ).rowcount
    return stored


def usage_rows(
    dialect: Dialect, db: Connection, key_name: str | None, first_day: str, last_day: str
) -> list[UsageRow]:
    """The usage from ``first_day`` to ``last_day`` (included) of one key (None: every key), by
    key, day and model."""
    query = (
        "SELECT key_name, day, model, requests, prompt_tokens, completion_tokens FROM key_usage"
        " WHERE day >= ? AND day <= ?"
    )
    params: list[Any] = [first_day, last_day]
    if key_name is not None:
        query += " AND key_name = ?"
        params.append(key_name)
    rows = dialect.execute(db, query + " ORDER BY key_name, day, model", params).fetchall()
    return [tuple(row) for row in rows]  # type: ignore[misc]


def spent(
    dialect: Dialect, db: Connection, key_name: str | None, day: str, month: str
) -> list[tuple[str, int, int]]:
    """(key name, tokens on ``day``, tokens in ``month``) of one key (None: every key that used
    any this month). ``month`` is ``YYYY-MM``; ``day`` one of its days."""
    query = (
        "SELECT key_name,"
        " coalesce(sum(CASE WHEN day = ? THEN prompt_tokens + completion_tokens ELSE 0 END), 0),"
        " coalesce(sum(prompt_tokens + completion_tokens), 0)"
        " FROM key_usage WHERE day >= ? AND day <= ?"
    )
    params: list[Any] = [day, f"{month}-01", f"{month}-31"]
    if key_name is not None:
        query += " AND key_name = ?"
        params.append(key_name)
    rows = dialect.execute(db, query + " GROUP BY key_name", params).fetchall()
    return [(name, int(today), int(month_total)) for name, today, month_total in rows]


def window_time(dialect: Dialect, db: Connection, name: str) -> float | None:
    """The window's theoretical arrival time, None when it has no row."""
    row = dialect.execute(db, "SELECT tat FROM rate_windows WHERE name = ?", (name,)).fetchone()
    return float(row[0]) if row is not None else None


def take_window(
    dialect: Dialect, db: Connection, name: str, cost: float, now: float, period: float
) -> float | None:
    """Add ``cost`` seconds to the window if what it then holds stays within ``period`` (GCRA);
    the window's new time, or None when it is full (nothing changed).

    One statement: the row is locked by the upsert, so two instances taking the same
    window at once are served one after the other, each seeing the other's change.
    """
    greatest = dialect.greatest
    row = dialect.execute(
        db,
        "INSERT INTO rate_windows (name, tat) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET"
        f" tat = {greatest}(rate_windows.tat, ?) + ?"
        f" WHERE {greatest}(rate_windows.tat, ?) + ? - ? <= ? RETURNING tat",
        (name, now + cost, now, cost, now, cost, now, period),
    ).fetchone()
    return float(row[0]) if row is not None else None


def charge_window(dialect: Dialect, db: Connection, name: str, cost: float, now: float) -> None:
    """Add ``cost`` seconds to the window, however full it is (the tokens of an ask that ended)."""
    dialect.execute(
        db,
        "INSERT INTO rate_windows (name, tat) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET"
        f" tat = {dialect.greatest}(rate_windows.tat, ?) + ?",
        (name, now + cost, now, cost),
    )


def give_back_windows(
    dialect: Dialect, db: Connection, windows: Sequence[tuple[str, float]]
) -> None:
    """Take ``cost`` seconds off each window (name, cost): an admitted ask that was refused
    before anything was sent gives back what it took."""
    for name, cost in windows:
        dialect.execute(db, "UPDATE rate_windows SET tat = tat - ? WHERE name = ?", (cost, name))


class WindowFull(Exception):
    """Raised by :func:`admit` when a window it takes is full: its transaction rolls back."""

    def __init__(self, name: str, tat: float) -> None:
        super().__init__(name)
        self.name = name
        self.tat = tat  # the full window's time


# What admit reads before it takes: each window's time (None: no row) and, for a key, what it
# spent (today, this month); the decision whether to go on and take.
Reads = tuple[dict[str, float | None], tuple[int, int] | None]


def admit(
    dialect: Dialect,
    db: Connection,
    peek: Sequence[str],
    budget: tuple[str, str, str] | None,
    go_on: Callable[[dict[str, float | None], tuple[int, int] | None], bool],
    take: Sequence[tuple[str, float, float]],
    now: float,
) -> Reads | None:
    """One ask's admission, in one transaction: read the windows ``peek`` names and what the key
    of ``budget`` (key name, day, month) spent; unless ``go_on`` says no (then the reads are
    returned), take each window of ``take`` ((name, cost, period), see :func:`take_window`), in
    order, and return None.

    A window of ``take`` that is full raises :class:`WindowFull`, which rolls back the windows
    taken before it: an ask refused by one window costs none of the others.
    """
    times = {name: window_time(dialect, db, name) for name in peek}
    used = None
    if budget is not None:
        found = spent(dialect, db, *budget)
        used = (found[0][1], found[0][2]) if found else (0, 0)
    if not go_on(times, used):
        return times, used
    for name, cost, period in take:
        if take_window(dialect, db, name, cost, now, period) is None:
            raise WindowFull(name, window_time(dialect, db, name) or now)
    return None


def prune_windows(dialect: Dialect, db: Connection, now: float) -> int:
    """Forget the windows that have emptied (their time is past): they read as absent rows."""
    return dialect.execute(db, "DELETE FROM rate_windows WHERE tat <= ?", (now,)).rowcount
