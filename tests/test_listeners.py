"""A second instance on taken ports fails loudly, naming the port, and the first keeps serving."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
import trio
from helpers.servers import free_port

ROOT = Path(__file__).resolve().parent.parent


def instance_env(tmp_path: Path, **ports: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "GPT_"))}
    env.update(HOST="127.0.0.1", CONVERSATIONS_DIR=str(tmp_path / "data"), **ports)
    return env


@pytest.fixture
async def first_instance(tmp_path: Path):
    ports = {
        "HTTP_PORT": str(free_port()),
        "GRPC_PORT": str(free_port()),
        "WS_PORT": str(free_port()),
    }
    process = await trio.lowlevel.open_process(
        [sys.executable, str(ROOT / "run.py"), "--demo"],
        env=instance_env(tmp_path, **ports),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{ports['HTTP_PORT']}"
    async with httpx2.AsyncClient(base_url=url, timeout=5) as client:
        with trio.fail_after(20):
            while True:
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx2.TransportError:
                    await trio.sleep(0.05)
    yield ports, url
    process.send_signal(signal.SIGTERM)
    with trio.fail_after(15):
        assert await process.wait() == 0


@pytest.mark.parametrize("taken", ["HTTP_PORT", "GRPC_PORT", "WS_PORT"])
async def test_second_instance_on_a_taken_port_exits_naming_it(first_instance, tmp_path, taken):
    ports, url = first_instance
    second_ports = {
        "HTTP_PORT": str(free_port()),
        "GRPC_PORT": str(free_port()),
        "WS_PORT": str(free_port()),
    }
    second_ports[taken] = ports[taken]
    with trio.fail_after(20):
        result = await trio.run_process(
            [sys.executable, str(ROOT / "run.py"), "--demo"],
            env=instance_env(tmp_path / "second", **second_ports),
            cwd=tmp_path,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    stderr = result.stderr.decode()
    assert result.returncode == 1
    error_lines = [line for line in stderr.splitlines() if line.startswith("easybackend: error:")]
    assert len(error_lines) == 1, stderr
    assert f"port {ports[taken]}" in error_lines[0] and "already in use" in error_lines[0]
    assert "Traceback" not in stderr
    async with httpx2.AsyncClient(base_url=url, timeout=5) as client:
        reply = await client.post("/ask/still-here", json={"prompt": "are you there?"})
    assert reply.status_code == 200
    assert reply.json()["response"] == "echo(1): are you there?"


async def test_startup_objects_are_left_out_of_later_garbage_collections(server):
    """Full collections would otherwise walk everything start-up built, stalling every answer."""
    assert gc.get_freeze_count() > 10_000  # modules, the apps, schemas: frozen once serving
