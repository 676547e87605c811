"""Usage per key, model and UTC day (SPEC §14): the queries and their JSON form.

What ``GET /usage`` (the caller's own key), ``GET /admin/usage`` (every key)
and ``easybackend usage`` answer. The figures are those the limits count
(:mod:`.limits`): one request and its prompt and completion tokens for every
ask that cost tokens (answered, or cancelled with a partial answer; the /v1
relay's included), under the provider model that answered and the UTC day it
ended. ``""`` is the key name of asks made with keys off, shown as ``null``.

A query names a range of days, ``from`` and ``to`` (``YYYY-MM-DD``, both
included; by default the current UTC month up to today, at most
:data:`MAX_DAYS` days), and what to group by: any of ``key``, ``day`` and
``model`` (a key's own usage: ``day`` or ``model``). Days and models without
usage are left out. Nothing here touches the database; errors are InvalidInput
naming the field.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence

from ..errors import InvalidInput
from ..storage.sql_usage import UsageRow
from .limits import day_of, month_of

MAX_DAYS = 366  # the longest range a query may cover
FIELDS = ("key", "day", "model")  # what a query may group by
FIGURES = ("requests", "prompt_tokens", "completion_tokens")


@dataclasses.dataclass(frozen=True, slots=True)
class UsageQuery:
    """A range of UTC days (both included) and the fields its rows are grouped by."""

    first_day: str
    last_day: str
    group_by: tuple[str, ...]


def parse_query(
    first: str | None,
    last: str | None,
    group_by: str | None,
    now: float,
    *,
    allowed: Sequence[str] = FIELDS,
    default: Sequence[str] = FIELDS,
) -> UsageQuery:
    """The query of ``from``, ``to`` and ``group_by`` (comma-separated fields of ``allowed``;
    None: ``default``) as a client sent them. Raises InvalidInput naming the field."""
    last_day = _day(last, "to") if last else day_of(now)
    first_day = _day(first, "from") if first else f"{month_of(now)}-01"
    if first_day > last_day:
        raise InvalidInput("from must be on or before to", param="from")
    days = (datetime.date.fromisoformat(last_day) - datetime.date.fromisoformat(first_day)).days
    if days >= MAX_DAYS:
        raise InvalidInput(f"from and to may span at most {MAX_DAYS} days", param="from")
    if group_by is None:
        fields = tuple(default)
    else:
        fields = tuple(dict.fromkeys(part.strip() for part in group_by.split(",")))
        if not fields or any(field not in allowed for field in fields):
            raise InvalidInput(
                f"group_by must be one or more of {', '.join(allowed)}, comma-separated",
                param="group_by",
            )
    return UsageQuery(first_day, last_day, tuple(field for field in FIELDS if field in fields))


def _day(text: str, field: str) -> str:
    try:
        day = datetime.date.fromisoformat(text)
    except ValueError:
        day = None
    if day is None or len(text) != 10:
        raise InvalidInput(f"{field} must be a date YYYY-MM-DD (UTC)", param=field)
    return day.isoformat()


def figures(requests: int, prompt: int, completion: int) -> dict[str, int]:
    return {
        "requests": requests,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def grouped(rows: Sequence[UsageRow], group_by: Sequence[str]) -> list[dict[str, object]]:
    """The rows (key, day, model, requests, prompt, completion) summed by ``group_by``, in
    key, day, model order: each ``{field: value, …, "requests", "prompt_tokens",
    "completion_tokens", "total_tokens"}``."""
    sums: dict[tuple[object, ...], list[int]] = {}
    for key, day, model, requests, prompt, completion in rows:
        where = {"key": key or None, "day": day, "model": model}
        group = tuple(where[field] for field in group_by)
        total = sums.setdefault(group, [0, 0, 0])
        total[0] += requests
        total[1] += prompt
        total[2] += completion
    ordered = sorted(sums.items(), key=lambda item: tuple(str(v or "") for v in item[0]))
    return [
        {**dict(zip(group_by, group, strict=True)), **figures(*total)} for group, total in ordered
    ]


def total(rows: Sequence[UsageRow]) -> dict[str, int]:
    """Every row's figures summed."""
    return figures(*(sum(row[3 + index] for row in rows) for index in range(3)))  # type: ignore[arg-type]


def usage_view(query: UsageQuery, rows: Sequence[UsageRow], **extra: object) -> dict[str, object]:
    """The JSON answer of a query: its range, its grouping, the rows and their total, and
    ``extra`` (a key's own: its name and budgets)."""
    return {
        **extra,
        "from": query.first_day,
        "to": query.last_day,
        "group_by": ",".join(query.group_by),
        "usage": grouped(rows, query.group_by),
        "total": total(rows),
    }
