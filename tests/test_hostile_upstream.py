"""A hostile model provider must never freeze the server, poison a conversation or leak a prompt.

Each test puts a small server of its own on 127.0.0.1 in front of EasyBackend
(a :class:`HostileUpstream` that answers with exactly the bytes the test
chooses, a SOCKS5 or HTTP CONNECT proxy, a TLS front for the fake upstream)
and talks to EasyBackend with real clients over real sockets.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx2
import purerpc
import pytest
import trio
from helpers.database import stored_turns
from helpers.grpc import grpc_ask
from helpers.http import error_code, parse_sse
from helpers.proxies import ConnectProxy, Socks5Proxy
from helpers.servers import free_port, run_cli, server_env
from helpers.tls import tls_front, trusted_authority
from helpers.upstream import events_of, full_answer
from helpers.waiting import wait_until
from helpers.websocket import ws_json_ask

from easybackend.chat.tokens import OFF_LOOP_CHARS, TokenCounter
from easybackend.proto_gen import chat_grpc, chat_pb2
from easybackend.upstream.transport import LeanTransport

CALL_TIMEOUT = 15.0
MiB = 1024 * 1024


# -- a hostile upstream ---------------------------------------------------------------------------


@dataclasses.dataclass
class Received:
    """One request as the hostile upstream read it."""

    head: str
    body: bytes

    @property
    def target(self) -> str:
        return self.head.split(" ", 2)[1]


Respond = Callable[[trio.SocketStream, Received], Awaitable[None]]


class HostileUpstream:
    """An HTTP/1.1 server on 127.0.0.1 that answers every request with ``respond``.

    ``respond`` writes whatever it likes on the connection; the connection is
    closed when it returns. ``requests`` records every request read, and
    ``client_closed`` is set once a client closed a connection that
    :meth:`wait_for_close` was waiting on.
    """

    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.requests: list[Received] = []
        self.client_closed = trio.Event()
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                request = await _read_request(stream)
                self.requests.append(request)
                await self.respond(stream, request)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.client_closed.set()

    async def wait_for_close(self, stream: trio.SocketStream, timeout: float = 10.0) -> None:
        """Wait until the client closes the connection (reading and dropping what it sends).

        Gives up after ``timeout`` seconds, leaving ``client_closed`` unset.
        """
        with trio.move_on_after(timeout):
            try:
                while await stream.receive_some():
                    pass
            except trio.BrokenResourceError:
                pass
            self.client_closed.set()


async def _read_request(stream: trio.SocketStream) -> Received:
    data = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some()
            if not chunk:
                raise trio.BrokenResourceError("closed before a whole request head")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        while length and len(body) < int(length[1]):
            body += await stream.receive_some()
    return Received(head.decode("latin-1"), body)


@pytest.fixture
async def hostile(nursery: trio.Nursery) -> Callable[[Respond], Awaitable[HostileUpstream]]:
    async def start(respond: Respond) -> HostileUpstream:
        upstream = HostileUpstream(respond)
        await nursery.start(upstream.serve)
        return upstream

    return start


# An event-stream answer whose body ends with the connection (no Content-Length, not chunked).
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\r\n"
DONE = b"data: [DONE]\n\n"


def event(payload: object) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def chunk(content: object = None, finish_reason: object = None, **fields: Any) -> dict[str, Any]:
    """A ``chat.completion.chunk`` with one choice; ``fields`` replace or add top-level fields."""
    return {
        "id": "chatcmpl-hostile",
        "object": "chat.completion.chunk",
        "model": "hostile-model",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish_reason}],
        **fields,
    }


def answering(*payloads: object) -> Respond:
    """A responder that sends these events (dicts as JSON, bytes as they are), then [DONE]."""

    async def respond(stream: trio.SocketStream, request: Received) -> None:
        body = b"".join(p if isinstance(p, bytes) else event(p) for p in payloads)
        await stream.send_all(SSE_HEAD + body + DONE)

    return respond


def good_answer(text: str = "Hello there") -> list[dict[str, Any]]:
    return [chunk(text), chunk(None, "stop"), {"choices": [], "usage": None}]


# -- clients --------------------------------------------------------------------------------------


async def ask_json(server: Any, conversation_id: str, prompt: str = "hi") -> httpx2.Response:
    async with server.client(trust_env=False) as client:
        with trio.fail_after(CALL_TIMEOUT):
            return await client.post(f"/ask/{conversation_id}", json={"prompt": prompt})


async def ask_sse(
    server: Any, conversation_id: str, prompt: str = "hi", on_delta: trio.Event | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """The SSE frames of one streamed ask; sets ``on_delta`` when the first delta arrived."""
    async with server.client(trust_env=False) as client:
        with trio.fail_after(CALL_TIMEOUT):
            async with client.stream(
                "POST", f"/ask/{conversation_id}/stream", json={"prompt": prompt}
            ) as response:
                assert response.status_code == 200
                text = ""
                async for piece in response.aiter_text():
                    text += piece
                    if on_delta is not None and "event: delta" in text:
                        on_delta.set()
    return parse_sse(text)


async def grpc_call(port: int, method: str, request: Any) -> Any:
    """One unary ``chat.Chat/<method>`` call with purerpc."""
    with trio.fail_after(CALL_TIMEOUT):
        async with purerpc.insecure_channel("127.0.0.1", port) as channel:
            return await getattr(chat_grpc.ChatStub(channel), method)(request)


def db_path(server: Any) -> Path:
    return server.settings.sqlite_path


# -- a line without an end, a trickle: caps and deadlines per read (and deep JSON) -----------------


async def test_an_endless_line_fails_at_the_line_cap_and_the_call_is_closed(hostile, start_server):
    """Over 1 MiB of one line with no newline: upstream_error naming the cap, the upstream closed.

    The cap is 1 MiB, or 4 bytes per character of MAX_ANSWER_CHARS when that is more.
    """

    async def respond(stream: trio.SocketStream, request: Received) -> None:
        await stream.send_all(SSE_HEAD + b"data: ")
        block = b"x" * (64 * 1024)
        for _ in range(MiB // len(block) + 2):
            await stream.send_all(block)
        await upstream.wait_for_close(stream)

    upstream = await hostile(respond)
    # the idle timeout is long, so that only the line cap can end the call quickly
    server = await start_server(
        OPENAI_BASE_URL=upstream.base_url, UPSTREAM_IDLE_TIMEOUT="20", MAX_ANSWER_CHARS="1000"
    )
    response = await ask_json(server, "endless")
    assert response.status_code == 502, response.text
    assert error_code(response) == "upstream_error"
    assert f"longer than {MiB} bytes" in response.json()["error"]["message"]
    with trio.fail_after(5):
        await upstream.client_closed.wait()
    assert stored_turns(db_path(server), "endless") == []


@pytest.mark.parametrize(
    ("env", "message"),
    [
        # the total deadline, checked after every read, not only after a complete line
        (
            {"UPSTREAM_TIMEOUT": "1", "UPSTREAM_IDLE_TIMEOUT": "30"},
            "did not finish within 1 seconds",
        ),
        # bytes that never complete a line are no sign of life
        (
            {"UPSTREAM_TIMEOUT": "60", "UPSTREAM_IDLE_TIMEOUT": "1"},
            "sent no complete event for 1 seconds",
        ),
    ],
)
async def test_a_trickle_without_newline_meets_the_timeouts(hostile, start_server, env, message):
    async def respond(stream: trio.SocketStream, request: Received) -> None:
        await stream.send_all(SSE_HEAD + b"data: ")
        for _ in range(300):  # 30 s at most
            await stream.send_all(b"x")
            await trio.sleep(0.1)

    upstream = await hostile(respond)
    server = await start_server(OPENAI_BASE_URL=upstream.base_url, **env)
    response = await ask_json(server, "trickle")
    assert response.status_code == 504, response.text
    assert error_code(response) == "upstream_timeout"
    assert message in response.json()["error"]["message"]


async def test_deeply_nested_json_from_the_upstream_is_an_upstream_error(hostile, start_server):
    nested = b"data: " + b"[" * 100_000 + b"\n\n"
    upstream = await hostile(answering(chunk("Hi"), nested))
    server = await start_server(OPENAI_BASE_URL=upstream.base_url)
    response = await ask_json(server, "nested")
    assert response.status_code == 502, response.text
    assert error_code(response) == "upstream_error"
    frames = await ask_sse(server, "nested-sse")
    assert frames[-1][0] == "error" and frames[-1][1]["code"] == "upstream_error", frames


# -- valid JSON of the wrong shape ----------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"choices": [1]},
        {"choices": "stop"},
        {"choices": [{"delta": "text"}]},
        {"choices": [{"delta": {"content": 5}}]},
        {"choices": [{"delta": {"content": ["a"]}}]},
        chunk(None, 7),
        chunk(None, ["stop"]),
        chunk(None, "x" * 65),
        chunk(None, "st\x00op"),
        [1, 2],
    ],
    ids=repr,
)
async def test_a_malformed_event_is_an_upstream_error_and_nothing_is_stored(
    hostile, start_server, bad
):
    upstream = await hostile(answering(chunk("Hello"), bad, chunk(None, "stop")))
    server = await start_server(OPENAI_BASE_URL=upstream.base_url)
    response = await ask_json(server, "shape")
    assert response.status_code == 502, response.text
    assert error_code(response) == "upstream_error"
    assert stored_turns(db_path(server), "shape") == []


async def test_a_malformed_event_after_the_first_piece_ends_every_stream_with_its_error(
    hostile, start_server
):
    """SSE ends with an ``error`` event, gRPC with UNAVAILABLE, WebSocket with an error reply."""
    first_piece_seen = trio.Event()

    async def respond(stream: trio.SocketStream, request: Received) -> None:
        await stream.send_all(SSE_HEAD + event(chunk("Hello")))
        if b'"stream"' in request.body and b"sse-after" in request.body:
            with trio.fail_after(10):
                await first_piece_seen.wait()  # the client has the piece: now the bad event
        await stream.send_all(event({"choices": [1]}) + DONE)

    upstream = await hostile(respond)
    server = await start_server(
        OPENAI_BASE_URL=upstream.base_url, GRPC_PORT=str(free_port()), WS_PORT=str(free_port())
    )
    frames = await ask_sse(server, "sse", prompt="sse-after", on_delta=first_piece_seen)
    assert frames[0] == ("delta", {"text": "Hello"}), frames
    assert frames[-1][0] == "error" and frames[-1][1]["code"] == "upstream_error", frames

    result = await grpc_ask(server.running.grpc_port, "grpc", "hi")
    assert result.code == grpc.StatusCode.UNAVAILABLE, (result.code, result.details)
    assert "malformed" in result.details

    replies = await ws_json_ask(server.running.ws_port, {"conversation_id": "ws", "prompt": "hi"})
    assert replies[-1]["type"] == "error" and replies[-1]["code"] == "upstream_error", replies
    for conversation_id in ("sse", "grpc", "ws"):
        assert stored_turns(db_path(server), conversation_id) == []


@pytest.mark.parametrize("bad_usage", ["lots", 3_000_000_000, -1, True, 1.5, [1], "7"], ids=repr)
async def test_unbelievable_usage_is_ignored_for_our_own_counts(hostile, start_server, bad_usage):
    reported = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    # the usage each request in turn is answered with: none, the bad one, a sane one
    figures = [None, {**reported, "prompt_tokens": bad_usage}, reported]

    async def respond(stream: trio.SocketStream, request: Received) -> None:
        usage = figures.pop(0)
        await answering(chunk("Hello there"), chunk(None, "stop"), {"choices": [], "usage": usage})(
            stream, request
        )

    upstream = await hostile(respond)
    server = await start_server(OPENAI_BASE_URL=upstream.base_url)
    own = (await ask_json(server, "own", "same prompt")).json()["usage"]
    bad = await ask_json(server, "bad", "same prompt")
    assert bad.status_code == 200, bad.text
    assert bad.json()["usage"] == own  # the provider's figures were all dropped, ours used
    believed = (await ask_json(server, "believed", "same prompt")).json()["usage"]
    assert believed == reported  # sane figures are still the provider's


async def test_nothing_the_upstream_reports_makes_a_conversation_unreadable(
    hostile, start_server, tmp_path
):
    """Usage the gRPC int32 fields cannot hold, a bad model name, NUL and lone surrogates."""
    payloads = [
        chunk("a\x00b\ud800c", model="m\x00del"),
        chunk(None, "stop", model=7),
        {"choices": [], "usage": {"prompt_tokens": 3_000_000_000, "completion_tokens": "lots"}},
    ]
    upstream = await hostile(answering(*payloads))
    server = await start_server(OPENAI_BASE_URL=upstream.base_url, GRPC_PORT=str(free_port()))
    frames = await ask_sse(server, "poison")
    assert frames[-1][0] == "end", frames
    assert "".join(f[1]["text"] for f in frames if f[0] == "delta") == "a\ufffdb\ufffdc"
    end = frames[-1][1]
    assert end["usage"]["prompt_tokens"] < 100 and end["usage"]["completion_tokens"] < 100, end

    grpc_port = server.running.grpc_port
    result = await grpc_ask(grpc_port, "poison", "again")
    assert result.code == grpc.StatusCode.OK, result.details
    assert result.replies[-1].usage.prompt_tokens < 1000

    async with server.client(trust_env=False) as client:
        detail = await client.get("/conversations/poison")
        listing = await client.get("/conversations")
    assert detail.status_code == 200, detail.text
    assert listing.status_code == 200, listing.text
    turns = detail.json()["history"]
    assert [t["messages"][1]["text"] for t in turns] == ["a\ufffdb\ufffdc"] * 2
    assert {t["model"] for t in turns} == {server.settings.model}
    assert {t["finish_reason"] for t in turns} == {"stop"}

    conversation = await grpc_call(
        grpc_port, "GetConversation", chat_pb2.ConversationRequest(conversation_id="poison")
    )
    assert conversation.turns == 2
    page = await grpc_call(grpc_port, "ListConversations", chat_pb2.ListConversationsRequest())
    assert [c.conversation_id for c in page.conversations] == ["poison"]

    exported = await run_cli(
        tmp_path,
        server_env(server.fake, CONVERSATIONS_DIR=str(server.settings.conversations_dir)),
        ["export", "poison"],
    )
    assert exported.returncode == 0, exported.stderr.decode()
    assert json.loads(exported.stdout)["turns"] == 2


async def test_conversation_totals_past_int32_do_not_break_grpc(start_server):
    """A conversation's summed usage is not bounded by one turn's: gRPC holds it at int32's top."""
    server = await start_server(GRPC_PORT=str(free_port()))
    async with server.client() as client:
        assert (await client.post("/ask/big", json={"prompt": "hi"})).status_code == 200
    total = 3 * 2**31  # what some 70 turns of the largest believable usage add up to
    db = sqlite3.connect(db_path(server))
    with db:
        db.execute(
            "UPDATE conversations SET prompt_tokens = ?, completion_tokens = ?", (total,) * 2
        )
    db.close()
    port = server.running.grpc_port
    conversation = await grpc_call(
        port, "GetConversation", chat_pb2.ConversationRequest(conversation_id="big")
    )
    assert conversation.usage.prompt_tokens == conversation.usage.total_tokens == 2**31 - 1
    page = await grpc_call(port, "ListConversations", chat_pb2.ListConversationsRequest())
    assert page.conversations[0].usage.completion_tokens == 2**31 - 1
    async with server.client() as client:
        over_http = (await client.get("/conversations/big")).json()
    assert over_http["usage"]["total_tokens"] == 2 * total  # HTTP's JSON has no such limit


# -- the answer's size and counting it ------------------------------------------------------------


async def test_an_answer_past_max_answer_chars_ends_with_length_on_every_protocol(start_server):
    """Cut at the cap, finish reason ``length``, the stored turn is the text sent, upstream closed."""
    cap = 40
    server = await start_server(
        MAX_ANSWER_CHARS=str(cap), GRPC_PORT=str(free_port()), WS_PORT=str(free_port())
    )
    prompt = "[[fake:tokens=300]] [[fake:delay=0.005]]"
    expected = full_answer(1, "", 300)[:cap]

    response = await ask_json(server, "cap-http", prompt)
    assert response.status_code == 200, response.text
    assert (response.json()["response"], response.json()["finish_reason"]) == (expected, "length")

    frames = await ask_sse(server, "cap-sse", prompt)
    assert "".join(f[1]["text"] for f in frames if f[0] == "delta") == expected
    assert frames[-1][0] == "end" and frames[-1][1]["finish_reason"] == "length", frames[-1]

    replies = await ws_json_ask(
        server.running.ws_port, {"conversation_id": "cap-ws", "prompt": prompt}
    )
    assert "".join(r["text"] for r in replies if r["type"] == "delta") == expected
    assert replies[-1]["type"] == "end" and replies[-1]["finish_reason"] == "length", replies[-1]

    result = await grpc_ask(server.running.grpc_port, "cap-grpc", prompt)
    assert result.code == grpc.StatusCode.OK, result.details
    assert result.text == expected and result.replies[-1].finish_reason == "length"

    for conversation_id in ("cap-http", "cap-sse", "cap-ws", "cap-grpc"):
        (turn,) = stored_turns(db_path(server), conversation_id)
        assert (turn["answer"], turn["finish_reason"]) == (expected, "length")
    for request in server.fake.requests:  # each upstream call was closed at the cap
        await wait_until(lambda r=request: "disconnected" in events_of(server.fake, r["id"]))
        assert "completed" not in events_of(server.fake, request["id"])


@pytest.mark.parametrize("which", ["prompt", "answer"])
async def test_healthz_answers_while_a_long_text_is_counted(start_server, monkeypatch, which):
    """The count of a long prompt or answer waits until /healthz has answered three times.

    Counted on the event loop, it would hold /healthz off and wait in vain.
    """
    counting, healthz_answered = threading.Event(), threading.Event()
    waits: list[bool] = []
    long_prompt = "word " * (OFF_LOOP_CHARS // 4)
    uncounted = TokenCounter.text

    def held_text(self: TokenCounter, text: str) -> int:
        held = text == long_prompt if which == "prompt" else text.startswith("echo(1): ")
        if held and len(text) >= OFF_LOOP_CHARS and not counting.is_set():
            counting.set()
            waits.append(healthz_answered.wait(timeout=3))
        return uncounted(self, text)

    monkeypatch.setattr(TokenCounter, "text", held_text)
    server = await start_server(MAX_CONTEXT_TOKENS="100000")
    prompt = long_prompt if which == "prompt" else "[[fake:tokens=5000]]"
    answers: list[httpx2.Response] = []

    async def ask() -> None:
        answers.append(await ask_json(server, f"long-{which}", prompt))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        await wait_until(counting.is_set, timeout=10)
        async with server.client(trust_env=False) as client:
            for _ in range(3):
                with trio.fail_after(5):
                    assert (await client.get("/healthz")).status_code == 200
        healthz_answered.set()
    assert waits == [True]
    assert answers[0].status_code == 200, answers[0].text
    assert answers[0].json()["finish_reason"] == "stop"


# -- redirects ------------------------------------------------------------------------------------


@pytest.fixture(params=["lean", "httpx"])
def transport(request, monkeypatch) -> str:
    """Which HTTP transport the upstream client uses: the lean one, or httpx's own.

    httpx's own is what a proxy variable selects; NO_PROXY keeps loopback direct.
    """
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    if request.param == "httpx":
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    return request.param


def transport_of(server: Any) -> object:
    return server.running.service.upstream._client._client._transport


@pytest.mark.parametrize("status", [307, 308])
async def test_a_redirect_to_another_origin_is_not_followed(
    hostile, start_server, transport, status
):
    elsewhere = await hostile(answering(*good_answer("the prompt went elsewhere")))

    async def respond(stream: trio.SocketStream, request: Received) -> None:
        location = f"http://127.0.0.1:{elsewhere.port}/v1/chat/completions?token=SECRET-q"
        await stream.send_all(
            f"HTTP/1.1 {status} Redirect\r\nlocation: {location}\r\ncontent-length: 0\r\n\r\n".encode()
        )

    upstream = await hostile(respond)
    server = await start_server(OPENAI_BASE_URL=upstream.base_url)
    assert isinstance(transport_of(server), LeanTransport) == (transport == "lean")
    response = await ask_json(server, "redirect")
    assert response.status_code == 502, response.text
    assert error_code(response) == "upstream_error"
    message = response.json()["error"]["message"]
    assert f"http://127.0.0.1:{elsewhere.port}" in message and "token" not in message, message
    assert elsewhere.requests == []
    assert len(upstream.requests) == 1  # not retried either


async def test_a_redirect_within_the_origin_is_followed(hostile, start_server, transport):
    async def respond(stream: trio.SocketStream, request: Received) -> None:
        if request.target == "/v1/chat/completions":
            await stream.send_all(
                b"HTTP/1.1 307 Moved\r\nlocation: /v2/chat/completions\r\ncontent-length: 0\r\n"
                b"connection: close\r\n\r\n"  # this server closes after each answer
            )
        else:
            await answering(*good_answer("moved along"))(stream, request)

    upstream = await hostile(respond)
    server = await start_server(OPENAI_BASE_URL=upstream.base_url)
    response = await ask_json(server, "moved")
    assert response.status_code == 200, response.text
    assert response.json()["response"] == "moved along"
    assert [r.target for r in upstream.requests] == ["/v1/chat/completions", "/v2/chat/completions"]


# -- proxies --------------------------------------------------------------------------------------


@pytest.fixture
def no_proxy_environment(monkeypatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


async def test_answers_come_through_a_socks5_proxy(
    nursery, start_server, monkeypatch, no_proxy_environment
):
    proxy = Socks5Proxy()
    await nursery.start(proxy.serve)
    monkeypatch.setenv("ALL_PROXY", f"socks5://127.0.0.1:{proxy.port}")
    server = await start_server()
    response = await ask_json(server, "socks", "through the proxy")
    assert response.status_code == 200, response.text
    assert response.json()["response"] == "echo(1): through the proxy"
    assert ("127.0.0.1", server.fake.port) in proxy.tunnels


async def test_answers_come_from_an_https_upstream_through_an_http_connect_proxy(
    nursery, start_server, monkeypatch, tmp_path, no_proxy_environment, fake
):
    authority = trusted_authority(tmp_path, monkeypatch)  # SSL_CERT_FILE: the client trusts it
    tls_port = await tls_front(nursery, fake.port, authority)
    proxy = ConnectProxy()
    await nursery.start(proxy.serve)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
    server = await start_server(OPENAI_BASE_URL=f"https://127.0.0.1:{tls_port}/v1")
    response = await ask_json(server, "connect", "over TLS")
    assert response.status_code == 200, response.text
    assert response.json()["response"] == "echo(1): over TLS"
    # the tunnel carried TLS (a handshake record starts with 0x16), not the request in clear
    assert (f"127.0.0.1:{tls_port}", b"\x16") in proxy.tunnels


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("ALL_PROXY", "socks4://127.0.0.1:1080", "ALL_PROXY names a socks4:// proxy"),
        ("HTTPS_PROXY", "ftp://127.0.0.1:21", "HTTPS_PROXY names a ftp:// proxy"),
    ],
)
async def test_an_unsupported_proxy_scheme_stops_start_up_with_one_line(
    tmp_path, fake, variable, value, expected
):
    env = server_env(
        fake, HTTP_PORT=str(free_port()), GRPC_PORT="off", WS_PORT="off", **{variable: value}
    )
    env = {k: v for k, v in env.items() if k.lower() not in ("no_proxy",)}
    result = await run_cli(tmp_path, env, [])
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("easybackend: error: "), stderr
    assert expected in lines[0], stderr
