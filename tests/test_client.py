"""``easybackend chat``, the terminal client, run as a real process against a real server."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import trio
from helpers.servers import Server, free_port

PROTOCOLS = ["http", "ws", "grpc"]


@pytest.fixture
async def all_protocols(start_server) -> Server:
    return await start_server(WS_PORT=str(free_port()), GRPC_PORT=str(free_port()))


def client_url(server: Server, protocol: str) -> str:
    ports = server.running
    return {
        "http": server.http_url,
        "ws": f"ws://127.0.0.1:{ports.ws_port}",
        "grpc": f"127.0.0.1:{ports.grpc_port}",
    }[protocol]


def chat_command(server: Server, protocol: str, conversation_id: str) -> list[str]:
    return [
        sys.executable, "-m", "easybackend.cli", "chat",
        "--protocol", protocol, "--url", client_url(server, protocol), "--conversation", conversation_id,
    ]  # fmt: skip


class Output:
    """Reads a process's stdout into a growing string."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.text = ""

    async def until(self, needle: str, *, seconds: float = 10) -> None:
        with trio.fail_after(seconds):
            while needle not in self.text:
                chunk = await self.stream.receive_some()
                if not chunk:
                    raise AssertionError(f"output ended before {needle!r}: {self.text!r}")
                self.text += chunk.decode()


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_piped_multiline_prompts_stream_and_remember(all_protocols, protocol):
    prompts = "first line\nsecond line with $5\n\nnext prompt\n"
    result = await trio.run_process(
        chat_command(all_protocols, protocol, f"cli-{protocol}"),
        stdin=prompts.encode(),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    output = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "echo(1): first line\nsecond line with $5\n" in output
    assert "echo(3): next prompt\n" in output
    assert "Traceback" not in result.stderr.decode()


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_interrupt_cancels_the_answer_and_the_client_goes_on(all_protocols, protocol):
    process = await trio.lowlevel.open_process(
        chat_command(all_protocols, protocol, f"int-{protocol}"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    output = Output(process.stdout)
    try:
        await process.stdin.send_all(b"[[fake:tokens=400]][[fake:delay=0.02]] long one\n\n")
        await output.until(" t5")
        process.send_signal(signal.SIGINT)
        await output.until("[cancelled]")
        await process.stdin.send_all(b"after\n\n")
        # the cancelled partial answer was stored as a turn: 1 turn + the new prompt = 3 messages
        await output.until("echo(3): after")
        await process.stdin.aclose()
        with trio.fail_after(10):
            assert await process.wait() == 0
    finally:
        process.kill()
        await process.wait()
    assert " t399" not in output.text
    assert any(event["event"] == "disconnected" for event in all_protocols.fake.events)


async def test_server_errors_are_shown_and_the_exit_code_says_so(all_protocols):
    result = await trio.run_process(
        chat_command(all_protocols, "http", "bad id"),
        stdin=b"hello\n\n",
        capture_stdout=True,
        check=False,
    )
    assert result.returncode == 1
    assert "[error] conversation_id must be" in result.stdout.decode()
