"""Hostile clients against the chat core's own rules, on every protocol.

- MAX_STREAMS_PER_KEY counts per client address when API keys are off, so one
  address holding its slots leaves every other client served; X-Forwarded-For
  is believed only from a TRUSTED_PROXIES peer. Clients on other addresses are
  real connections from other loopback addresses (127.0.0.2, …): each goes
  through a small TCP relay whose outgoing socket is bound to that address.
- Every text a client sends (prompt, per-ask system, model, the
  conversation's system prompt) must be Unicode text without NUL that UTF-8
  can encode, or it is ``invalid_input`` naming the field, before any
  upstream call, on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import httpx2
import pytest
import trio
import trio_websocket
from helpers.grpc import CALL_TIMEOUT
from helpers.logs import metric, scrape
from helpers.postgres import pg_url
from helpers.servers import StartServer, free_port

from easybackend.chat.caller import client_address
from easybackend.proto_gen import chat_pb2
from easybackend.settings import load_settings

HOLD = "hold the slot [[fake:stall_after=1]]"  # one piece, then nothing until the client goes
PROXY = "127.0.0.9"  # the one trusted proxy of these tests
Outcome = tuple[str, str]  # ("served", "") or ("refused", the refusal's message)


# --------------------------------------------------------------------------- relays


async def relay_from(nursery: trio.Nursery, source: str, target_port: int) -> int:
    """A TCP relay on 127.0.0.1 whose connections reach ``target_port`` from address ``source``.

    Returns the relay's port. Each accepted connection opens one to the
    target with its socket bound to ``source`` and copies bytes both ways
    until either side closes.
    """

    async def copy(src: trio.SocketStream, dst: trio.SocketStream, done: trio.CancelScope) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async for chunk in src:
                await dst.send_all(chunk)
        done.cancel()

    async def handle(client: trio.SocketStream) -> None:
        sock = trio.socket.socket()
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", target_port))
        server = trio.SocketStream(sock)
        async with server, client, trio.open_nursery() as pair:
            pair.start_soon(copy, client, server, pair.cancel_scope)
            pair.start_soon(copy, server, client, pair.cancel_scope)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


# --------------------------------------------------------------------------- per protocol


def xff_headers(forwarded_for: str | None) -> dict[str, str]:
    return {"X-Forwarded-For": forwarded_for} if forwarded_for is not None else {}


class HttpClient:
    """Asks over HTTP through the relay on ``port``."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    @contextlib.asynccontextmanager
    async def hold(self, forwarded_for: str | None = None) -> AsyncIterator[None]:
        """A streamed answer that stays in progress (its first piece arrived) inside the block."""
        async with httpx2.AsyncClient(base_url=self.url, timeout=10) as client:
            with trio.fail_after(CALL_TIMEOUT):
                async with client.stream(
                    "POST",
                    "/ask/held/stream",
                    json={"prompt": HOLD},
                    headers=xff_headers(forwarded_for),
                ) as response:
                    assert response.status_code == 200
                    lines = response.aiter_lines()  # kept open: the answer stays in progress
                    async for line in lines:
                        if line.startswith("event: delta"):
                            break
                    yield

    async def probe(self, forwarded_for: str | None = None) -> Outcome:
        async with httpx2.AsyncClient(base_url=self.url, timeout=CALL_TIMEOUT) as client:
            response = await client.post(
                "/ask/probe", json={"prompt": "hello"}, headers=xff_headers(forwarded_for)
            )
        if response.status_code == 200:
            return ("served", "")
        assert response.status_code == 429, response.text
        assert response.json()["error"]["code"] == "too_many_requests"
        return ("refused", response.json()["error"]["message"])


class WsClient:
    """JSON asks over WebSocket through the relay on ``port``, X-Forwarded-For at the handshake."""

    def __init__(self, port: int) -> None:
        self.port = port

    @contextlib.asynccontextmanager
    async def _socket(
        self, forwarded_for: str | None
    ) -> AsyncIterator[trio_websocket.WebSocketConnection]:
        headers = [(b"X-Forwarded-For", forwarded_for.encode())] if forwarded_for else None
        async with trio_websocket.open_websocket(
            "127.0.0.1", self.port, "/", use_ssl=False, extra_headers=headers
        ) as ws:
            yield ws

    @contextlib.asynccontextmanager
    async def hold(self, forwarded_for: str | None = None) -> AsyncIterator[None]:
        with trio.fail_after(CALL_TIMEOUT):
            async with self._socket(forwarded_for) as ws:
                await ws.send_message(
                    json.dumps({"type": "ask", "conversation_id": "held", "prompt": HOLD})
                )
                reply = json.loads(await ws.get_message())
                assert reply["type"] == "start", reply  # the answer is under way
                yield

    async def probe(self, forwarded_for: str | None = None) -> Outcome:
        with trio.fail_after(CALL_TIMEOUT):
            async with self._socket(forwarded_for) as ws:
                await ws.send_message(
                    json.dumps({"type": "ask", "conversation_id": "probe", "prompt": "hello"})
                )
                while True:
                    reply = json.loads(await ws.get_message())
                    if reply["type"] == "end":
                        return ("served", "")
                    if reply["type"] == "error":
                        assert reply["code"] == "too_many_requests", reply
                        return ("refused", reply["message"])


class GrpcClient:
    """``chat.Chat/Ask`` with grpcio (in threads) through the relay on ``port``."""

    def __init__(self, port: int) -> None:
        self.port = port

    def _call(self, channel: grpc.Channel, conversation_id: str, prompt: str, xff: str | None):
        ask = channel.unary_stream(
            "/chat.Chat/Ask",
            request_serializer=chat_pb2.AskRequest.SerializeToString,
            response_deserializer=chat_pb2.AskResponse.FromString,
        )
        metadata = [("x-forwarded-for", xff)] if xff is not None else []
        return ask(
            chat_pb2.AskRequest(conversation_id=conversation_id, prompt=prompt),
            metadata=metadata,
            timeout=CALL_TIMEOUT,
        )

    @contextlib.asynccontextmanager
    async def hold(self, forwarded_for: str | None = None) -> AsyncIterator[None]:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            call = self._call(channel, "held", HOLD, forwarded_for)
            try:
                with trio.fail_after(CALL_TIMEOUT):
                    first = await trio.to_thread.run_sync(next, call)
                assert first.turn_id and first.seq == 1, first  # the start: under way
                yield
            finally:
                call.cancel()

    async def probe(self, forwarded_for: str | None = None) -> Outcome:
        def run() -> Outcome:
            with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
                call = self._call(channel, "probe", "hello", forwarded_for)
                try:
                    list(call)
                except grpc.RpcError:
                    assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, call.details()
                    return ("refused", call.details())
                return ("served", "")

        with trio.fail_after(CALL_TIMEOUT + 5):
            return await trio.to_thread.run_sync(run)


PROTOCOLS: dict[str, tuple[str, Callable[[int], Any]]] = {
    "http": ("http_port", HttpClient),
    "ws": ("ws_port", WsClient),
    "grpc": ("grpc_port", GrpcClient),
}


@pytest.fixture(params=sorted(PROTOCOLS))
async def clients(
    request: pytest.FixtureRequest, start_server: StartServer, nursery: trio.Nursery
) -> dict[str, Any]:
    """A server with MAX_STREAMS_PER_KEY=1 and keys off, and one client per source address."""
    port_name, client_class = PROTOCOLS[request.param]
    server = await start_server(
        MAX_STREAMS_PER_KEY="1",
        TRUSTED_PROXIES=f"{PROXY}/32",
        WS_PORT=str(free_port()),
        GRPC_PORT=str(free_port()),
    )
    port = getattr(server.running, port_name)
    sources = {"a": "127.0.0.2", "b": "127.0.0.3", "proxy": PROXY}
    return {
        name: client_class(await relay_from(nursery, address, port))
        for name, address in sources.items()
    }


# --------------------------------------------------------------------------- point: per client


async def test_one_address_holding_its_slot_leaves_other_addresses_served(
    clients: dict[str, Any],
) -> None:
    async with clients["a"].hold():
        assert await clients["b"].probe() == ("served", "")
        outcome, message = await clients["a"].probe()
        assert outcome == "refused"
        assert "address 127.0.0.2" in message and "1 answers in progress" in message, message


async def test_forwarded_for_is_the_client_behind_a_trusted_proxy(clients: dict[str, Any]) -> None:
    proxy = clients["proxy"]
    async with proxy.hold("10.1.1.1"):
        assert await proxy.probe("10.1.1.2") == ("served", "")
        # the right-most address that is not a trusted proxy is the client
        assert await proxy.probe(f"10.1.1.1, {PROXY}") == ("refused", _refusal("10.1.1.1"))
        # what the client itself put in front of it is not believed
        assert await proxy.probe("10.1.1.1, 10.1.1.3") == ("served", "")
        assert await proxy.probe("10.1.1.3, 10.1.1.1") == ("refused", _refusal("10.1.1.1"))


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(clients: dict[str, Any]) -> None:
    async with clients["b"].hold("10.2.2.2"):
        assert await clients["b"].probe("10.2.2.3") == ("refused", _refusal("127.0.0.3"))
        assert await clients["a"].probe("10.2.2.2") == ("served", "")


def _refusal(address: str) -> str:
    return f"the address {address} already has 1 answers in progress; retry when one ends"


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "client"),
    [
        ("127.0.0.9", ["10.0.0.1"], "10.0.0.1"),
        ("127.0.0.9", ["10.0.0.1, 127.0.0.9"], "10.0.0.1"),
        ("127.0.0.9", ["10.0.0.5", "10.0.0.1"], "10.0.0.1"),  # several header lines, in order
        ("127.0.0.9", ["[2001:db8::1]:443"], "2001:db8::1"),
        ("127.0.0.9", ["10.0.0.1:5000"], "10.0.0.1"),
        ("127.0.0.9", ["garbage, unknown"], "127.0.0.9"),
        ("127.0.0.9", [], "127.0.0.9"),
        ("::ffff:127.0.0.9", ["10.0.0.1"], "10.0.0.1"),  # an IPv4 peer on a dual-stack socket
        ("127.0.0.8", ["10.0.0.1"], "127.0.0.8"),
        ("", ["10.0.0.1"], ""),
    ],
)
def test_client_address_rule(peer: str, forwarded_for: list[str], client: str) -> None:
    settings = load_settings(
        {"OPENAI_API_KEY": "x", "TRUSTED_PROXIES": f"{PROXY}/32"}, environ={}, env_file=None
    )
    assert client_address(peer, forwarded_for, settings) == client


# --------------------------------------------------------------------------- point: text fields

NUL = "before\x00after"
SURROGATE = "before\ud800after"  # what the JSON escape "\ud800" decodes to
ASK_FIELDS = ("prompt", "system", "model")


@pytest.fixture(params=["sqlite", "postgres"])
def database_env(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """DATABASE_URL for a fresh SQLite file (the default) or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield {}
        return
    yield {"DATABASE_URL": pg_url(request.getfixturevalue("pg_schema"))}


def bad_texts() -> list[tuple[str, str]]:
    return [(field, text) for field in ASK_FIELDS for text in (NUL, SURROGATE)]


def ascii_json(payload: dict[str, Any]) -> bytes:
    """JSON with every non-ASCII character escaped, so a lone surrogate travels as ``\\ud800``."""
    return json.dumps(payload, ensure_ascii=True).encode()


def assert_names(message: str, field: str, text: str) -> None:
    assert message.startswith(f"{field} must"), message
    assert ("NUL" if "\x00" in text else "surrogate") in message, message


async def test_http_refuses_bad_text_in_every_field_before_the_upstream(
    start_server: StartServer, database_env: dict[str, str]
) -> None:
    server = await start_server(**database_env)
    headers = {"Content-Type": "application/json"}
    async with server.client() as client:
        for field, text in bad_texts():
            body = {"prompt": "hello", field: text}
            for path in ("/ask/c1", "/ask/c1/stream"):
                response = await client.post(path, content=ascii_json(body), headers=headers)
                assert response.status_code == 400, (field, path, response.text)
                error = response.json()["error"]
                assert error["code"] == "invalid_input"
                assert field in error["message"], error
        for text in (NUL, SURROGATE):
            body = ascii_json({"prompt": text})
            response = await client.put("/conversations/c1/system", content=body, headers=headers)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["code"] == "invalid_input"
            assert "prompt" in response.json()["error"]["message"]
        assert (await client.get("/conversations/c1")).status_code == 404  # nothing stored
    assert server.fake.requests == []


async def test_websocket_refuses_bad_text_in_every_field_before_the_upstream(
    start_server: StartServer, database_env: dict[str, str]
) -> None:
    server = await start_server(WS_PORT=str(free_port()), **database_env)
    with trio.fail_after(CALL_TIMEOUT):
        async with trio_websocket.open_websocket(
            "127.0.0.1", server.running.ws_port, "/", use_ssl=False
        ) as ws:
            for field, text in bad_texts():
                ask = {"type": "ask", "conversation_id": "c1", "prompt": "hello", field: text}
                await ws.send_message(ascii_json(ask).decode())
                reply = json.loads(await ws.get_message())
                assert reply["type"] == "error" and reply["code"] == "invalid_input", reply
                assert_names(reply["message"], field, text)
            await ws.send_message("<|ask|>$c1$" + NUL)  # the original protocol: the same rule
            assert await ws.get_message() == "<|err|>$prompt must not contain NUL characters"
    assert server.fake.requests == []
    async with server.client() as client:
        assert (await client.get("/conversations/c1")).status_code == 404
        metrics = await scrape(client)
    assert metric(metrics, "easybackend_upstream_errors_total", kind="upstream_error") == 0


def grpc_raw_call(port: int, method: str, body: bytes) -> tuple[grpc.StatusCode, str]:
    """One unary-request call of ``chat.Chat/<method>`` with ``body`` sent as the serialised message."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_stream(
            f"/chat.Chat/{method}", request_serializer=lambda raw: raw, response_deserializer=bytes
        )(body, timeout=CALL_TIMEOUT)
        with contextlib.suppress(grpc.RpcError):
            list(call)
        return call.code(), call.details() or ""


def with_invalid_utf8(message: Any, field: str) -> bytes:
    """``message`` serialised with ``field`` holding a UTF-8-encoded lone surrogate (invalid UTF-8)."""
    setattr(message, field, "MARK")
    return message.SerializeToString().replace(b"MARK", b"\xed\xa0\x80")


async def test_grpc_refuses_bad_text_in_every_field_before_the_upstream(
    start_server: StartServer, database_env: dict[str, str]
) -> None:
    server = await start_server(GRPC_PORT=str(free_port()), **database_env)
    port = server.running.grpc_port

    async def call(method: str, body: bytes) -> tuple[grpc.StatusCode, str]:
        with trio.fail_after(CALL_TIMEOUT + 5):
            return await trio.to_thread.run_sync(grpc_raw_call, port, method, body)

    for field in ASK_FIELDS:
        ask = chat_pb2.AskRequest(conversation_id="c1", prompt="hello")
        setattr(ask, field, NUL)
        code, details = await call("Ask", ask.SerializeToString())
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (field, details)
        assert_names(details, field, NUL)
        # protobuf strings are UTF-8: a lone surrogate can only come as invalid UTF-8 bytes
        ask = chat_pb2.AskRequest(conversation_id="c1", prompt="hello")
        code, details = await call("Ask", with_invalid_utf8(ask, field))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (field, details)
    system = chat_pb2.SetSystemPromptRequest(conversation_id="c1", prompt=NUL)
    code, details = await call("SetSystemPrompt", system.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert_names(details, "prompt", NUL)
    system = chat_pb2.SetSystemPromptRequest(conversation_id="c1")
    code, details = await call("SetSystemPrompt", with_invalid_utf8(system, "prompt"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert server.fake.requests == []
    code, details = await call(
        "GetConversation", chat_pb2.ConversationRequest(conversation_id="c1").SerializeToString()
    )
    assert code == grpc.StatusCode.NOT_FOUND, details  # nothing stored
