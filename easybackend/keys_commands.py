"""``easybackend keys create|list|update|revoke``: the stored backend keys, from the command line.

The commands work on the database ``DATABASE_URL`` (or ``CONVERSATIONS_DIR``)
names, the one the servers use; running servers pick a change up within a
second (see :mod:`easybackend.governance.keys`). ``create`` prints the new
key's secret once (alone on standard output, or in the ``--json`` object);
nothing else ever shows a secret or its hash. Errors are one line
``easybackend: error: …`` and exit 1 (2 for bad configuration).

Only argparse is imported with this module: the rest is imported when a
command runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from typing import Any

CLEAR_LIMIT = "none"  # --rpm none: no limit
ALL_MODELS = "all"  # --models all: every model of MODELS
NEVER = "never"  # --expires never
LIMIT_FLAGS = {
    "--rpm": ("rpm", "requests per minute"),
    "--tpm": ("tpm", "tokens per minute"),
    "--tokens-per-day": ("tokens_per_day", "tokens per UTC day"),
    "--tokens-per-month": ("tokens_per_month", "tokens per UTC month"),
}
STORE_FLAGS = {
    "--conversations-dir": ("CONVERSATIONS_DIR", "data directory (CONVERSATIONS_DIR)"),
    "--database-url": ("DATABASE_URL", "sqlite:///PATH or postgresql://… (DATABASE_URL)"),
}


def add_parser(commands: Any) -> None:
    """Add ``keys`` and its four actions to the command's subparsers ``commands``."""
    keys = commands.add_parser(
        "keys",
        help="create, list, change and revoke backend keys stored in the database",
        description="Backend keys stored in the database (beside API_KEYS), as hashes only: each "
        "with a name (which owns its conversations), optional limits, models and expiry. Running "
        "servers on the same database use a change within a second.",
    )
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = actions.add_parser(
        "create",
        help="make a key and print its secret, once",
        description="Make a key named NAME and print its secret, shown this once: only its hash "
        "is stored. A name is given once: one in use, revoked, or in API_KEYS is refused.",
    )
    create.add_argument("name", metavar="NAME", help="1-64 characters of A-Z a-z 0-9 _ . -")
    _add_settings(create, clearing=False)
    create.add_argument(
        "--json", action="store_true", help='print {"name", "secret", …} instead of the secret'
    )
    listing = actions.add_parser(
        "list",
        help="list the stored keys (never their secrets)",
        description="List every stored key, revoked ones too: name, status (active, disabled, "
        "expired, revoked), times, limits and models. Never a secret or a hash.",
    )
    listing.add_argument("--json", action="store_true", help="print a JSON list")
    update = actions.add_parser(
        "update",
        help="change a key's limits, models, expiry, or disable/enable it",
        description="Change what the flags name, nothing else. 'none' clears a limit, "
        "--models all allows every model of MODELS, --expires never clears the expiry.",
    )
    update.add_argument("name", metavar="NAME")
    _add_settings(update, clearing=True)
    flag = update.add_mutually_exclusive_group()
    for option, value, text in (
        ("--disable", True, "stop the key working (it can be enabled again)"),
        ("--enable", False, "let a disabled key work again"),
    ):
        flag.add_argument(
            option,
            dest="disabled",
            action="store_const",
            const=value,
            default=argparse.SUPPRESS,
            help=text,
        )
    update.add_argument("--json", action="store_true", help="print the key as JSON")
    revoke = actions.add_parser(
        "revoke",
        help="revoke a key for good",
        description="Revoke the key NAME for good: it stops working on every server within a "
        "second. Its row stays (its name owns its conversations and is never given again).",
    )
    revoke.add_argument("name", metavar="NAME")
    revoke.add_argument("--json", action="store_true", help="print the key as JSON")
    for action in (create, listing, update, revoke):
        for option, (variable, text) in STORE_FLAGS.items():
            action.add_argument(
                option, dest=variable, default=argparse.SUPPRESS, metavar=variable, help=text
            )
        action.add_argument(
            "--env-file",
            default=argparse.SUPPRESS,
            metavar="PATH",
            help="read settings from this file instead of ./.env",
        )


def _add_settings(parser: argparse.ArgumentParser, *, clearing: bool) -> None:
    """The flags of a key's limits, models and expiry (``clearing``: each may also clear)."""
    for option, (field, text) in LIMIT_FLAGS.items():
        parser.add_argument(
            option,
            dest=field,
            type=_limit(clearing),
            default=argparse.SUPPRESS,
            metavar="N",
            help=f"{text}{' (none: no limit)' if clearing else ''}",
        )
    parser.add_argument(
        "--models",
        type=_models(clearing),
        default=argparse.SUPPRESS,
        metavar="A,B",
        help="the models it may use, within MODELS"
        + (" (all: every model)" if clearing else " (default: every model)"),
    )
    parser.add_argument(
        "--expires",
        type=_expires(clearing),
        default=argparse.SUPPRESS,
        metavar="YYYY-MM-DD",
        help="it stops working at 00:00 UTC that day (an ISO 8601 date and time also works)"
        + (" (never: no expiry)" if clearing else ""),
    )


def _limit(clearing: bool) -> Callable[[str], int | None]:
    def parse(text: str) -> int | None:
        if clearing and text.strip().lower() == CLEAR_LIMIT:
            return None
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            hint = " or none" if clearing else ""
            raise argparse.ArgumentTypeError(f"must be a whole number of at least 1{hint}")
        return value

    return parse


def _models(clearing: bool) -> Callable[[str], list[str] | None]:
    def parse(text: str) -> list[str] | None:
        if clearing and text.strip().lower() == ALL_MODELS:
            return None
        return [name.strip() for name in text.split(",")]

    return parse


def _expires(clearing: bool) -> Callable[[str], str | None]:
    def parse(text: str) -> str | None:
        if clearing and text.strip().lower() == NEVER:
            return None
        return text

    return parse


def main(args: dict[str, Any]) -> int:
    """Run one ``keys`` action; returns the exit status."""
    action = args.pop("keys_command")
    return run_on_store(args, functools.partial(_run, action))


def run_on_store(args: dict[str, Any], work: Any) -> int:
    """Load the settings from ``args``' store flags (and ``.env``), then run ``work(settings,
    the other args)`` under trio; the exit status. A setting that does not validate is exit 2,
    a ChatError (the store unreachable, a name unknown) exit 1, each one line on stderr."""
    import trio

    from .errors import ChatError
    from .settings import ConfigError, load_settings

    env_file = args.pop("env_file", ".env")
    store_flags = {
        variable: args.pop(variable) for variable, _ in STORE_FLAGS.values() if variable in args
    }
    try:
        settings = load_settings(store_flags, env_file=env_file, need_api_key=False)
    except ConfigError as exc:
        print(f"easybackend: error: {exc}", file=sys.stderr)
        return 2
    try:
        return trio.run(work, settings, args)
    except ChatError as exc:
        print(f"easybackend: error: {exc.message}", file=sys.stderr)
        return 1


async def _run(action: str, settings: Any, args: dict[str, Any]) -> int:
    """The action on the settings' database (opened, then closed whatever happens)."""
    import logging

    from .governance import keys
    from .storage import open_storage

    driver = logging.getLogger("psycopg")  # its pool's retry warnings: the error line says why
    if not driver.handlers:
        driver.addHandler(logging.NullHandler())
    as_json = bool(args.pop("json", False))
    name = args.pop("name", None)
    store = await open_storage(settings)
    try:
        if action == "list":
            records = await store.keys()
            if as_json:
                print(json.dumps([keys.key_view(record) for record in records], indent=2))
            else:
                _print_table(records)
            return 0
        if action == "create":
            secret, record = await keys.create_key(store, name, args, reserved=settings.api_keys)
            if as_json:
                print(json.dumps({**keys.key_view(record), "secret": secret}, indent=2))
            else:
                print(
                    f"created key {record.name!r}; its secret, shown this once "
                    "(only its hash is stored):",
                    file=sys.stderr,
                )
                print(secret)
            return 0
        if action == "update":
            if not args:
                from .errors import InvalidInput

                raise InvalidInput("nothing to change: give a flag (see keys update --help)")
            record = await keys.update_key(store, name, args)
            verb = "updated"
        else:
            record = await keys.revoke_key(store, name)
            verb = "revoked"
        if as_json:
            print(json.dumps(keys.key_view(record), indent=2))
        else:
            print(f"{verb} key {record.name!r}: {keys.key_view(record)['status']}")
        return 0
    finally:
        await store.close()


def _print_table(records: list[Any]) -> None:
    """The keys as a table, one row each (no secret, no hash)."""
    from .governance.keys import LIMITS, key_view

    header = [
        "NAME",
        "STATUS",
        "CREATED",
        "EXPIRES",
        "RPM",
        "TPM",
        "PER DAY",
        "PER MONTH",
        "MODELS",
    ]
    rows = [header]
    for record in records:
        view = key_view(record)
        rows.append(
            [
                str(view["name"]),
                str(view["status"]),
                str(view["created_at"]),
                str(view["expires_at"] or "never"),
                *(str(view[limit]) if view[limit] is not None else "-" for limit in LIMITS),
                ",".join(view["models"]) if view["models"] is not None else "all",  # type: ignore[arg-type]
            ]
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
