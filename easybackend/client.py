"""``easybackend chat``: an interactive terminal client for any of the three protocols.

Type a prompt over as many lines as you like; a blank line sends it. The
answer is printed as it streams in. Ctrl-C during an answer cancels it (the
server stores what was said so far as ``cancelled``) and returns to the
prompt; Ctrl-C while typing discards the prompt; Ctrl-D (end of input) sends
what was typed, if anything, and exits. Input may also be piped in.
"""

from __future__ import annotations

import json
import secrets
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TextIO
from urllib.parse import quote, urlsplit

import trio

if TYPE_CHECKING:
    from trio_websocket import WebSocketConnection

DEFAULT_URLS = {
    "http": "http://127.0.0.1:8000",
    "ws": "ws://127.0.0.1:9001",
    "grpc": "127.0.0.1:9000",
}


class ChatClientError(Exception):
    """The server answered with an error (the message is the server's)."""


class Asker(Protocol):
    async def ask(self, conversation_id: str, prompt: str, show: Callable[[str], None]) -> None:
        """Stream one answer into ``show``; raise ChatClientError on an error reply.

        On cancellation the request is abandoned (its connection closed), so
        the server cancels the answer.
        """
        ...

    async def aclose(self) -> None: ...


class HttpAsker:
    """Streams from ``POST /ask/{id}/stream`` (Server-Sent Events)."""

    def __init__(self, url: str, nursery: trio.Nursery) -> None:
        import httpx2

        self._client = httpx2.AsyncClient(
            base_url=url.rstrip("/"), timeout=httpx2.Timeout(30, read=None)
        )

    async def ask(self, conversation_id: str, prompt: str, show: Callable[[str], None]) -> None:
        path = f"/ask/{quote(conversation_id, safe='')}/stream"
        async with self._client.stream("POST", path, json={"prompt": prompt}) as response:
            if response.status_code != 200:
                body = json.loads(await response.aread() or b"{}")
                raise ChatClientError(
                    body.get("error", {}).get("message", f"HTTP {response.status_code}")
                )
            event = ""
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    if event == "delta":
                        show(data["text"])
                    elif event == "error":
                        raise ChatClientError(data["message"])

    async def aclose(self) -> None:
        await self._client.aclose()


class WebSocketAsker:
    """Speaks the JSON protocol on one socket; a cancelled answer closes it, the next ask reconnects."""

    def __init__(self, url: str, nursery: trio.Nursery) -> None:
        self._url = url
        self._nursery = nursery
        self._ws: WebSocketConnection | None = None

    async def ask(self, conversation_id: str, prompt: str, show: Callable[[str], None]) -> None:
        from trio_websocket import connect_websocket_url

        if self._ws is None:
            self._ws = await connect_websocket_url(self._nursery, self._url)
        finished = False
        try:
            await self._ws.send_message(
                json.dumps({"type": "ask", "conversation_id": conversation_id, "prompt": prompt})
            )
            while not finished:
                reply = json.loads(await self._ws.get_message())
                finished = reply["type"] in ("end", "error")
                if reply["type"] == "delta":
                    show(reply["text"])
                elif reply["type"] == "error":
                    raise ChatClientError(reply["message"])
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

    async def ask(self, conversation_id: str, prompt: str, show: Callable[[str], None]) -> None:
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

    async def aclose(self) -> None:
        pass


ASKERS: dict[str, Callable[[str, trio.Nursery], Asker]] = {
    "http": HttpAsker,
    "ws": WebSocketAsker,
    "grpc": GrpcAsker,
}


async def run_chat(
    protocol: str, url: str | None, conversation_id: str | None, *, stdin: TextIO, stdout: TextIO
) -> int:
    """The interactive loop. Returns the exit code."""
    conversation_id = conversation_id or f"cli-{secrets.token_hex(4)}"
    interactive = stdin.isatty()
    write = _writer(stdout)
    if interactive:
        write(
            f"EasyBackend chat over {protocol}, conversation {conversation_id}. A blank line sends; Ctrl-D quits.\n"
        )
    lines = _read_lines_in_thread(stdin)
    failed = False
    with trio.open_signal_receiver(signal.SIGINT) as interrupts:
        async with trio.open_nursery() as nursery:
            asker = ASKERS[protocol](url or DEFAULT_URLS[protocol], nursery)
            current: list[trio.CancelScope] = []

            async def on_interrupt() -> None:
                async for _ in interrupts:
                    if current:
                        current[-1].cancel()
                    else:
                        buffer.clear()
                        write("\n(discarded)\n» " if interactive else "")

            nursery.start_soon(on_interrupt)
            buffer: list[str] = []
            if interactive:
                write("» ")
            async for line in lines:
                end_of_input = line is None
                if not end_of_input and line.strip():
                    buffer.append(line.rstrip("\n"))
                    continue
                if buffer:
                    prompt = "\n".join(buffer)
                    buffer.clear()
                    with trio.CancelScope() as scope:
                        current.append(scope)
                        try:
                            await asker.ask(conversation_id, prompt, write)
                        except ChatClientError as exc:
                            write(f"\n[error] {exc}")
                            failed = True
                        except Exception as exc:  # connection refused, reset, broken stream…
                            write(
                                f"\n[error] {url or DEFAULT_URLS[protocol]}: {exc or type(exc).__name__}"
                            )
                            failed = True
                        finally:
                            current.pop()
                    write("\n[cancelled]\n" if scope.cancelled_caught else "\n")
                if end_of_input:
                    break
                if interactive:
                    write("» ")
            await asker.aclose()
            nursery.cancel_scope.cancel()
    return 1 if failed else 0


def _writer(stdout: TextIO) -> Callable[[str], None]:
    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    return write


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
