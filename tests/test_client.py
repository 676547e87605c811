"""``easybackend chat``, the terminal client, run as a real process against a real server."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import trio
from helpers.servers import Server, free_port
from helpers.upstream import full_answer, queue_faults, roles_and_contents, upstream_messages

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


# --- /regenerate, /back, /branches: the conversation's tree (SPEC §12), over the HTTP API ---


async def run_piped(server: Server, conversation_id: str, text: str, protocol: str = "http"):
    """Run the client with ``text`` piped in; returns (exit code, stdout, stderr)."""
    result = await trio.run_process(
        chat_command(server, protocol, conversation_id),
        stdin=text.encode(),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    stderr = result.stderr.decode()
    assert "Traceback" not in stderr, stderr
    return result.returncode, result.stdout.decode(), stderr


async def tree_of(server: Server, conversation_id: str) -> dict:
    async with server.client() as client:
        response = await client.get(f"/conversations/{conversation_id}", params={"view": "tree"})
    assert response.status_code == 200, response.text
    return response.json()


def by_prompt(detail: dict) -> dict[str, dict]:
    """The turns of the whole tree by prompt (the tests' prompts are unique, regenerates aside)."""
    return {turn["messages"][0]["text"]: turn for turn in detail["tree"]}


async def test_regenerate_makes_a_sibling_and_the_next_ask_builds_on_the_new_answer(server):
    # the first ask answers as usual, the regenerate of its prompt with 5 pieces (a new answer)
    await queue_faults(server.fake, {}, {"tokens": 5})
    new_answer = full_answer(1, "hi", 5)
    code, output, _ = await run_piped(server, "regen", "hi\n\n/regenerate\nnext\n\n")
    assert code == 0, output
    assert output.startswith(f"echo(1): hi\n{new_answer}\n‹ 2/2 ›\n"), output
    assert "echo(3): next" in output
    assert roles_and_contents(upstream_messages(server.fake)) == [
        ("user", "hi"), ("assistant", new_answer), ("user", "next"),
    ]  # fmt: skip
    detail = await tree_of(server, "regen")
    first, again, after = detail["tree"]
    assert [first["messages"][1]["text"], again["messages"][1]["text"]] == [
        "echo(1): hi",
        new_answer,
    ]
    assert first["parent_id"] is again["parent_id"] is None
    assert after["parent_id"] == again["id"] == detail["history"][0]["id"]


async def test_back_then_an_ask_branches_and_keeps_the_old_turn(server):
    code, output, _ = await run_piped(server, "back", "one\n\ntwo\n\n/back\nthree\n\n")
    assert code == 0, output
    assert "echo(3): two\n[back] now at: one\necho(3): three\n‹ 2/2 ›\n" in output
    assert roles_and_contents(upstream_messages(server.fake)) == [
        ("user", "one"), ("assistant", "echo(1): one"), ("user", "three"),
    ]  # fmt: skip
    detail = await tree_of(server, "back")
    turns = by_prompt(detail)
    assert turns["two"]["messages"][1]["text"] == "echo(3): two"  # still there, as a branch
    assert turns["two"]["parent_id"] == turns["three"]["parent_id"] == turns["one"]["id"]
    assert turns["three"]["siblings"] == [turns["two"]["id"], turns["three"]["id"]]
    assert detail["head"] == turns["three"]["id"]
    assert [turn["messages"][0]["text"] for turn in detail["history"]] == ["one", "three"]


async def test_back_to_the_start_and_past_it(server):
    code, output, _ = await run_piped(server, "start", "one\n\n/back\n/back\nuno\n\n")
    assert code == 0, output
    assert (
        "[back] now at the start of the conversation\n"
        "[back] already at the start of the conversation\n"
        "echo(1): uno\n‹ 2/2 ›\n"
    ) in output
    assert roles_and_contents(upstream_messages(server.fake)) == [("user", "uno")]


async def test_branches_lists_the_versions_and_switching_moves_the_next_ask(server):
    script = "one\n\n/back\nuno\n\n/branches\n1\nnext\n\n"
    code, output, _ = await run_piped(server, "branches", script)
    assert code == 0, output
    assert (
        "[branches] versions of the last turn:\n"
        "  1. one → echo(1): one\n"
        "* 2. uno → echo(1): uno\n"
        "switch to (1-2, Enter keeps 2): \n"
        "[branches] now at ‹ 1/2 ›:\n"
        "echo(1): one\n"
    ) in output
    assert roles_and_contents(upstream_messages(server.fake)) == [
        ("user", "one"), ("assistant", "echo(1): one"), ("user", "next"),
    ]  # fmt: skip
    detail = await tree_of(server, "branches")
    assert [turn["messages"][0]["text"] for turn in detail["history"]] == ["one", "next"]
    assert by_prompt(detail)["uno"]["messages"][1]["text"] == "echo(1): uno"


async def test_branches_enter_keeps_the_head_and_a_bad_choice_is_refused(server):
    script = "one\n\n/back\nuno\n\n/branches\n\n/branches\n7\nnext\n\n"
    code, output, _ = await run_piped(server, "keep", script)
    assert code == 1, output  # the bad choice is an error, shown, and the client went on
    assert "Enter keeps 2): \n[branches] kept\n" in output
    assert "[error] /branches: no version '7' (1-2); the head stays\n" in output
    assert roles_and_contents(upstream_messages(server.fake)) == [
        ("user", "uno"), ("assistant", "echo(1): uno"), ("user", "next"),
    ]  # fmt: skip


async def test_an_answer_shows_its_position_when_the_conversation_branched_elsewhere(server):
    async with server.client() as client:
        assert (await client.post("/ask/elsewhere", json={"prompt": "one"})).status_code == 200
        moved = await client.put("/conversations/elsewhere/head", json={"turn_id": "root"})
        assert moved.status_code == 200, moved.text
    code, output, _ = await run_piped(server, "elsewhere", "edited\n\n")
    assert code == 0, output
    assert output == "echo(1): edited\n‹ 2/2 ›\n"


async def test_tree_commands_errors_are_one_line_and_the_client_goes_on(server):
    script = "/regenerate\n/back\n/branches\n/nope\nhello\n\n/back\n/branches\n"
    code, output, _ = await run_piped(server, "empty", script)
    assert code == 1
    assert output.splitlines() == [
        "[error] /regenerate: no conversation 'empty'",
        "[error] /back: no conversation 'empty'",
        "[error] /branches: no conversation 'empty'",
        "[error] unknown command /nope (/help lists the commands)",
        "echo(1): hello",
        "[back] now at the start of the conversation",
        "[branches] at the start of the conversation; its first turns:",
        "  1. hello → echo(1): hello",
        "switch to (1-1, Enter stays here): ",
        "[branches] kept",
    ]


async def test_tree_commands_over_a_dead_server_or_another_protocol_say_why(all_protocols):
    dead = f"http://127.0.0.1:{free_port()}"
    result = await trio.run_process(
        [sys.executable, "-m", "easybackend.cli", "chat", "--url", dead, "--conversation", "x"],
        stdin=b"/back\n",
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout.decode().startswith(f"[error] /back: {dead}: "), result.stdout
    assert "Traceback" not in result.stderr.decode()
    code, output, _ = await run_piped(all_protocols, "over-ws", "/regenerate\nhi\n\n", "ws")
    assert code == 1
    assert output == (
        "[error] /regenerate: it needs the HTTP API (easybackend chat --protocol http)\n"
        "echo(1): hi\n"
    )


async def test_help_lists_the_commands(server):
    code, output, _ = await run_piped(server, "help", "/help\n")
    assert code == 0
    for command in ("/regenerate", "/back", "/branches", "/help"):
        assert f"\n  {command} " in output
    assert "the head goes to that version itself" in " ".join(output.split())


async def test_interrupting_a_regenerate_keeps_its_partial_answer_as_a_version(server):
    process = await trio.lowlevel.open_process(
        chat_command(server, "http", "cut"), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    output = Output(process.stdout)
    try:
        await process.stdin.send_all(b"hi\n\n")
        await output.until("echo(1): hi\n")
        await queue_faults(server.fake, {"tokens": 400, "delay": 0.02})
        await process.stdin.send_all(b"/regenerate\n")
        await output.until(" t5")
        process.send_signal(signal.SIGINT)
        await output.until("[cancelled]\n")
        await process.stdin.send_all(b"/branches\n\n")
        await output.until("[branches] kept\n")
        await process.stdin.aclose()
        with trio.fail_after(10):
            assert await process.wait() == 0
    finally:
        process.kill()
        await process.wait()
    assert "* 2. hi → echo(1): hi t1" in output.text
    first, cut = (await tree_of(server, "cut"))["tree"]
    assert [first["finish_reason"], cut["finish_reason"]] == ["stop", "cancelled"]
    assert cut["siblings"] == [first["id"], cut["id"]]
