"""The fixtures of every test: the fake upstream, EasyBackend servers, PostgreSQL schemas.

``fake`` is a FakeUpstream served in the test's nursery. ``start_server``
runs :func:`easybackend.app.serve` in the test's nursery against it and
returns a :class:`helpers.servers.Server` once every listener accepts;
``server`` is one started with the defaults (HTTP only), ``grpc_server`` one
with gRPC and HTTP, ``backend_server`` one on each storage backend (SQLite,
PostgreSQL); ``store`` is an opened store of each backend. The helpers these build on live in the ``helpers``
package; test modules import from there, never from each other.

The log-leak watch (``helpers.logs.LOG_WATCH``) sees every log record of the
run at INFO and above; a line holding a key or a sentinel prompt fails the
run, also when it was logged in a pytest-xdist worker (each worker hands its
leaks to the controller when it finishes).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import trio
from helpers.logs import LOG_WATCH
from helpers.postgres import new_schema, pg_url
from helpers.servers import Server, StartServer, free_port
from helpers.upstream import UPSTREAM_KEY

from easybackend.app import serve
from easybackend.fake_upstream import FakeUpstream
from easybackend.settings import Settings, load_settings
from easybackend.storage import Storage, open_url

_WORKER_LEAKS: list[str] = []  # on the controller: what the workers reported


def pytest_configure(config: pytest.Config) -> None:
    root = logging.getLogger()
    root.addHandler(LOG_WATCH)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:  # pytest-xdist, on the controller
    _WORKER_LEAKS.extend(getattr(node, "workeroutput", {}).get("log_leaks", []))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any log line at INFO or above, in any test, held a key or a sentinel prompt."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # a pytest-xdist worker: the controller decides
        workeroutput["log_leaks"] = list(LOG_WATCH.leaks)
        return
    leaks = LOG_WATCH.leaks + _WORKER_LEAKS
    if leaks:
        print("\nlog lines that leak a key or a prompt:\n" + "\n".join(leaks[:20]))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
) -> AsyncIterator[StartServer]:
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
async def server(start_server: StartServer) -> Server:
    return await start_server()


@pytest.fixture
async def ws_server(start_server: StartServer) -> Server:
    """WebSocket and HTTP on one server."""
    return await start_server(WS_PORT=str(free_port()))


@pytest.fixture
async def grpc_server(start_server: StartServer) -> Server:
    """gRPC and HTTP on one server (HTTP is the reference for the management RPCs).

    A short grace, so that a test that leaves a call running still stops in time.
    """
    return await start_server(GRPC_PORT=str(free_port()), SHUTDOWN_GRACE="2")


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh schema on the local PostgreSQL, dropped afterwards (see helpers.postgres)."""
    yield from new_schema()


@pytest.fixture(params=["sqlite", "postgres"])
async def backend_server(request: pytest.FixtureRequest, start_server: StartServer) -> Server:
    """A server on each storage backend."""
    if request.param == "sqlite":
        return await start_server()
    schema = request.getfixturevalue("pg_schema")
    return await start_server(DATABASE_URL=pg_url(schema))


STORE_SETTINGS = load_settings({"OPENAI_API_KEY": "unused"}, environ={}, env_file=None)


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    """A store of each backend, opened (migrated) on a new database; closed afterwards."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    else:
        url = pg_url(request.getfixturevalue("pg_schema"))
    opened = await open_url(url, STORE_SETTINGS)
    yield opened
    await opened.close()
