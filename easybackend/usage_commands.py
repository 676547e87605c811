"""``easybackend usage``: the keys' usage (requests and tokens per key, UTC day and model).

Reads the database ``DATABASE_URL`` (or ``CONVERSATIONS_DIR``) names, the one
the servers use: what ``GET /admin/usage`` answers, without a running server.
A server on SQLite writes its usage every second (and at shutdown), one on
PostgreSQL as each ask ends, so the last second's asks may not show yet.
``--key NAME`` narrows it to one key (``--key ''``: the asks made with keys
off), ``--from``/``--to`` the UTC days (default: this month), ``--group-by``
any of ``key,day,model``; ``--json`` prints the admin API's JSON. Errors are
one line ``easybackend: error: …`` and exit 1 (2 for bad configuration).

Only argparse is imported with this module: the rest is imported when the
command runs.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from .keys_commands import STORE_FLAGS, run_on_store


def add_parser(commands: Any) -> None:
    """Add ``usage`` to the command's subparsers ``commands``."""
    usage = commands.add_parser(
        "usage",
        help="show the keys' usage: requests and tokens per key, UTC day and model",
        description="The usage the limits count: every ask that cost tokens (the /v1 relay's "
        "too), per key, UTC day and model, read from the servers' database.",
    )
    usage.add_argument("--key", default=None, metavar="NAME", help="one key only")
    usage.add_argument("--from", dest="first", default=None, metavar="YYYY-MM-DD")
    usage.add_argument("--to", dest="last", default=None, metavar="YYYY-MM-DD")
    usage.add_argument(
        "--group-by",
        default=None,
        metavar="FIELDS",
        help="any of key, day, model, comma-separated (default: all three)",
    )
    usage.add_argument("--json", action="store_true", help="print the admin API's JSON")
    for option, (variable, text) in STORE_FLAGS.items():
        usage.add_argument(
            option, dest=variable, default=argparse.SUPPRESS, metavar=variable, help=text
        )
    usage.add_argument(
        "--env-file",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="read settings from this file instead of ./.env",
    )


def main(args: dict[str, Any]) -> int:
    """Run ``usage``; returns the exit status (see :func:`.keys_commands.run_on_store`)."""
    return run_on_store(args, _run)


async def _run(settings: Any, args: dict[str, Any]) -> int:
    """The query on the settings' database (opened, then closed whatever happens)."""
    import logging
    import time

    from .governance import usage
    from .storage import open_storage

    driver = logging.getLogger("psycopg")  # its pool's retry warnings: the error line says why
    if not driver.handlers:
        driver.addHandler(logging.NullHandler())
    query = usage.parse_query(args["first"], args["last"], args["group_by"], time.time())
    store = await open_storage(settings)
    try:
        rows = await store.usage_rows(args["key"], query.first_day, query.last_day)
    finally:
        await store.close()
    view = usage.usage_view(query, rows)
    if args["json"]:
        print(json.dumps(view, indent=2))
        return 0
    figures = ("requests", "prompt_tokens", "completion_tokens", "total_tokens")
    header = [*(field.upper() for field in query.group_by), "REQUESTS", "PROMPT", "COMPLETION"]
    table = [[*header, "TOTAL"]]
    for row in view["usage"]:  # type: ignore[attr-defined]
        cells = ["-" if row[field] is None else str(row[field]) for field in query.group_by]
        table.append(cells + [str(row[name]) for name in figures])
    blanks = [""] * (len(query.group_by) - 1)
    table.append(["total", *blanks, *(str(view["total"][name]) for name in figures)])  # type: ignore[index]
    widths = [max(len(line[column]) for line in table) for column in range(len(table[0]))]
    for line in table:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )
    return 0
