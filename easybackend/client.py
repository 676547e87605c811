"""``easybackend chat``: an interactive terminal client for any of the three protocols.

Type a prompt over as many lines as you like; a blank line sends it. The
answer is printed as it streams in. Ctrl-C during an answer cancels it (the
server stores what was said so far as ``cancelled``) and returns to the
prompt; Ctrl-C while typing discards the prompt; Ctrl-D (end of input) sends
what was typed, if anything, and exits. Input may also be piped in.

A line of its own at the start of a prompt that is a command runs at once
(:data:`COMMANDS`): ``/regenerate``, ``/back`` and ``/branches`` work on the
conversation's tree (SPEC §12) through the HTTP API, so they need
``--protocol http``; ``/help`` lists them. Ctrl-C cancels a command too (a
cancelled ``/regenerate`` is stored as a ``cancelled`` version, like an ask).
A command that fails prints one ``[error]`` line and the client goes on; the
exit code is then 1, as after a failed ask.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import sys
import textwrap
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TextIO
from urllib.parse import quote, urlsplit

import trio

if TYPE_CHECKING:
    from trio_websocket import WebSocketConnection

DEFAULT_URLS = {
    "http": "http://127.0.0.1:8000",
    "ws": "ws://127.0.0.1:9001",
    "grpc": "127.0.0.1:9000",
}

COMMANDS = {
    "/regenerate": "answer the last prompt again, as a new version of the last turn (‹ n/m ›)",
    "/back": "roll back one turn; it is kept as a branch and the next prompt starts a new one",
    "/branches": "list the versions of the last turn and switch to one: the head goes to that "
    "version itself (not to a turn after it), so the next prompt continues from it",
    "/help": "this list",
}
_COMMAND_LIKE = re.compile(r"/[A-Za-z]+")  # a lone word after a slash: a command, known or not


class ChatClientError(Exception):
    """The server answered with an error (the message is the server's), or a command cannot run."""


class Asker(Protocol):
    async def ask(
        self, conversation_id: str, prompt: str, show: Callable[[str], None]
    ) -> str | None:
        """Stream one answer into ``show``; return the new turn's id when the protocol says it.

        Raises ChatClientError on an error reply. On cancellation the request is
        abandoned (its connection closed), so the server cancels the answer.
        """
        ...

    async def aclose(self) -> None: ...


class HttpApi:
    """The HTTP API as the client uses it: streamed asks and regenerates (SSE), and the
    conversation routes. Error replies raise ChatClientError with the server's message;
    network failures raise httpx2's errors. A cancelled call closes its connection."""

    def __init__(self, url: str) -> None:
        import httpx2

        self._client = httpx2.AsyncClient(
            base_url=url.rstrip("/"), timeout=httpx2.Timeout(30, read=None)
        )

    async def stream(
        self, path: str, body: dict[str, object], show: Callable[[str], None]
    ) -> dict[str, Any]:
        """POST ``body`` to an SSE route, each delta into ``show``; returns the ``end`` data."""
        async with self._client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                raise ChatClientError(_error_message(await response.aread(), response.status_code))
            event, end = "", {}
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    if event == "delta":
                        show(data["text"])
                    elif event == "end":
                        end = data
                    elif event == "error":
                        raise ChatClientError(data["message"])
            return end

    async def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """One request to a JSON route; returns the JSON body."""
        response = await self._client.request(method, path, **kwargs)
        if response.status_code >= 300:
            raise ChatClientError(_error_message(response.content, response.status_code))
        return response.json()

    async def aclose(self) -> None:
        await self._client.aclose()


def _error_message(body: bytes, status: int) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}"


class HttpAsker:
    """Streams from ``POST /ask/{id}/stream`` (Server-Sent Events)."""

    def __init__(self, api: HttpApi) -> None:
        self.api = api

    async def ask(
        self, conversation_id: str, prompt: str, show: Callable[[str], None]
    ) -> str | None:
        path = f"/ask/{quote(conversation_id, safe='')}/stream"
        return (await self.api.stream(path, {"prompt": prompt}, show)).get("turn_id")

    async def aclose(self) -> None:
        await self.api.aclose()


class WebSocketAsker:
    """Speaks the JSON protocol on one socket; a cancelled answer closes it, the next ask reconnects."""

    def __init__(self, url: str, nursery: trio.Nursery) -> None:
        self._url = url
        self._nursery = nursery
        self._ws: WebSocketConnection | None = None

    async def ask(
        self, conversation_id: str, prompt: str, show: Callable[[str], None]
    ) -> str | None:
        from trio_websocket import connect_websocket_url

        if self._ws is None:
            self._ws = await connect_websocket_url(self._nursery, self._url)
        finished = False
        try:
            await self._ws.send_message(
                json.dumps({"type": "ask", "conversation_id": conversation_id, "prompt": prompt})
            )
            while True:
                reply = json.loads(await self._ws.get_message())
                finished = reply["type"] in ("end", "error")
                if reply["type"] == "delta":
                    show(reply["text"])
                elif reply["type"] == "error":
                    raise ChatClientError(reply["message"])
                elif reply["type"] == "end":
                    return reply.get("turn_id")
        finally:
            if not finished:
                with trio.CancelScope(shield=True):
                    await self.aclose()

    async def aclose(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            with trio.move_on_after(2):
                await ws.aclose()


class GrpcAsker:
    """Streams from the ``chat.Chat/Ask`` RPC over purerpc, one channel per ask."""

    def __init__(self, url: str, nursery: trio.Nursery) -> None:
        target = urlsplit(url if "://" in url else f"grpc://{url}")
        self._host, self._port = target.hostname or "127.0.0.1", target.port or 9000

    async def ask(
        self, conversation_id: str, prompt: str, show: Callable[[str], None]
    ) -> str | None:
        import anyio
        import purerpc

        from .proto_gen import chat_grpc, chat_pb2

        channel = purerpc.insecure_channel(self._host, self._port)
        try:
            async with channel:
                stub = chat_grpc.ChatStub(channel)
                request = chat_pb2.AskRequest(prompt=prompt, conversation_id=conversation_id)
                async for reply in stub.Ask(request):
                    if reply.response:
                        show(reply.response)
        except purerpc.RpcFailedError as exc:
            raise ChatClientError(str(exc)) from None
        finally:
            # purerpc's channel leaves its TCP connection open; close it so that the server
            # sees the client go away (and cancels an answer that was interrupted).
            if channel._grpc_socket is not None:
                with trio.CancelScope(shield=True):
                    await anyio.aclose_forcefully(channel._grpc_socket._socket._stream)
        return None

    async def aclose(self) -> None:
        pass


ASKERS: dict[str, Callable[[str, trio.Nursery], Asker]] = {
    "http": lambda url, nursery: HttpAsker(HttpApi(url)),
    "ws": WebSocketAsker,
    "grpc": GrpcAsker,
}


class Screen:
    """The client's output; knows whether the cursor is at the start of a line."""

    def __init__(self, stdout: TextIO) -> None:
        self._stdout = stdout
        self.at_line_start = True

    def write(self, text: str) -> None:
        if text:
            self._stdout.write(text)
            self._stdout.flush()
            self.at_line_start = text.endswith("\n")

    def end_line(self) -> None:
        """Finish the current line (an answer ends without a newline)."""
        self.write("\n")

    def line(self, text: str) -> None:
        """``text`` on a line of its own."""
        if not self.at_line_start:
            self.write("\n")
        self.write(text + "\n")


class TreeCommands:
    """``/regenerate``, ``/back`` and ``/branches`` over the HTTP API (``api``; None when the
    client speaks another protocol, and then they say so), and the "‹ n/m ›" after an answer.

    Each command raises ChatClientError (server errors, a bad choice) or httpx2's errors
    (network); on cancellation its request is abandoned, which the server sees as a client
    going away. ``read_line`` reads the next input line (None at the end of input).
    """

    def __init__(
        self,
        api: HttpApi | None,
        conversation_id: str,
        screen: Screen,
        read_line: Callable[[], Awaitable[str | None]],
        *,
        existing: bool,
    ) -> None:
        self._api = api
        self._path = f"/conversations/{quote(conversation_id, safe='')}"
        self._screen = screen
        self._read_line = read_line
        # The next answer may have siblings when the head was moved (or the conversation
        # existed before): only then is the conversation read to draw "‹ n/m ›".
        self._head_moved = existing

    def _need_api(self) -> HttpApi:
        if self._api is None:
            raise ChatClientError("it needs the HTTP API (easybackend chat --protocol http)")
        return self._api

    async def after_ask(self, turn_id: str | None) -> None:
        """Show "‹ n/m ›" when the answer just given (turn ``turn_id``) has siblings."""
        if self._api is None or turn_id is None or not self._head_moved:
            return
        self._head_moved = False
        await self._show_position(self._api, turn_id)

    async def _show_position(self, api: HttpApi, turn_id: str) -> None:
        history = (await api.call("GET", self._path))["history"]
        if history and history[-1]["id"] == turn_id:
            siblings = history[-1]["siblings"]
            if len(siblings) > 1:
                self._screen.line(_position(siblings, turn_id))

    async def regenerate(self) -> None:
        """Answer the head's prompt again (a new sibling, the new head), streamed; then "‹ n/m ›"."""
        api = self._need_api()
        history = (await api.call("GET", self._path))["history"]
        if not history:
            raise ChatClientError("no turn to regenerate on the active path")
        path = f"{self._path}/turns/{history[-1]['id']}/regenerate/stream"
        end = await api.stream(path, {}, self._screen.write)
        self._screen.end_line()
        self._head_moved = False
        if end.get("turn_id"):
            await self._show_position(api, end["turn_id"])

    async def back(self) -> None:
        """Roll back one turn (kept as a branch) and say where the head is now."""
        api = self._need_api()
        result = await api.call("POST", f"{self._path}/rollback", json={"turns": 1})
        if not result["removed"]:
            self._screen.line("[back] already at the start of the conversation")
            return
        self._head_moved = True
        history = (await api.call("GET", self._path))["history"] if result["head"] else []
        if history:
            self._screen.line(f"[back] now at: {_shorten(_prompt(history[-1]), 60)}")
        else:
            self._screen.line("[back] now at the start of the conversation")

    async def branches(self) -> None:
        """List the versions (siblings) of the head, read a number, and move the head there."""
        api = self._need_api()
        detail = await api.call("GET", self._path, params={"view": "tree"})
        turns = {turn["id"]: turn for turn in detail["tree"]}
        if detail["history"]:
            current = detail["history"][-1]["id"]
            versions = detail["history"][-1]["siblings"]
            self._screen.line("[branches] versions of the last turn:")
        else:  # at the start of the conversation: the first turns are the versions
            current = None
            versions = [turn["id"] for turn in detail["tree"] if turn["parent_id"] is None]
            if not versions:
                raise ChatClientError("the conversation has no turns yet")
            self._screen.line("[branches] at the start of the conversation; its first turns:")
        for number, turn_id in enumerate(versions, 1):
            turn = turns[turn_id]
            mark = "*" if turn_id == current else " "
            self._screen.line(
                f"{mark} {number}. {_shorten(_prompt(turn), 40)} → {_shorten(_answer(turn), 40)}"
            )
        if current is not None and len(versions) == 1:
            self._screen.line("[branches] only one version")
            return
        keeps = f"Enter keeps {versions.index(current) + 1}" if current else "Enter stays here"
        self._screen.write(f"switch to (1-{len(versions)}, {keeps}): ")
        choice = await self._read_line()
        choice = (choice or "").strip()
        if not choice:
            self._screen.line("[branches] kept")
            return
        if not (choice.isascii() and choice.isdigit()) or not 1 <= int(choice) <= len(versions):
            raise ChatClientError(f"no version {choice!r} (1-{len(versions)}); the head stays")
        chosen = versions[int(choice) - 1]
        if chosen != current:
            await api.call("PUT", f"{self._path}/head", json={"turn_id": chosen})
            self._head_moved = True
        self._screen.line(f"[branches] now at {_position(versions, chosen)}:")
        self._screen.write(_answer(turns[chosen]))
        self._screen.end_line()


def _position(siblings: list[str], turn_id: str) -> str:
    return f"‹ {siblings.index(turn_id) + 1}/{len(siblings)} ›"


def _prompt(turn: dict[str, Any]) -> str:
    return turn["messages"][0]["text"]


def _answer(turn: dict[str, Any]) -> str:
    return turn["messages"][1]["text"]


def _shorten(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _help(protocol: str) -> str:
    lines = ["Commands (a line of its own at the start of a prompt; it runs at once):"]
    for name, text in COMMANDS.items():
        lines.append(
            textwrap.fill(text, 92, initial_indent=f"  {name:<12} ", subsequent_indent=" " * 15)
        )
    if protocol != "http":
        lines.append("  /regenerate, /back and /branches use the HTTP API: --protocol http")
    lines.append(
        "A blank line sends a prompt; Ctrl-C cancels an answer or discards the prompt; Ctrl-D quits."
    )
    return "\n".join(lines)


async def run_chat(
    protocol: str, url: str | None, conversation_id: str | None, *, stdin: TextIO, stdout: TextIO
) -> int:
    """The interactive loop. Returns the exit code."""
    existing = conversation_id is not None
    conversation_id = conversation_id or f"cli-{secrets.token_hex(4)}"
    url = url or DEFAULT_URLS[protocol]
    interactive = stdin.isatty()
    screen = Screen(stdout)
    write = screen.write
    if interactive:
        write(
            f"EasyBackend chat over {protocol}, conversation {conversation_id}. "
            "A blank line sends; /help lists the commands; Ctrl-D quits.\n"
        )
    lines = _read_lines_in_thread(stdin)
    ended = False

    async def read_line() -> str | None:
        nonlocal ended
        if ended:
            return None
        line = await lines.receive()
        ended = line is None
        if interactive:
            screen.at_line_start = True  # the Enter typed ended the line
        elif not screen.at_line_start:
            screen.end_line()  # a question answered from a pipe: its line ends here
        return line

    failed = False
    with trio.open_signal_receiver(signal.SIGINT) as interrupts:
        async with trio.open_nursery() as nursery:
            asker = ASKERS[protocol](url, nursery)
            api = asker.api if isinstance(asker, HttpAsker) else None
            commands = TreeCommands(api, conversation_id, screen, read_line, existing=existing)
            current: list[trio.CancelScope] = []

            async def on_interrupt() -> None:
                async for _ in interrupts:
                    if current:
                        current[-1].cancel()
                    else:
                        buffer.clear()
                        write("\n(discarded)\n» " if interactive else "")

            async def guarded(action: Callable[[], Awaitable[None]], name: str = "") -> None:
                """Run ``action`` (an ask, or the command ``name``) cancellable by Ctrl-C; show
                its errors on one line and remember them for the exit code."""
                label = f"{name}: " if name else ""
                nonlocal failed
                with trio.CancelScope() as scope:
                    current.append(scope)
                    try:
                        await action()
                    except ChatClientError as exc:
                        screen.line(f"[error] {label}{exc}")
                        failed = True
                    except Exception as exc:  # connection refused, reset, broken stream…
                        screen.line(f"[error] {label}{url}: {exc or type(exc).__name__}")
                        failed = True
                    finally:
                        current.pop()
                if scope.cancelled_caught:
                    screen.line("[cancelled]")
                elif not screen.at_line_start:
                    screen.end_line()

            async def ask(prompt: str) -> None:
                turn_id = await asker.ask(conversation_id, prompt, write)
                screen.end_line()
                await commands.after_ask(turn_id)

            runs = {
                "/regenerate": commands.regenerate,
                "/back": commands.back,
                "/branches": commands.branches,
            }

            async def show_help() -> None:
                screen.line(_help(protocol))

            nursery.start_soon(on_interrupt)
            buffer: list[str] = []
            if interactive:
                write("» ")
            while not ended:
                line = await read_line()
                if line is not None and line.strip():
                    word = line.strip()
                    if buffer or not _COMMAND_LIKE.fullmatch(word):
                        buffer.append(line.rstrip("\n"))
                        continue
                    if word in runs:
                        await guarded(runs[word], word)
                    elif word == "/help":
                        await guarded(show_help)
                    else:
                        screen.line(f"[error] unknown command {word} (/help lists the commands)")
                        failed = True
                elif buffer:
                    prompt = "\n".join(buffer)
                    buffer.clear()
                    await guarded(lambda prompt=prompt: ask(prompt))
                if interactive and not ended:
                    write("» ")
            await asker.aclose()
            nursery.cancel_scope.cancel()
    return 1 if failed else 0


def _read_lines_in_thread(stdin: TextIO) -> trio.MemoryReceiveChannel[str | None]:
    """Lines of ``stdin`` (each ending in a newline), then ``None`` at end of input."""
    send, receive = trio.open_memory_channel[str | None](0)
    token = trio.lowlevel.current_trio_token()

    def reader() -> None:
        try:
            while True:
                line = stdin.readline()
                trio.from_thread.run(send.send, line or None, trio_token=token)
                if not line:
                    return
        except (trio.RunFinishedError, trio.Cancelled):
            return

    threading.Thread(target=reader, name="stdin-reader", daemon=True).start()
    return receive


def main(protocol: str, url: str | None, conversation_id: str | None) -> int:
    try:
        return trio.run(
            lambda: run_chat(protocol, url, conversation_id, stdin=sys.stdin, stdout=sys.stdout)
        )
    except KeyboardInterrupt:
        return 130
