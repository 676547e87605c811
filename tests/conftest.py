"""Shared fixtures: the fake upstream and an EasyBackend server, both on real loopback sockets.

``fake`` is a FakeUpstream served in the test's nursery. ``start_server``
runs :func:`easybackend.app.serve` in the test's nursery against it and
returns a :class:`Server` once every listener accepts; ``server`` is one
started with the defaults (HTTP only).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx2
import pytest
import trio

from easybackend.app import Running, serve
from easybackend.fake_upstream import FakeUpstream
from easybackend.settings import Settings, load_settings

UPSTREAM_KEY = "sk-test-upstream-SECRET-0123456789"
# Every key the tests use contains SECRET; prompts that must never be logged contain PROMPT-SENTINEL.
# A handler watches every log record of the whole run at INFO and above for both (see below).
FORBIDDEN_IN_LOGS = ("SECRET", "PROMPT-SENTINEL")


class _LogWatch(logging.Handler):
    """Keeps the INFO-and-above log lines that hold a key or a sentinel prompt."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.leaks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        if any(word in line for word in FORBIDDEN_IN_LOGS):
            self.leaks.append(f"{record.name} {record.levelname}: {line[:300]}")


LOG_WATCH = _LogWatch()


def pytest_configure(config: pytest.Config) -> None:
    root = logging.getLogger()
    root.addHandler(LOG_WATCH)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any log line at INFO or above, in any test, held a key or a sentinel prompt."""
    if LOG_WATCH.leaks:
        print("\nlog lines that leak a key or a prompt:\n" + "\n".join(LOG_WATCH.leaks[:20]))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def free_port() -> int:
    """A TCP port that was free a moment ago on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass
class Server:
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


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeUpstream:
    upstream = FakeUpstream(api_key=UPSTREAM_KEY)
    await nursery.start(upstream.serve)
    return upstream


@pytest.fixture
def make_settings(tmp_path: Path, fake: FakeUpstream) -> Callable[..., Settings]:
    """Settings for a test server: loopback, free ports, the fake upstream, a fresh data dir.

    Keyword arguments are environment variables (``HTTP_PORT="off"`` …).
    """

    def make(**env: str) -> Settings:
        values = {
            "OPENAI_API_KEY": UPSTREAM_KEY,
            "OPENAI_BASE_URL": fake.base_url(),
            "HOST": "127.0.0.1",
            "HTTP_PORT": str(free_port()),
            "GRPC_PORT": "off",
            "WS_PORT": "off",
            "CONVERSATIONS_DIR": str(tmp_path / "conversations"),
            "UPSTREAM_RETRIES": "0",
            **env,
        }
        return load_settings(values, environ={}, env_file=None)

    return make


@pytest.fixture
async def start_server(
    nursery: trio.Nursery, fake: FakeUpstream, make_settings: Callable[..., Settings]
) -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    """Start servers; at teardown each still running is shut down gracefully (and must stop)."""
    started: list[Server] = []

    async def run(
        settings: Settings, shutdown: trio.Event, stopped: trio.Event, *, task_status
    ) -> None:
        try:
            await serve(settings, shutdown=shutdown, task_status=task_status)
        finally:
            stopped.set()

    async def start(**env: str) -> Server:
        settings = make_settings(**env)
        shutdown, stopped = trio.Event(), trio.Event()
        with trio.fail_after(10):
            running = await nursery.start(run, settings, shutdown, stopped)
        server = Server(settings, running, fake, shutdown, stopped)
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown.set()
    with trio.fail_after(15):
        for server in started:
            await server.stopped.wait()


@pytest.fixture
async def server(start_server: Callable[..., Awaitable[Server]]) -> Server:
    return await start_server()
