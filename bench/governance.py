"""What the governance checks cost an ask: the core's per-ask calls, timed in process.

    python bench/governance.py                 # SQLite, and PostgreSQL if it answers
    python bench/governance.py --asks 5000 --postgres postgresql://postgres@127.0.0.1:5432/test

Every ask runs the same governance steps in ``ChatService`` (SPEC §14), whatever its
protocol: the caller made from the key (``ChatService.caller``), the model chosen
(``model_for``), the limits taken (``admit``) and the tokens counted when it ends
(``charge``). This script runs exactly those calls on a real ``ChatService`` over a
real store, one ask after another, for each way a server can be configured:

- keys off (``API_KEYS`` empty, no stored keys): the steps with nothing to check;
- a key of ``API_KEYS``; a stored key without limits;
- a stored key with ``rpm``, ``tpm``, ``tokens_per_day`` and ``tokens_per_month``;
- the same with an end user (``USER_RPM``).

It prints the p50 and p99 of one ask's steps and the p50 added against keys off. On
SQLite the windows and budgets are kept in the process (no database round trip per
ask); on PostgreSQL an ask of a key with limits is one transaction (the windows are
shared by every instance), so its row shows the database round trip. The usage is
written to the store in the background, as the server does (``Limits.flush``), and is
not part of the timed steps. It prints figures and judges nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from easybackend.chat.service import ChatService  # noqa: E402
from easybackend.chat.tokens import TokenCounter, encoding_name_for, load_encoding  # noqa: E402
from easybackend.metrics import Metrics  # noqa: E402
from easybackend.settings import load_settings  # noqa: E402
from easybackend.storage import open_url  # noqa: E402

ENV_KEY = "bench-env-SECRET-key-0001"
LIMITS = {"rpm": 10**9, "tpm": 2**31 - 1, "tokens_per_day": 10**12, "tokens_per_month": 10**12}


async def one_ask(service: ChatService, key: str | None, user: str | None) -> float:
    """The seconds the governance steps of one ask take."""
    started = time.perf_counter()
    caller = service.caller(protocol="http", key=key, request_id=None, peer=("127.0.0.1", 1))
    model = service.model_for(None, caller=caller)
    ticket = await service.admit(caller, user)
    await service.charge(ticket, model, 120, 80)
    return time.perf_counter() - started


async def measure(database_url: str, asks: int) -> list[tuple[str, float, float]]:
    """(configuration, p50, p99) in seconds, each over ``asks`` asks after a warm-up."""
    rows = []
    for label, keys_on in (("keys off", False), ("keys on", True)):
        environ = {
            "OPENAI_API_KEY": "unused",
            "DATABASE_URL": database_url,
            "API_KEYS": f"env:{ENV_KEY}" if keys_on else "",
            "USER_RPM": str(10**9),
        }
        settings = load_settings(environ, environ={}, env_file=None)
        store = await open_url(settings.database, settings)
        try:
            counter = TokenCounter(
                load_encoding(encoding_name_for(settings.model, settings.encoding_name))
            )  # the service's; no text is counted here
            service = ChatService(settings, store, None, counter, Metrics())  # type: ignore[arg-type]
            cases: list[tuple[str, str | None, str | None]] = []
            if keys_on:
                suffix = secrets.token_hex(4)
                free, _ = await service.keys.create(f"free-{suffix}", {})
                limited, _ = await service.keys.create(f"limited-{suffix}", LIMITS)
                await service.keys.load()
                cases = [
                    ("API_KEYS key", ENV_KEY, None),
                    ("stored key, no limits", free, None),
                    ("stored key, rpm+tpm+budgets", limited, None),
                    ("stored key, limits + end user", limited, "player-1"),
                ]
            else:
                cases = [(label, None, None)]
            for name, key, user in cases:
                for _ in range(min(200, asks)):  # warm-up
                    await one_ask(service, key, user)
                times = [await one_ask(service, key, user) for _ in range(asks)]
                times.sort()
                rows.append((name, statistics.median(times), times[int(len(times) * 0.99) - 1]))
                await service.limits.flush()
        finally:
            await store.close()
    return rows


def report(backend: str, rows: list[tuple[str, float, float]]) -> str:
    base = rows[0][1]
    lines = [
        f"### {backend}",
        "",
        "| configuration | p50 (µs) | p99 (µs) | added p50 vs keys off (µs) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, p50, p99 in rows:
        lines.append(f"| {name} | {p50 * 1e6:.1f} | {p99 * 1e6:.1f} | {(p50 - base) * 1e6:+.1f} |")
    return "\n".join(lines) + "\n"


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as folder:
        sqlite = f"sqlite:///{folder}/governance.sqlite3"
        print(report("SQLite", await measure(sqlite, args.asks)))
    if args.postgres:
        try:
            with own_schema(args.postgres) as url:
                rows = await measure(url, args.asks)
        except Exception as exc:  # no server: the SQLite figures stand alone
            print(f"PostgreSQL not measured ({exc.__class__.__name__}: {exc})")
        else:
            print(report("PostgreSQL", rows))


@contextlib.contextmanager
def own_schema(url: str) -> Iterator[str]:
    """A new schema of the database at ``url`` for the measurement, dropped afterwards:
    the URL that uses it."""
    import psycopg

    schema = f"bench_governance_{secrets.token_hex(4)}"
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as admin:
        admin.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm SCHEMA public")
        admin.execute(f"CREATE SCHEMA {schema}")
    try:
        separator = "&" if "?" in url else "?"
        yield f"{url}{separator}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--asks", type=int, default=3000, help="timed asks per row (default 3000)")
    parser.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="a PostgreSQL database to measure too ('' for none; default the local test one)",
    )
    parser.add_argument("--quick", action="store_true", help="100 asks per row: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.asks = 100
    trio.run(main, args)


if __name__ == "__main__":
    cli()
