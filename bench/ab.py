"""Two source trees of EasyBackend compared in turns: bench.py's time-to-first-token rows.

    python bench/ab.py BEFORE AFTER                    # 3 rounds, the default rows
    python bench/ab.py BEFORE AFTER --rounds 5 --rows WebSocket:100 gRPC:100
    python bench/ab.py TREE TREE --rows sse:1 relay:1   # two rows of one tree, CPU per ask
    git worktree add --detach /tmp/before main         # a tree to compare with

BEFORE and AFTER are source trees (checkouts, worktrees) of EasyBackend; the
server of each is started from its own ``run.py``, so it runs that tree's code,
while the clients, the fake upstream and the measuring are this tree's
(``bench.py``'s), the same for both.

The two servers take turns: in each round, the server of one tree is started,
every row is measured (each as one round of ``bench.py``, the direct baseline
taken in turn with it), the server is stopped, and the same is done with the
other tree; the order of the two alternates from round to round (A B, B A,
A B, ...), so that a drift of a shared machine weighs on both alike. One fake
upstream serves every round.

Printed for each row: the added p50 (server p50 minus direct p50) of every
round, their median per tree, and the ratio AFTER / BEFORE of the medians; and
the same for the server's CPU time per ask (user and system, read from
``/proc``, over the row's asks including the warm-up ones). On a machine busy
with other work the latencies mostly tell its load; the CPU time the server
spends on the same asks is much less sensitive to it. ``--json`` writes every
round's figures. It prints figures and judges nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

import trio

from bench import TTFT_PROTOCOLS, UNPACED, Load, Stack, paced_load, ttft

# bench.py's rows, by their name in its tables or by the name its --protocol takes (relay: the
# /v1/chat/completions relay, responses: /v1/responses with memory)
PROTOCOLS = {kind.name: kind for kind in TTFT_PROTOCOLS.values()} | TTFT_PROTOCOLS
DEFAULT_ROWS = ["WebSocket:100", "SSE:100", "gRPC:100", "WebSocket:1", "SSE:1", "gRPC:1"]


def parse_row(text: str) -> tuple[type, int]:
    name, _, concurrency = text.rpartition(":")
    if name not in PROTOCOLS or not concurrency.isdigit() or int(concurrency) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected PROTOCOL:CONCURRENCY, PROTOCOL one of {', '.join(PROTOCOLS)}"
        )
    return PROTOCOLS[name], int(concurrency)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def describe(tree: Path) -> str:
    """The tree's commit (and whether it has changes not committed), for the report."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return str(tree)
    return f"{tree} ({commit}{', with changes' if dirty else ''})"


async def measure(args: argparse.Namespace) -> dict[str, object]:
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    paced = paced_load(args)
    unpaced = Load(args.unpaced_tokens, 0.0)
    rows = [(kind, concurrency) for kind, concurrency in args.rows]
    # rows[i] -> tree -> one figure per round
    figures: list[dict[str, list[dict[str, object]]]] = [
        {label: [] for label in trees} for _ in rows
    ]
    with tempfile.TemporaryDirectory() as tmp:
        upstream = Stack(Path(tmp) / "upstream")
        stacks = {}
        for label, tree in trees.items():
            (Path(tmp) / label).mkdir()
            stacks[label] = Stack(Path(tmp) / label, server_root=tree)
            stacks[label].upstream_port = upstream.upstream_port  # one fake for both
        try:
            await upstream.start_upstream()
            for round_ in range(args.rounds):
                order = list(trees) if round_ % 2 == 0 else list(reversed(trees))
                for label in order:
                    stack = stacks[label]
                    await stack.start_server()
                    try:
                        for index, (kind, concurrency) in enumerate(rows):
                            load = paced if concurrency > 1 else unpaced
                            per_worker = math.ceil(args.samples / concurrency)
                            assert stack.server is not None
                            cpu = cpu_seconds(stack.server.pid)
                            row = await ttft(stack, kind, concurrency, per_worker, load)
                            asks = concurrency * (1 + per_worker)  # with the warm-up asks
                            cpu = cpu_seconds(stack.server.pid) - cpu
                            row["server_cpu_ms_per_ask"] = round(cpu / asks * 1000, 3)
                            row["round"] = round_ + 1
                            figures[index][label].append(row)
                            print(json.dumps({"tree": label, **row}), flush=True)
                    finally:
                        stack.stop_server()
        finally:
            upstream.stop()
    return {
        "trees": {label: describe(tree) for label, tree in trees.items()},
        "rounds": args.rounds,
        "samples_per_round": args.samples,
        "rows": [
            {"protocol": kind.name, "concurrency": concurrency, **figures[index]}
            for index, (kind, concurrency) in enumerate(rows)
        ],
    }


FIGURES = {
    "added_p50_ms": "Added p50 ms (server p50 - direct p50)",
    "server_cpu_ms_per_ask": "Server CPU ms per ask",
}


def summary(report: dict) -> str:
    lines = [f"before: {report['trees']['before']}", f"after:  {report['trees']['after']}"]
    for figure, title in FIGURES.items():
        lines += [
            "",
            f"{title}, {report['rounds']} rounds in turns; medians of the rounds.",
            "",
            "| protocol | concurrency | before, each round | after, each round "
            "| before median | after median | after / before |",
            "| --- | ---: | --- | --- | ---: | ---: | ---: |",
        ]
        for row in report["rows"]:
            values = {label: [r[figure] for r in row[label]] for label in ("before", "after")}
            before, after = (statistics.median(values[label]) for label in ("before", "after"))
            ratio = f"{after / before:.2f}" if before > 0 else "n/a"
            lines.append(
                f"| {row['protocol']} | {row['concurrency']} "
                f"| {', '.join(f'{value:g}' for value in values['before'])} "
                f"| {', '.join(f'{value:g}' for value in values['after'])} "
                f"| {before:g} | {after:g} | {ratio} |"
            )
    return "\n".join(lines) + "\n"


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("before", type=Path, help="the source tree measured as 'before'")
    parser.add_argument("after", type=Path, help="the source tree measured as 'after'")
    parser.add_argument("--rounds", type=int, default=3, help="rounds in turns (default 3)")
    parser.add_argument(
        "--rows",
        type=parse_row,
        nargs="+",
        default=[parse_row(row) for row in DEFAULT_ROWS],
        metavar="PROTOCOL:CONCURRENCY",
        help=f"the rows to measure (default {' '.join(DEFAULT_ROWS)})",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=100,
        help="counted asks per row, tree and round (default 100; at least one per worker)",
    )
    parser.add_argument(
        "--token-delay",
        type=float,
        help="fake upstream delay per token (s) in the rows above concurrency 1 (default 0.02)",
    )
    parser.add_argument(
        "--answer-tokens", type=int, help="tokens per answer in those rows (default 100)"
    )
    parser.add_argument(
        "--unpaced-tokens",
        type=int,
        default=UNPACED.tokens,
        help="tokens per answer, sent with no delay, in the rows at concurrency 1 (default "
        f"{UNPACED.tokens}); long answers make the server's CPU time per ask mostly per piece",
    )
    parser.add_argument("--json", type=Path, help="write every round's figures as JSON here")
    args = parser.parse_args()
    args.quick = False  # paced_load's default sizes
    for tree in (args.before, args.after):
        if not (tree / "run.py").is_file() or not (tree / "easybackend").is_dir():
            parser.error(f"{tree} is not a source tree of EasyBackend (no run.py, easybackend/)")
    report = trio.run(measure, args)
    print(summary(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    cli()
