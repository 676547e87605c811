"""Servers under test: EasyBackend in the test's nursery, or ``python run.py`` as a process.

Ports come from :func:`free_port`: each pytest-xdist worker hands out ports
from a range of its own, below the kernel's ephemeral range, so neither
another worker nor an outgoing connection takes a port between the moment a
test picks it and the moment its server listens there.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import BinaryIO

import httpx2
import trio

from easybackend.app import Running
from easybackend.fake_upstream import FakeUpstream
from easybackend.settings import ENVIRONMENT, Settings

from .upstream import UPSTREAM_KEY

REPO = Path(__file__).resolve().parent.parent.parent
RUN_PY = REPO / "run.py"

# Ports handed out: [10000, 32000) split between the workers (below 32768, where Linux's
# ephemeral range starts); each worker walks its own share once.
_PORTS_FIRST, _PORTS_END = 10000, 32000


def _port_range() -> range:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker.removeprefix("gw")) if worker.startswith("gw") else 0
    share = (_PORTS_END - _PORTS_FIRST) // max(workers, 1)
    first = _PORTS_FIRST + index * share
    return range(first, first + share)


_next_ports = itertools.cycle(_port_range())


def free_port() -> int:
    """A TCP port on loopback that is free now and that no other test of this run was given."""
    for _ in range(len(_port_range())):
        port = next(_next_ports)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port left in this worker's range")


@dataclasses.dataclass
class Server:
    """An EasyBackend served in the test's nursery (see the ``start_server`` fixture)."""

    settings: Settings
    running: Running
    fake: FakeUpstream
    shutdown: trio.Event  # set it to stop the server gracefully
    stopped: trio.Event  # set once serve() has returned

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.running.http_port}"

    def client(self, **kwargs: object) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(base_url=self.http_url, timeout=10, **kwargs)


StartServer = Callable[..., Awaitable[Server]]


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


# -- processes ----------------------------------------------------------------------------------


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
