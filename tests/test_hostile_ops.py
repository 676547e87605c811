"""Hostile operations: signals while the server starts, storage whose writes fail.

- SIGTERM/SIGINT at any moment of start-up (the command still importing, a
  port already accepting but nothing served yet) stop a real ``python run.py``
  process with exit status 0 and no traceback.
- When every write fails, readiness says so (``/readyz`` 503, gRPC health
  NOT_SERVING) and recovers by itself once writes work again; SQLite on a
  size-limited filesystem, PostgreSQL with its database made read-only.
"""

from __future__ import annotations

import errno
import os
import secrets
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import trio
from helpers.grpc import grpc_health
from helpers.http import error_code
from helpers.postgres import PG_ADMIN
from helpers.servers import Server, ServerProcess, StartServer, free_port, server_env

from easybackend.fake_upstream import FakeUpstream
from easybackend.proto_gen import health_pb2

# --------------------------------------------------------------------------- signals at start-up


def stop_signals_blocked(pid: int) -> bool:
    """True once the process blocks SIGINT and SIGTERM (its ``SigBlk`` mask, from /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(
        int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigBlk")
    )
    wanted = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))
    return mask & wanted == wanted


def listens(pid: int, port: int) -> bool:
    """True once process ``pid`` itself listens on TCP ``port`` (from /proc: no connection made)."""
    try:
        sockets = {os.readlink(fd.path) for fd in os.scandir(f"/proc/{pid}/fd")}
        table = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    for line in table:
        fields = line.split()
        local_port, state, inode = int(fields[1].split(":")[1], 16), fields[3], fields[9]
        if local_port == port and state == "0A" and f"socket:[{inode}]" in sockets:
            return True
    return False


async def poll(predicate: Callable[[], bool], process: ServerProcess, within: float = 15.0) -> None:
    """Poll ``predicate`` (every millisecond or so) until true; fails if the process exits first."""
    assert process.process is not None
    with trio.fail_after(within):
        while not predicate():
            assert process.process.returncode is None, process.output
            await trio.sleep(0.001)


@pytest.mark.parametrize(
    ("moment", "signum"),
    [
        ("the command holds signals", signal.SIGTERM),
        ("the HTTP port accepts", signal.SIGTERM),
        ("the WebSocket port accepts", signal.SIGTERM),
        ("the HTTP port accepts", signal.SIGINT),
    ],
)
async def test_a_stop_signal_during_start_up_exits_0_without_a_traceback(
    fake: FakeUpstream, tmp_path: Path, moment: str, signum: signal.Signals
) -> None:
    http_port, grpc_port, ws_port = free_port(), free_port(), free_port()
    env = server_env(
        fake,
        HTTP_PORT=str(http_port),
        GRPC_PORT=str(grpc_port),
        WS_PORT=str(ws_port),
        CONVERSATIONS_DIR=str(tmp_path / "conversations"),
    )
    server = await ServerProcess(tmp_path, env).start()
    assert server.process is not None
    try:
        pid = server.process.pid
        ready: Callable[[], bool] = {
            "the command holds signals": lambda: stop_signals_blocked(pid),
            "the HTTP port accepts": lambda: listens(pid, http_port),
            "the WebSocket port accepts": lambda: listens(pid, ws_port),
        }[moment]
        await poll(ready, server)
        server.process.send_signal(signum)
        with trio.fail_after(15):
            status = await server.process.wait()
    finally:
        server.ensure_stopped()
    assert status == 0, server.output
    assert "Traceback" not in server.output, server.output
    assert "stopped during start-up" in server.output, server.output  # nothing was served


# --------------------------------------------------------------------------- writes that fail


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for the test (skipped where mounting is not allowed)."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_up(directory: Path) -> Path:
    """Write a file into ``directory`` until its filesystem is full; returns the file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (64 * 1024, 4096, 1):
            for _ in range(100_000):  # a 4 MiB filesystem is full long before
                try:
                    os.write(fd, b"\0" * chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    return filler


@pytest.fixture
def pg_own_role() -> Iterator[tuple[str, str]]:
    """A PostgreSQL role owning a fresh schema: (role, DATABASE_URL that connects as it)."""
    role = f"eb_{secrets.token_hex(6)}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError:
        if os.environ.get("CI"):
            raise
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    with admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
        admin.execute(f"CREATE SCHEMA {role} AUTHORIZATION {role}")
    yield role, f"postgresql://{role}@127.0.0.1:5432/test?options=-csearch_path%3D{role}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f"DROP SCHEMA {role} CASCADE")
        admin.execute(f"DROP ROLE {role}")


def pg_admin(sql: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as admin:
        admin.execute(sql)


async def readiness(server: Server) -> tuple[int, int]:
    """(``/readyz`` status, gRPC health status)."""
    async with server.client() as client:
        http = (await client.get("/readyz")).status_code
    return http, await grpc_health(server.running.grpc_port)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def check_unready_while_writes_fail(
    server: Server, break_writes: Callable[[], object], mend_writes: Callable[[], object]
) -> None:
    """Ready; writes broken: an ask fails, readiness 503/NOT_SERVING; mended: ready, asks work."""
    assert await readiness(server) == (200, SERVING)
    async with server.client() as client:
        assert (await client.post("/ask/before", json={"prompt": "hello"})).status_code == 200
        await trio.to_thread.run_sync(break_writes)
        response = await client.post("/ask/during", json={"prompt": "hello"})
        assert response.status_code == 503, response.text
        assert error_code(response) == "storage_unavailable"
        assert await readiness(server) == (503, NOT_SERVING)
        assert await readiness(server) == (503, NOT_SERVING)  # it stays so: each check writes
        await trio.to_thread.run_sync(mend_writes)
        assert await readiness(server) == (200, SERVING)  # by itself, no ask needed
        assert (await client.post("/ask/after", json={"prompt": "hello"})).status_code == 200
        assert await readiness(server) == (200, SERVING)


async def test_readiness_reports_a_full_disk_under_sqlite(
    small_filesystem: Path, start_server: StartServer
) -> None:
    server = await start_server(
        CONVERSATIONS_DIR=str(small_filesystem / "conversations"), GRPC_PORT=str(free_port())
    )
    filler: list[Path] = []
    await check_unready_while_writes_fail(
        server,
        break_writes=lambda: filler.append(fill_up(small_filesystem)),
        mend_writes=lambda: filler.pop().unlink(),
    )


async def test_readiness_reports_a_database_that_refuses_writes_under_postgresql(
    pg_own_role: tuple[str, str], start_server: StartServer
) -> None:
    role, url = pg_own_role
    server = await start_server(DATABASE_URL=url, GRPC_PORT=str(free_port()))
    tables = f"ALL TABLES IN SCHEMA {role}"
    await check_unready_while_writes_fail(
        server,
        break_writes=lambda: pg_admin(f"REVOKE INSERT, UPDATE, DELETE ON {tables} FROM {role}"),
        mend_writes=lambda: pg_admin(f"GRANT INSERT, UPDATE, DELETE ON {tables} TO {role}"),
    )
