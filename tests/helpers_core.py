"""Helpers shared by the tests.

Everything here talks to real sockets or reads the real SQLite file: the
fake upstream's records, the server's database, a server run as a real
``python run.py`` process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import httpx2
import trio
from conftest import UPSTREAM_KEY

from easybackend.fake_upstream import FakeUpstream
from easybackend.settings import ENVIRONMENT

REPO = Path(__file__).resolve().parent.parent
RUN_PY = REPO / "run.py"

# The fake's answer is split into these pieces ("tokens"); see easybackend/fake_upstream.py.
PIECES = re.compile(r"\s*\S+|\s+")


def echo(messages: int, text: str) -> str:
    """The fake upstream's answer to a request of ``messages`` messages whose last user text is ``text``."""
    return f"echo({messages}): {text}"


def full_answer(messages: int, text: str, tokens: int) -> str:
    """The fake's whole answer under ``[[fake:tokens=N]]`` (``text`` without the directives)."""
    pieces = PIECES.findall(echo(messages, text.strip()))
    pieces = (pieces + [f" t{i}" for i in range(1, tokens - len(pieces) + 1)])[:tokens]
    return "".join(pieces)


# -- the upstream's view -----------------------------------------------------------------------


def user(text: str) -> list[dict[str, str]]:
    """The messages of a one-prompt chat completion request."""
    return [{"role": "user", "content": text}]


def upstream_messages(fake: FakeUpstream, index: int = -1) -> list[dict[str, str]]:
    """The ``messages`` of one completion request the fake received."""
    return fake.requests[index]["body"]["messages"]


def history_of(messages: list[dict[str, str]]) -> list[tuple[str, str]]:
    """The (prompt, answer) turns a request carried before its new prompt; checks the roles."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    roles = [m["role"] for m in body]
    assert roles == ["user", "assistant"] * (len(body) // 2) + ["user"], roles
    return [(body[i]["content"], body[i + 1]["content"]) for i in range(0, len(body) - 1, 2)]


def events_of(fake: FakeUpstream, request_id: str) -> list[str]:
    return [e["event"] for e in fake.events if e["id"] == request_id]


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` until it holds; fails the test after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


# -- the database ------------------------------------------------------------------------------


async def port_closed(port: int, within: float = 5.0) -> None:
    """Wait until nothing accepts connections on ``port`` any more."""
    with trio.fail_after(within):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                return
            await stream.aclose()
            await trio.sleep(0.01)


def db_rows(path: Path, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
    """Run one read query on the database file with a connection of our own."""
    db = sqlite3.connect(path)
    try:
        db.row_factory = sqlite3.Row
        return db.execute(sql, tuple(params)).fetchall()
    finally:
        db.close()


def stored_turns(path: Path, conversation_id: str, owner: str = "") -> list[sqlite3.Row]:
    """The turns of one conversation, in seq order."""
    if not path.exists():
        return []
    return db_rows(
        path,
        "SELECT t.* FROM turns t JOIN conversations c ON c.pk = t.conversation_pk"
        " WHERE c.owner = ? AND c.conversation_id = ? ORDER BY t.seq",
        (owner, conversation_id),
    )


def turn_count(path: Path) -> int:
    if not path.exists():
        return 0
    return db_rows(path, "SELECT count(*) FROM turns")[0][0]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``root`` with its size and mtime."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# -- HTTP --------------------------------------------------------------------------------------


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Split a Server-Sent Events body into (event, data) pairs; every frame must have both."""
    frames = []
    assert text.endswith("\n\n"), text[-200:]
    for block in text.split("\n\n")[:-1]:
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        assert set(fields) == {"event", "data"}, block
        frames.append((fields["event"], json.loads(fields["data"])))
    return frames


def error_code(response: httpx2.Response) -> str:
    """The ``code`` of a JSON error response, checking its shape."""
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return body["error"]["code"]


async def raw_request(port: int, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send one HTTP/1.1 request exactly as written (no URL normalisation); returns (status, body)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        request = (
            f"{head} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        await stream.send_all(request)
        data = b""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some()
                assert chunk, f"connection closed before a whole response: {data!r}"
                data += chunk
            head_bytes, _, content = data.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head_bytes)
            assert length, head_bytes
            while len(content) < int(length[1]):
                chunk = await stream.receive_some()
                assert chunk, "connection closed before the whole body arrived"
                content += chunk
    return int(head_bytes.split(b"\r\n")[0].split()[1]), content


# -- servers -----------------------------------------------------------------------------------


def clean_env(**env: str) -> dict[str, str]:
    """This process's environment without any EasyBackend setting, plus ``env``."""
    base = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT and k != "API_KEYS"}
    base["PYTHONUNBUFFERED"] = "1"
    return {**base, **env}


def server_env(fake: FakeUpstream, **env: str) -> dict[str, str]:
    """A clean environment for ``python run.py`` on loopback, talking to ``fake``, no retries."""
    return clean_env(
        OPENAI_API_KEY=UPSTREAM_KEY,
        OPENAI_BASE_URL=fake.base_url(),
        HOST="127.0.0.1",
        UPSTREAM_RETRIES="0",
        **env,
    )


class ServerProcess:
    """``python run.py`` as a real process; its output goes to files in ``workdir``."""

    def __init__(self, workdir: Path, env: dict[str, str], args: Iterable[str] = ()) -> None:
        self.workdir = workdir
        self.env = env
        self.args = list(args)
        self.stdout_path = workdir / "server.stdout"
        self.stderr_path = workdir / "server.stderr"
        self.process: trio.Process | None = None

    def _output_files(self) -> tuple[BinaryIO, BinaryIO]:
        return open(self.stdout_path, "wb"), open(self.stderr_path, "wb")

    async def start(self) -> ServerProcess:
        out, err = self._output_files()
        try:
            self.process = await trio.lowlevel.open_process(
                [sys.executable, str(RUN_PY), *self.args],
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        finally:
            out.close()
            err.close()
        return self

    @property
    def output(self) -> str:
        return self.stdout_path.read_text() + self.stderr_path.read_text()

    async def wait_healthy(self, port: int, timeout: float = 20.0) -> None:
        """Poll ``GET /healthz`` until it answers 200; fails if the process exits first."""
        assert self.process is not None
        async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=2) as client:
            with trio.fail_after(timeout):
                while True:
                    if self.process.returncode is not None:
                        raise AssertionError(f"server exited early:\n{self.output}")
                    try:
                        if (await client.get("/healthz")).status_code == 200:
                            return
                    except httpx2.TransportError:
                        pass
                    await trio.sleep(0.05)

    async def interrupt(self, timeout: float = 15.0) -> int:
        """SIGINT, then wait for the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)
        with trio.fail_after(timeout):
            return await self.process.wait()

    async def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        with trio.fail_after(10):
            await self.process.wait()

    def ensure_stopped(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()


async def run_cli(
    workdir: Path, env: dict[str, str], args: Iterable[str] = (), timeout: float = 30.0
) -> subprocess.CompletedProcess[bytes]:
    """Run ``python run.py ARGS`` to completion (it must exit by itself)."""
    return await run_python(workdir, env, [str(RUN_PY), *args], timeout)


async def run_python(
    workdir: Path, env: dict[str, str], argv: Iterable[str], timeout: float = 30.0
) -> subprocess.CompletedProcess[bytes]:
    """Run ``python ARGV`` in ``workdir`` to completion, its output captured, any exit status."""
    with trio.fail_after(timeout):
        return await trio.run_process(
            [sys.executable, *argv],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
