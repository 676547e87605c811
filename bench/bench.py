"""EasyBackend benchmarks: what the server adds on top of talking to the model directly.

    python bench/bench.py                 # the full run (several minutes)
    python bench/bench.py --quick         # a smoke run with small sizes (CI)
    python bench/bench.py --json out.json --markdown out.md
    python bench/bench.py --only long     # only the long-conversation rows (--only repeats)
    python bench/bench.py --only ttft --protocol sse --protocol relay --concurrency 1 --concurrency 100

Three processes: the fake upstream (``easybackend.fake_upstream``), the
server (``run.py``, SQLite persistence on) and this client. Every figure of
the server is set against the same client talking to the same fake directly:

- added time to first token (p50, p99) per protocol (HTTP whole answer, SSE,
  WebSocket, gRPC, the stateless ``/v1/chat/completions`` relay streaming, and
  ``/v1/responses`` streaming with memory) at concurrencies 1, 100 and 1,000
  (1 and 10 with --quick; ``--protocol`` and ``--concurrency`` select); for the
  whole-answer HTTP ask the "first token" is the whole answer, against a direct
  non-streaming call; the relay is the same client sending the same OpenAI
  request, to EasyBackend instead of the fake; a response continues the
  worker's conversation (``previous_response_id``: its context holds the newest
  turns that fit the window) and its first token is the first
  ``response.output_text.delta`` event, against the same streaming baseline;
- whole-answer asks per second at concurrency 64;
- concurrent open streams per protocol: errors and server memory per stream;
- ask latency on a conversation of 10 turns against one of 10,000 turns, and against one of
  10,000 turns with many side branches (6,000 of them), asked by parent_id at its deepest leaf;
- start-up time until all three protocols answer.

Each ask uses a conversation of its own unless said otherwise, so asks never
wait for each other. Figures are medians over the samples of one run; the
machine is shared, so compare ratios rather than absolute values.

The load of a time-to-first-token row, the same direct and through the server:
at concurrency N, N workers ask back to back (a closed loop). Worker i waits
i/N of one answer's duration before it connects and asks, so the asks arrive
spread out, as from N independent users, not in lock step. Each worker asks
once more than it is counted: its first ask warms its connection up during the
ramp-up, while later workers are still arriving; an answer lasts at least one
answer's duration, so every counted ask starts once all N workers are asking:
N asks are in flight. Above concurrency 1 the answers are paced like a hosted
model's: --answer-tokens tokens (default 100) at --token-delay seconds each
(default 0.02, 50 tokens per second), so an answer lasts 2 s; --quick makes
them 10 tokens at 0.005 s. At concurrency 1 there is no load to model: the
answers are 20 tokens with no delay. Direct and server take turns, in rounds,
and so do the protocols of a concurrency (round 1: each protocol, direct then
server; round 2: the same…), so that a drift in the machine's speed weighs on
all alike: at concurrency 1,
five rounds of 200 asks; at 100, three rounds in which each worker is counted
once (300 samples); at 1,000, one round, each worker counted once (--quick:
a tenth of the asks). Every other figure uses answers with no delay.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx2
import purerpc
import trio
from trio_websocket import open_websocket_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from easybackend.proto_gen import chat_grpc, chat_pb2, health_grpc, health_pb2  # noqa: E402
from easybackend.settings import DEFAULT_MODEL  # noqa: E402

PROMPT = "hello there"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def wait_for_port(port: int, limit: float = 30) -> None:
    with trio.fail_after(limit):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.aclose()
                return
            except OSError:
                await trio.sleep(0.005)


class Stack:
    """The fake upstream and the server as child processes.

    The server is ``run.py`` of ``server_root`` (this source tree by default): started
    from there, it imports that tree's ``easybackend``.
    """

    def __init__(self, data_dir: Path, server_root: Path = ROOT) -> None:
        self.data_dir = data_dir
        self.server_root = server_root
        self.upstream_port = free_port()
        self.http, self.grpc, self.ws = free_port(), free_port(), free_port()
        self.processes: list[subprocess.Popen] = []
        self.server: subprocess.Popen | None = None

    @property
    def upstream_url(self) -> str:
        return f"http://127.0.0.1:{self.upstream_port}/v1"

    async def start_upstream(self) -> None:
        command = [
            sys.executable, "-m", "easybackend.fake_upstream", "--host", "127.0.0.1",
            "--port", str(self.upstream_port), "--api-key", "bench-key",
        ]  # fmt: skip
        self.processes.append(subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL))  # noqa: ASYNC220
        await wait_for_port(self.upstream_port)

    async def start_server(self) -> float:
        """Start run.py; returns the seconds until all three protocols answer.

        A listening socket accepts connections before its server reads them, so
        each protocol is asked: ``/healthz``, a WebSocket handshake and a gRPC
        health check.
        """
        env = {
            **os.environ,
            "OPENAI_API_KEY": "bench-key",
            "OPENAI_BASE_URL": self.upstream_url,
            "HOST": "127.0.0.1",
            "HTTP_PORT": str(self.http),
            "GRPC_PORT": str(self.grpc),
            "WS_PORT": str(self.ws),
            "CONVERSATIONS_DIR": str(self.data_dir),
            "LOG_LEVEL": "WARNING",
            "MAX_STREAMS_PER_KEY": "100000",
        }
        started = time.perf_counter()
        command = [sys.executable, str(self.server_root / "run.py")]
        self.server = subprocess.Popen(command, cwd=self.data_dir, env=env)  # noqa: ASYNC220
        self.processes.append(self.server)
        for port in (self.http, self.grpc, self.ws):
            await wait_for_port(port)
        await self._until_answering()
        return time.perf_counter() - started

    async def _until_answering(self, limit: float = 30) -> None:
        async def http() -> None:
            async with httpx2.AsyncClient(timeout=1) as client:
                (await client.get(f"http://127.0.0.1:{self.http}/healthz")).raise_for_status()

        async def websocket() -> None:
            async with open_websocket_url(f"ws://127.0.0.1:{self.ws}"):
                pass

        async def grpc() -> None:
            async with purerpc.insecure_channel("127.0.0.1", self.grpc) as channel:
                reply = await health_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="")
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING

        with trio.fail_after(limit):
            for check in (http, websocket, grpc):
                while True:
                    try:
                        await check()
                        break
                    except Exception:
                        await trio.sleep(0.005)

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.terminate()
            self.server.wait(timeout=30)
            self.processes.remove(self.server)
            self.server = None

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(timeout=30)


# --- one client per protocol: `open()` once per worker, then `ask()` returns seconds to first token


class Client:
    """One worker's connection; ``async with`` it in the worker's own task."""

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        pass


class DirectStream(Client):
    """The baseline: the openai wire format straight to the fake, streaming."""

    name = "direct (stream)"

    def __init__(self, stack: Stack, client: httpx2.AsyncClient) -> None:
        self.url = f"{stack.upstream_url}/chat/completions"
        self.client = client

    async def ask(self, conversation: str, prompt: str) -> float:
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": prompt}]}
        started = time.perf_counter()
        first = None
        async with self.client.stream("POST", self.url, json=body, headers=AUTH) as response:
            async for line in response.aiter_lines():
                if first is None and line.startswith("data: {"):
                    choices = json.loads(line[6:])["choices"]
                    if choices and choices[0]["delta"].get("content"):
                        first = time.perf_counter() - started
        return first if first is not None else time.perf_counter() - started


class DirectWhole(DirectStream):
    name = "direct (whole)"

    async def ask(self, conversation: str, prompt: str) -> float:
        body = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
        started = time.perf_counter()
        response = await self.client.post(self.url, json=body, headers=AUTH)
        response.raise_for_status()
        return time.perf_counter() - started


AUTH = {"Authorization": "Bearer bench-key"}


class HttpWhole(Client):
    name = "HTTP"
    baseline = DirectWhole

    def __init__(self, stack: Stack, client: httpx2.AsyncClient) -> None:
        self.base = f"http://127.0.0.1:{stack.http}"
        self.client = client

    async def ask(self, conversation: str, prompt: str, parent_id: str | None = None) -> float:
        body = {"prompt": prompt} | ({"parent_id": parent_id} if parent_id else {})
        started = time.perf_counter()
        response = await self.client.post(f"{self.base}/ask/{conversation}", json=body)
        response.raise_for_status()
        return time.perf_counter() - started


class Sse(HttpWhole):
    name = "SSE"
    baseline = DirectStream

    async def ask(self, conversation: str, prompt: str) -> float:
        started = time.perf_counter()
        first = None
        async with self.client.stream(
            "POST", f"{self.base}/ask/{conversation}/stream", json={"prompt": prompt}
        ) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if first is None and line == "event: delta":
                    first = time.perf_counter() - started
                elif line.startswith("event: error"):
                    raise RuntimeError("error event")
        assert first is not None
        return first


class OpenAIRelay(HttpWhole):
    """The same request as the streaming baseline, sent to EasyBackend's ``/v1`` (no conversation)."""

    name = "/v1 relay (stream)"
    baseline = DirectStream

    async def ask(self, conversation: str, prompt: str) -> float:
        body = {
            "model": DEFAULT_MODEL,
            "stream": True,
            "messages": [{"role": "user", "content": prompt}],
        }
        url = f"{self.base}/v1/chat/completions"
        started = time.perf_counter()
        first = None
        async with self.client.stream("POST", url, json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if first is None and line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise RuntimeError("error event")
                    choices = chunk["choices"]
                    if choices and choices[0]["delta"].get("content"):
                        first = time.perf_counter() - started
        assert first is not None
        return first


class Responses(HttpWhole):
    """Streamed ``POST /v1/responses`` with memory: each ask continues the worker's conversation.

    The worker's first ask (its warm-up) starts a conversation; each later ask
    passes ``previous_response_id``, the id of the ask before it, so its context
    holds the conversation's newest turns that fit the window and its answer is
    stored after them (at concurrency 1 the window is full after about 60 asks:
    61 earlier turns, 123 messages; above it each worker is counted once a
    round, on its second ask: one earlier turn). The first token is the first
    ``response.output_text.delta`` event. The baseline is the streaming one of
    the SSE and relay rows. The response id is read from the ``response.created``
    event once the answer is over, off the clock.
    """

    name = "/v1/responses (stream, memory)"
    baseline = DirectStream

    def __init__(self, stack: Stack, client: httpx2.AsyncClient) -> None:
        super().__init__(stack, client)
        self.previous: str | None = None  # the id of this worker's last response

    async def ask(self, conversation: str, prompt: str) -> float:
        body: dict[str, object] = {"model": DEFAULT_MODEL, "input": prompt, "stream": True}
        if self.previous is not None:
            body["previous_response_id"] = self.previous
        url = f"{self.base}/v1/responses"
        started = time.perf_counter()
        first = None
        created = None  # the data line of response.created, read once the answer is over
        async with self.client.stream("POST", url, json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    if first is None and line == "event: response.output_text.delta":
                        first = time.perf_counter() - started
                    elif line == "event: response.failed":
                        raise RuntimeError("response.failed")
                elif created is None and line.startswith("data: "):
                    created = line[6:]
        assert first is not None and created is not None
        event = json.loads(created)
        assert event["type"] == "response.created"
        self.previous = event["response"]["id"]
        return first


class WebSocket(Client):
    name = "WebSocket"
    baseline = DirectStream

    def __init__(self, stack: Stack, client: httpx2.AsyncClient) -> None:
        self.url = f"ws://127.0.0.1:{stack.ws}"

    async def __aenter__(self) -> WebSocket:
        self._connection = open_websocket_url(self.url, message_queue_size=64)
        self.ws = await self._connection.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._connection.__aexit__(*exc_info)

    async def ask(self, conversation: str, prompt: str) -> float:
        started = time.perf_counter()
        await self.ws.send_message(
            json.dumps({"type": "ask", "conversation_id": conversation, "prompt": prompt})
        )
        first = None
        while True:
            message = json.loads(await self.ws.get_message())
            if message["type"] == "delta" and first is None:
                first = time.perf_counter() - started
            elif message["type"] == "error":
                raise RuntimeError(message["message"])
            elif message["type"] == "end":
                return first if first is not None else time.perf_counter() - started


class Grpc(Client):
    name = "gRPC"
    baseline = DirectStream

    def __init__(self, stack: Stack, client: httpx2.AsyncClient) -> None:
        self.port = stack.grpc

    async def __aenter__(self) -> Grpc:
        self._channel = purerpc.insecure_channel("127.0.0.1", self.port)
        self.stub = chat_grpc.ChatStub(await self._channel.__aenter__())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._channel.__aexit__(*exc_info)

    async def ask(self, conversation: str, prompt: str) -> float:
        started = time.perf_counter()
        first = None
        async for reply in self.stub.Ask(
            chat_pb2.AskRequest(conversation_id=conversation, prompt=prompt)
        ):
            if first is None and reply.response:
                first = time.perf_counter() - started
        return first if first is not None else time.perf_counter() - started


# --- measurements


@dataclass(frozen=True)
class Load:
    """The answers the fake upstream gives in a time-to-first-token row."""

    tokens: int
    token_delay: float  # seconds between tokens (token i is due i delays after the start)

    @property
    def prompt(self) -> str:
        return f"[[fake:tokens={self.tokens}]][[fake:delay={self.token_delay}]] hello there"

    @property
    def answer_s(self) -> float:
        """How long one answer streams: the span over which the workers start."""
        return self.tokens * self.token_delay


UNPACED = Load(tokens=20, token_delay=0.0)  # concurrency 1


def paced_load(args: argparse.Namespace) -> Load:
    """The load above concurrency 1: the flags, else 100 tokens at 0.02 s (quick: 10 at 0.005)."""
    tokens = args.answer_tokens if args.answer_tokens is not None else 10 if args.quick else 100
    delay = args.token_delay if args.token_delay is not None else 0.005 if args.quick else 0.02
    return Load(tokens, delay)


async def run_workers(
    concurrency: int, per_worker: int, make: Callable[[], Client], load: Load
) -> tuple[list[float], int]:
    """Staggered workers asking back to back; returns (seconds per counted ask, errors).

    Worker i waits i/concurrency of one answer's duration, then asks 1 + ``per_worker``
    times; its first ask (the warm-up, during the ramp-up) is not counted.
    """
    samples: list[float] = []
    errors = 0

    async def worker(index: int) -> None:
        nonlocal errors
        await trio.sleep(index / concurrency * load.answer_s)
        try:
            async with make() as client:
                for round_ in range(1 + per_worker):
                    conversation = f"w{index}-{round_}-{time.monotonic_ns()}"
                    seconds = await client.ask(conversation, load.prompt)
                    if round_:
                        samples.append(seconds)
        except Exception:
            errors += 1

    async with trio.open_nursery() as nursery:
        for index in range(concurrency):
            nursery.start_soon(worker, index)
    return samples, errors


async def ttft(
    stack: Stack, protocol: type, concurrency: int, per_worker: int, load: Load, rounds: int = 1
) -> dict[str, object]:
    """Added time to first token of ``protocol`` over its direct baseline (see :func:`ttft_rows`)."""
    (row,) = await ttft_rows(stack, [protocol], concurrency, per_worker, load, rounds)
    return row


async def ttft_rows(
    stack: Stack,
    protocols: list[type],
    concurrency: int,
    per_worker: int,
    load: Load,
    rounds: int = 1,
) -> list[dict[str, object]]:
    """Added time to first token of each of ``protocols`` over its direct baseline, under ``load``.

    For ``rounds`` rounds (``per_worker`` asks per worker each) every protocol
    takes its turn, and within it direct and server take turns, so that a drift
    in the machine's speed weighs on direct and server, and on every protocol, alike.
    """
    limits = httpx2.Limits(max_connections=None, max_keepalive_connections=None)
    samples = {protocol: {"direct": [], "server": []} for protocol in protocols}
    errors = dict.fromkeys(protocols, 0)
    async with httpx2.AsyncClient(timeout=120, limits=limits) as http:
        for _ in range(rounds):
            for protocol in protocols:
                for label, kind in (("direct", protocol.baseline), ("server", protocol)):

                    def make(kind: type = kind) -> Client:
                        return kind(stack, http)

                    taken, failed = await run_workers(concurrency, per_worker, make, load)
                    samples[protocol][label] += taken
                    errors[protocol] += failed if label == "server" else 0
    rows = []
    for protocol in protocols:
        direct, server = samples[protocol]["direct"], samples[protocol]["server"]
        rows.append(
            {
                "protocol": protocol.name,
                "concurrency": concurrency,
                "answer_tokens": load.tokens,
                "token_delay_s": load.token_delay,
                "samples": len(server),
                "errors": errors[protocol],
                "direct_p50_ms": round(statistics.median(direct) * 1000, 2),
                "server_p50_ms": round(statistics.median(server) * 1000, 2),
                "added_p50_ms": round(
                    (statistics.median(server) - statistics.median(direct)) * 1000, 2
                ),
                "added_p99_ms": round(
                    (percentile(server, 0.99) - percentile(direct, 0.99)) * 1000, 2
                ),
            }
        )
    return rows


async def throughput(stack: Stack, concurrency: int, seconds: float) -> dict[str, object]:
    """Whole-answer asks per second (persistence on), server and direct."""
    figures = {}
    limits = httpx2.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx2.AsyncClient(timeout=60, limits=limits) as client:
        for label, kind in (("direct", DirectWhole), ("server", HttpWhole)):
            counts: list[int] = []

            async def worker(ask: Callable, name: str, deadline: float, counts: list[int]) -> None:
                round_ = 0
                while time.perf_counter() < deadline:
                    await ask(f"{name}-{round_}", PROMPT)
                    round_ += 1
                counts.append(round_)

            started = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for index in range(concurrency):
                    ask = kind(stack, client).ask
                    nursery.start_soon(worker, ask, f"t{index}-{label}", started + seconds, counts)
            figures[label] = sum(counts) / (time.perf_counter() - started)
    return {
        "concurrency": concurrency,
        "server_asks_per_s": round(figures["server"], 1),
        "direct_asks_per_s": round(figures["direct"], 1),
        "ratio": round(figures["server"] / figures["direct"], 3),
    }


async def open_streams(
    stack: Stack, protocol: type, count: int, answer_seconds: float
) -> dict[str, object]:
    """``count`` streams open at once (each answer lasts about ``answer_seconds``)."""
    assert stack.server is not None
    tokens = 20
    delay = answer_seconds / tokens
    prompt = f"[[fake:tokens={tokens}]][[fake:delay={delay}]] long"
    before = rss_kib(stack.server.pid)
    peak = before
    errors = 0
    limits = httpx2.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx2.AsyncClient(timeout=120, limits=limits) as http:
        async with trio.open_nursery() as nursery:

            async def one(index: int) -> None:
                nonlocal errors
                try:
                    async with protocol(stack, http) as client:
                        await client.ask(f"open-{protocol.name}-{index}", prompt)
                except Exception:
                    errors += 1

            async def sample_memory() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, rss_kib(stack.server.pid))
                    await trio.sleep(0.1)

            nursery.start_soon(sample_memory)
            async with trio.open_nursery() as streams:
                for index in range(count):
                    streams.start_soon(one, index)
            nursery.cancel_scope.cancel()
    return {
        "protocol": protocol.name,
        "streams": count,
        "errors": errors,
        "rss_before_mib": round(before / 1024, 1),
        "rss_peak_mib": round(peak / 1024, 1),
        "kib_per_stream": round((peak - before) / count, 1),
    }


def seed_conversation(
    database: Path, conversation_id: str, parents: list[int | None], head: int
) -> None:
    """Store a conversation directly (the server is stopped): turn ``seq`` (from 1) is a child
    of ``parents[seq - 1]`` (None: a first turn), the head is turn ``head``; turn ids are
    ``<conversation_id>-<seq>``.

    Each turn is about 350 tokens, so the default 4096-token window holds about ten of them:
    every conversation sends about the same context upstream, and what differs is only the
    history the server has to look through.
    """
    prompt = " ".join(f"word{i}" for i in range(150))
    answer = " ".join(f"reply{i}" for i in range(200))
    depths: list[int] = []
    for parent in parents:
        depths.append(depths[parent - 1] + 1 if parent else 1)
    db = sqlite3.connect(database)
    with db:
        now = time.time()
        db.execute(
            "INSERT INTO conversations (owner, conversation_id, turn_count, created_at, updated_at,"
            " head_seq, last_seq) VALUES ('', ?, ?, ?, ?, ?, ?)",
            (conversation_id, len(parents), now, now, head, len(parents)),
        )
        (pk,) = db.execute(
            "SELECT pk FROM conversations WHERE conversation_id = ?", (conversation_id,)
        ).fetchone()
        db.executemany(
            "INSERT INTO turns (conversation_pk, seq, prompt, prompt_tokens, answer, answer_tokens,"
            " model, finish_reason, usage_prompt_tokens, usage_completion_tokens, created_at,"
            " finished_at, turn_id, parent_seq, depth)"
            " VALUES (?, ?, ?, 150, ?, 200, 'm', 'stop', 150, 200, ?, ?, ?, ?, ?)",
            (
                (pk, seq, f"{seq} {prompt}", f"{seq} {answer}", now, now,
                 f"{conversation_id}-{seq}", parent, depth)
                for seq, (parent, depth) in enumerate(zip(parents, depths, strict=True), 1)
            ),
        )  # fmt: skip
    db.close()


async def indexed(database: Path, limit: float = 300) -> None:
    """Wait until the server has put every seeded turn in its search index: it does so in the
    background, in batches, and a backlog of 20,000 turns would weigh on the asks measured."""
    with trio.fail_after(limit):
        while True:
            db = sqlite3.connect(database)
            try:
                (pending,) = db.execute(
                    "SELECT count(*) FROM conversations WHERE last_seq > indexed_seq"
                ).fetchone()
            finally:
                db.close()
            if not pending:
                return
            await trio.sleep(0.2)


def chain(turns: int) -> list[int | None]:
    """The parents of a linear conversation: each turn the child of the one before."""
    return [None, *range(1, turns)]


def branched(turns: int, every: int = 2, siblings: int = 3) -> tuple[list[int | None], int]:
    """The parents of a conversation of ``turns`` turns with many side branches, and its
    deepest leaf: along one path, every ``every``-th turn has ``siblings`` siblings (answered
    before it, as regenerates or edits would be), each a leaf of its own."""
    parents: list[int | None] = []
    leaf: int | None = None  # the path's last turn
    depth = 0
    while len(parents) < turns:
        depth += 1
        if depth % every == 0:
            for _ in range(min(siblings, turns - len(parents) - 1)):
                parents.append(leaf)
        parents.append(leaf)
        leaf = len(parents)
    return parents, leaf


async def long_conversation(
    stack: Stack, asks: int, at: dict[str, tuple[str, str | None]], rounds: int = 5
) -> dict[str, float]:
    """The p50 latency (s) of a whole-answer ask for each label of ``at``: (the conversation,
    the parent_id to ask with; None: at the head). They take turns, ``rounds`` rounds of
    ``asks / rounds`` asks each, so a drift of the machine weighs on all alike."""
    samples: dict[str, list[float]] = {label: [] for label in at}
    async with httpx2.AsyncClient(timeout=60) as client:
        ask = HttpWhole(stack, client).ask
        for conversation, parent_id in at.values():
            await ask(conversation, PROMPT, parent_id)  # warm-up
        for _ in range(rounds):
            for label, (conversation, parent_id) in at.items():
                for _ in range(max(1, asks // rounds)):
                    samples[label].append(await ask(conversation, PROMPT, parent_id))
    return {label: statistics.median(values) for label, values in samples.items()}


# --- the run


ROWS = ("startup", "ttft", "throughput", "streams", "long")  # what --only can select
# The protocols of the time-to-first-token rows, by the name --protocol selects them with.
TTFT_PROTOCOLS = {
    "http": HttpWhole,
    "sse": Sse,
    "ws": WebSocket,
    "grpc": Grpc,
    "relay": OpenAIRelay,
    "responses": Responses,
}


async def main(args: argparse.Namespace) -> dict[str, object]:
    quick = args.quick
    rows = set(args.only or ROWS)
    concurrencies = args.concurrency or ([1, 10] if quick else [1, 100, 1000])
    protocols = [TTFT_PROTOCOLS[name] for name in args.protocol or TTFT_PROTOCOLS]
    samples = 20 if quick else 200
    paced = paced_load(args)
    stream_counts = [20] if quick else [2000]
    long_turns = 200 if quick else 10_000
    report: dict[str, object] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "quick": quick,
    }
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp))
        try:
            await stack.start_upstream()
            startups = []
            for _ in range(1 if quick or "startup" not in rows else 3):
                startups.append(await stack.start_server())  # also creates the database
                stack.stop_server()
            if "startup" in rows:
                report["startup_s"] = round(statistics.median(startups), 3)
            await stack.start_server()

            if "ttft" in rows:
                report["ttft"] = []
            for concurrency in concurrencies if "ttft" in rows else []:
                # in turns against drift: 5 rounds at 1, 3 up to 100, 1 above (it takes long)
                rounds = 5 if concurrency == 1 else 3 if concurrency <= 100 else 1
                per_worker = math.ceil(samples / concurrency / (rounds if concurrency > 1 else 1))
                load = paced if concurrency > 1 else UNPACED
                for row in await ttft_rows(stack, protocols, concurrency, per_worker, load, rounds):
                    report["ttft"].append(row)
                    print(json.dumps(row), flush=True)

            if "throughput" in rows:
                report["throughput"] = await throughput(
                    stack, 64 if not quick else 8, 3 if quick else 10
                )
                print(json.dumps(report["throughput"]), flush=True)

            if "streams" in rows:
                report["streams"] = []
            for count in stream_counts if "streams" in rows else []:
                for protocol in (Sse, WebSocket, Grpc):
                    row = await open_streams(stack, protocol, count, 2 if quick else 5)
                    report["streams"].append(row)
                    print(json.dumps(row), flush=True)

            if "long" in rows:
                report["long_conversation"] = await long_rows(stack, long_turns, quick)
                print(json.dumps(report["long_conversation"]), flush=True)
        finally:
            stack.stop()
    return report


async def long_rows(stack: Stack, turns: int, quick: bool) -> dict[str, object]:
    """Asks on a 10-turn conversation against a ``turns``-turn one, asked at the head; and
    against a ``turns``-turn one with many side branches, asked at its deepest leaf by
    parent_id (the 10-turn one then asked by parent_id too, at its last turn)."""
    stack.stop_server()
    database = stack.data_dir / "easybackend.sqlite3"
    seed_conversation(database, "short", chain(10), head=10)
    seed_conversation(database, "short-by-parent", chain(10), head=10)
    seed_conversation(database, "long", chain(turns), head=turns)
    parents, leaf = branched(turns)
    seed_conversation(database, "branched", parents, head=len(parents) - 1)  # a side leaf
    await stack.start_server()
    await indexed(database)
    p50 = await long_conversation(
        stack,
        10 if quick else 50,
        {
            "short": ("short", None),
            "long": ("long", None),
            "short at its last turn": ("short-by-parent", "short-by-parent-10"),
            "branched": ("branched", f"branched-{leaf}"),
        },
    )
    depth = sum(1 for _ in _path(parents, leaf))
    return {
        "turns": turns,
        "p50_10_turns_ms": round(p50["short"] * 1000, 2),
        "p50_long_ms": round(p50["long"] * 1000, 2),
        "ratio": round(p50["long"] / p50["short"], 3),
        "branched": {
            "turns": len(parents),
            "path_turns": depth,
            "side_turns": len(parents) - depth,
            "p50_10_turns_ms": round(p50["short at its last turn"] * 1000, 2),
            "p50_ms": round(p50["branched"] * 1000, 2),
            "ratio": round(p50["branched"] / p50["short at its last turn"], 3),
        },
    }


def _path(parents: list[int | None], seq: int | None):
    while seq is not None:
        yield seq
        seq = parents[seq - 1]


def load_sentence(rows: list[dict]) -> str:
    """What the load of the time-to-first-token rows was (the concurrencies run, --concurrency)."""
    single = next((row for row in rows if row["concurrency"] == 1), None)
    paced = next((row for row in rows if row["concurrency"] > 1), None)
    parts = []
    if single is not None:
        parts.append(
            f"at concurrency 1, one client asks for {single['answer_tokens']}-token answers with"
            " no delay"
        )
    if paced is not None:
        parts.append(
            "at concurrency N above 1, N clients, starting spread over one answer's duration,"
            f" each ask back to back for {paced['answer_tokens']}-token answers at"
            f" {paced['token_delay_s']} s per token, so N asks are in flight (each client's first"
            " ask is not counted)"
        )
    return "Load, the same direct and through EasyBackend: " + "; ".join(parts) + "."


def markdown(report: dict) -> str:
    lines = [f"Machine: {report['machine']}.", ""]
    if "startup_s" in report:
        lines += [f"Start-up until all three protocols answer: **{report['startup_s']} s**.", ""]
    if "ttft" in report:
        lines += [
            load_sentence(report["ttft"]),
            "",
            "| protocol | concurrency | direct p50 ms | server p50 ms | added p50 ms | added p99 ms | errors |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in report["ttft"]:
            lines.append(
                f"| {row['protocol']} | {row['concurrency']} | {row['direct_p50_ms']} | {row['server_p50_ms']} "
                f"| {row['added_p50_ms']} | {row['added_p99_ms']} | {row['errors']} |"
            )
        lines.append("")
    if "throughput" in report:
        t = report["throughput"]
        lines += [
            f"Whole-answer asks per second at concurrency {t['concurrency']} (persistence on): "
            f"**{t['server_asks_per_s']}** through EasyBackend, {t['direct_asks_per_s']} direct (ratio {t['ratio']}).",
            "",
        ]
    if "streams" in report:
        lines += [
            "| protocol | open streams | errors | RSS before MiB | RSS peak MiB | KiB per stream |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in report["streams"]:
            lines.append(
                f"| {row['protocol']} | {row['streams']} | {row['errors']} | {row['rss_before_mib']} "
                f"| {row['rss_peak_mib']} | {row['kib_per_stream']} |"
            )
        lines.append("")
    if "long_conversation" in report:
        long = report["long_conversation"]
        tree = long["branched"]
        lines += [
            f"Whole-answer ask on a conversation of 10 turns: p50 {long['p50_10_turns_ms']} ms; "
            f"of {long['turns']} turns: p50 {long['p50_long_ms']} ms (ratio {long['ratio']}).",
            "",
            f"Ask by parent_id at the deepest leaf of a conversation of {tree['turns']} turns "
            f"({tree['side_turns']} of them in side branches, {tree['path_turns']} on the path): "
            f"p50 {tree['p50_ms']} ms; at the last turn of a 10-turn conversation: p50 "
            f"{tree['p50_10_turns_ms']} ms (ratio {tree['ratio']}).",
            "",
        ]
    return "\n".join(lines).rstrip("\n") + "\n"


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument(
        "--token-delay",
        type=float,
        help="fake upstream delay per token (s) in the time-to-first-token rows above concurrency"
        " 1; about what hosted models stream (default 0.02: 50 tokens/s; 0.005 with --quick)",
    )
    parser.add_argument(
        "--answer-tokens",
        type=int,
        help="tokens per answer in those rows (default 100; 10 with --quick)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=ROWS,
        help="run only these rows (repeat the option for several); long: the long-conversation"
        " rows (10,000 turns, linear and branched)",
    )
    parser.add_argument(
        "--protocol",
        action="append",
        choices=TTFT_PROTOCOLS,
        help="the protocols of the time-to-first-token rows (repeat for several; default all);"
        " relay: POST /v1/chat/completions, streaming, no conversation; responses: POST"
        " /v1/responses, streaming, each ask continuing the worker's conversation",
    )
    parser.add_argument(
        "--concurrency",
        action="append",
        type=int,
        help="the concurrencies of the time-to-first-token rows (repeat for several;"
        " default 1, 100 and 1000; 1 and 10 with --quick)",
    )
    parser.add_argument("--json", type=Path, help="write the report as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the report as a Markdown table here")
    args = parser.parse_args()
    report = trio.run(main, args)
    text = markdown(report)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    cli()
