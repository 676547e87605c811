"""Hostile operations: signals while the server starts, storage whose writes fail.

- SIGTERM/SIGINT at any moment of start-up (the command still importing, a
  port already accepting but nothing served yet) stop a real ``python run.py``
  process with exit status 0 and no traceback.
- When every write fails, readiness says so (``/readyz`` 503, gRPC health
  NOT_SERVING) and recovers by itself once writes work again; SQLite on a
  size-limited filesystem, PostgreSQL with its database made read-only.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from conftest import free_port
from helpers_core import ServerProcess, server_env

from easybackend.fake_upstream import FakeUpstream

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


def accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


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
        ready: Callable[[], bool] = {
            "the command holds signals": lambda: stop_signals_blocked(server.process.pid),
            "the HTTP port accepts": lambda: accepts(http_port),
            "the WebSocket port accepts": lambda: accepts(ws_port),
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
    assert not accepts(http_port)
