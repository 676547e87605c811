"""The gRPC transport through real sockets: grpcio and purerpc clients, the fake upstream.

The grpcio client of the original is compiled at test time from
``tests/protos/original_chat.proto`` (lowercase message names, as the original
shipped them); blocking grpcio calls run in a worker thread, each bounded by
its own gRPC timeout.
"""

from __future__ import annotations

import dataclasses
import re
import struct
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import purerpc
import pytest
import trio
from helpers import database
from helpers.grpc import CALL_TIMEOUT, compile_for_grpcio, expect_rpc_failure, rpc
from helpers.servers import Server, StartServer, free_port
from helpers.upstream import ALLOW_OTHER_MODEL

from easybackend.fake_upstream import FakeUpstream
from easybackend.listeners import ListenError
from easybackend.proto_gen import chat_pb2

ROOT = Path(__file__).resolve().parent.parent
ORIGINAL_PROTO = ROOT / "tests" / "protos" / "original_chat.proto"
HEALTH_PROTO = ROOT / "proto" / "grpc" / "health" / "v1" / "health.proto"
LONG_ANSWER = "[[fake:tokens=300]][[fake:delay=0.05]]"  # 15 s if nobody stops it


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The original's chat.proto, compiled for grpcio."""
    return compile_for_grpcio(ORIGINAL_PROTO, tmp_path_factory.mktemp("original"), "original_chat")


@pytest.fixture(scope="module")
def health(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """proto/grpc/health/v1/health.proto, compiled for grpcio."""
    return compile_for_grpcio(HEALTH_PROTO, tmp_path_factory.mktemp("health"), "grpcio_health")


def target(server: Server) -> str:
    return f"127.0.0.1:{server.running.grpc_port}"


async def in_thread(fn: Callable[[], Any]) -> Any:
    """Run a blocking grpcio client function (each of its calls carries a timeout)."""
    return await trio.to_thread.run_sync(fn)


def original_ask(server: Server, original: SimpleNamespace, conversation_id: str, prompt: str):
    """Ask with the original's client; returns the list of response texts."""

    def run() -> list[str]:
        with grpc.insecure_channel(target(server)) as channel:
            stub = original.grpc.ChatStub(channel)
            request = original.pb2.askrequest(prompt=prompt, conversation_id=conversation_id)
            return [reply.response for reply in stub.Ask(request, timeout=CALL_TIMEOUT)]

    return in_thread(run)


def original_ask_error(
    server: Server, original: SimpleNamespace, conversation_id: str, prompt: str
) -> Awaitable[grpc.RpcError]:
    """Ask with the original's client, expecting the call to fail; returns the error."""

    def run() -> grpc.RpcError:
        with grpc.insecure_channel(target(server)) as channel:
            stub = original.grpc.ChatStub(channel)
            request = original.pb2.askrequest(prompt=prompt, conversation_id=conversation_id)
            try:
                replies = list(stub.Ask(request, timeout=CALL_TIMEOUT))
            except grpc.RpcError as exc:
                return exc
            raise AssertionError(f"the call succeeded: {replies!r}")

    return in_thread(run)


async def purerpc_ask(server: Server, request: chat_pb2.AskRequest) -> list[chat_pb2.AskResponse]:
    return await rpc(server, "Ask", request)


async def purerpc_error(server: Server, request: chat_pb2.AskRequest) -> purerpc.RpcFailedError:
    """Ask with purerpc, expecting the call to fail; returns the error."""
    return await expect_rpc_failure(purerpc_ask(server, request))


async def wait_for_event(fake: FakeUpstream, event: str, *, within: float = 1.0) -> dict:
    """The first upstream event named ``event``, waiting up to ``within`` seconds for it."""
    with trio.fail_after(within):
        while True:
            for record in fake.events:
                if record["event"] == event:
                    return record
            await trio.sleep(0.01)


def stored_turns(server: Server, conversation_id: str) -> list[tuple[str, str]]:
    """(answer, finish_reason) of the stored turns of a conversation, in order."""
    turns = database.stored_turns(server.settings.sqlite_path, conversation_id)
    return [(turn["answer"], turn["finish_reason"]) for turn in turns]


async def wait_for_turn(server: Server, conversation_id: str, *, within: float = 2.0):
    with trio.fail_after(within):
        while not (turns := stored_turns(server, conversation_id)):
            await trio.sleep(0.02)
    return turns


def tokens(text: str) -> list[str]:
    """The fake upstream's tokens of an answer."""
    return re.findall(r"\s*\S+|\s+", text)


# --------------------------------------------------------------------------- asking


async def test_original_client_streams_the_answer(grpc_server: Server, original: SimpleNamespace):
    replies = await original_ask(grpc_server, original, "orig-1", "hello there, old friend")

    assert len(replies) > 1  # streamed, not one block
    assert "".join(replies) == "echo(1): hello there, old friend"


async def test_purerpc_client_gets_pieces_then_finish_and_usage(grpc_server: Server):
    replies = await purerpc_ask(
        grpc_server, chat_pb2.AskRequest(conversation_id="pure-1", prompt="how are you")
    )

    start, *pieces, last = replies
    assert start.response == "" and start.turn_id == last.turn_id and start.seq == 1
    assert "".join(p.response for p in pieces) == "echo(1): how are you"
    assert all(p.response and not p.finish_reason and not p.HasField("usage") for p in pieces)
    assert last.response == ""
    assert last.finish_reason == "stop"
    assert last.model == grpc_server.settings.model
    assert last.usage.prompt_tokens > 0
    assert last.usage.completion_tokens == len(tokens("echo(1): how are you"))
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens


async def test_optional_fields_reach_the_upstream(start_server: StartServer):
    grpc_server = await start_server(
        GRPC_PORT=str(free_port()), SHUTDOWN_GRACE="2", **ALLOW_OTHER_MODEL
    )
    request = chat_pb2.AskRequest(
        conversation_id="opts",
        prompt="one two three four five six",
        model="other-model",
        temperature=1.25,
        max_tokens=3,
        system="be brief",
    )
    _start, *pieces, last = await purerpc_ask(grpc_server, request)

    body = grpc_server.fake.requests[-1]["body"]
    assert body["model"] == "other-model"
    assert body["temperature"] == 1.25
    assert body.get("max_tokens", body.get("max_completion_tokens")) == 3
    assert body["messages"][0] == {"role": "system", "content": "be brief"}
    assert last.finish_reason == "length"
    assert len(pieces) == 3


async def test_unset_optional_fields_use_the_settings(grpc_server: Server):
    await purerpc_ask(grpc_server, chat_pb2.AskRequest(conversation_id="defaults", prompt="hi"))

    body = grpc_server.fake.requests[-1]["body"]
    assert body["model"] == grpc_server.settings.model
    assert body["temperature"] == grpc_server.settings.temperature
    assert [m["role"] for m in body["messages"]] == ["user"]


async def test_conversation_memory_across_asks(grpc_server: Server, original: SimpleNamespace):
    first = await original_ask(grpc_server, original, "memo", "my name is Ada")
    second = await original_ask(grpc_server, original, "memo", "what is my name?")

    assert "".join(first) == "echo(1): my name is Ada"
    assert "".join(second) == "echo(3): what is my name?"
    messages = grpc_server.fake.requests[-1]["body"]["messages"]
    assert messages == [
        {"role": "user", "content": "my name is Ada"},
        {"role": "assistant", "content": "echo(1): my name is Ada"},
        {"role": "user", "content": "what is my name?"},
    ]


# --------------------------------------------------------------------------- errors


async def test_invalid_conversation_id_is_invalid_argument(
    grpc_server: Server, original: SimpleNamespace
):
    error = await original_ask_error(grpc_server, original, "not ok/../x", "hi")

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "conversation_id" in error.details()
    assert grpc_server.fake.requests == []  # refused before reaching the model


async def test_bad_optional_field_is_invalid_argument(grpc_server: Server):
    error = await purerpc_error(
        grpc_server, chat_pb2.AskRequest(conversation_id="c", prompt="hi", temperature=7)
    )

    assert error.status.status_code == purerpc.StatusCode.INVALID_ARGUMENT
    assert "temperature" in error.status.status_message
    assert grpc_server.fake.requests == []


async def test_upstream_failure_is_unavailable_and_the_server_keeps_serving(
    grpc_server: Server, original: SimpleNamespace
):
    error = await original_ask_error(grpc_server, original, "up", "boom [[fake:status=500]]")

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "500" in error.details()
    assert "Traceback" not in error.details()
    replies = await original_ask(grpc_server, original, "up", "again")
    assert "".join(replies) == "echo(1): again"  # the failed ask stored nothing


async def test_oversized_request_is_resource_exhausted(
    grpc_server: Server, original: SimpleNamespace
):
    prompt = "x" * (grpc_server.settings.max_body_bytes + 10)
    error = await original_ask_error(grpc_server, original, "big", prompt)

    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    replies = await original_ask(grpc_server, original, "big", "small")
    assert "".join(replies) == "echo(1): small"


async def test_undecodable_request_is_invalid_argument(
    grpc_server: Server, original: SimpleNamespace
):
    def run() -> grpc.RpcError:
        with grpc.insecure_channel(target(grpc_server)) as channel:
            call = channel.unary_stream("/chat.Chat/Ask")  # bytes in, bytes out
            with pytest.raises(grpc.RpcError) as failed:
                list(call(b"\x0a\xff\xff\xff", timeout=CALL_TIMEOUT))  # a truncated string
            return failed.value

    error = await in_thread(run)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "decoded" in error.details()
    replies = await original_ask(grpc_server, original, "after-junk", "fine")
    assert "".join(replies) == "echo(1): fine"


async def test_unknown_method_is_unimplemented(grpc_server: Server):
    def run() -> grpc.RpcError:
        with grpc.insecure_channel(target(grpc_server)) as channel:
            call = channel.unary_unary("/chat.Chat/Nope")
            with pytest.raises(grpc.RpcError) as failed:
                call(b"", timeout=CALL_TIMEOUT)
            return failed.value

    error = await in_thread(run)
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_garbage_on_the_socket_does_not_stop_the_server(
    grpc_server: Server, original: SimpleNamespace
):
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", grpc_server.running.grpc_port)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)))
            while await stream.receive_some(65536):  # the server hangs up
                pass

    replies = await original_ask(grpc_server, original, "after-garbage", "still there?")
    assert "".join(replies) == "echo(1): still there?"


# --------------------------------------------------------------------------- cancellation


async def test_client_cancel_cancels_the_upstream_call(
    grpc_server: Server, original: SimpleNamespace
):
    def run() -> tuple[list[str], grpc.StatusCode]:
        with grpc.insecure_channel(target(grpc_server)) as channel:
            stub = original.grpc.ChatStub(channel)
            call = stub.Ask(
                original.pb2.askrequest(prompt=f"count {LONG_ANSWER}", conversation_id="cancel"),
                timeout=CALL_TIMEOUT,
            )
            received = [next(call).response for _ in range(4)]  # the start, then 3 pieces
            call.cancel()
            # With the channel (and its connection) still open: only the reset tells the server.
            trio.from_thread.run(wait_for_event, grpc_server.fake, "disconnected")
            return received, call.code()

    received, code = await in_thread(run)
    assert code == grpc.StatusCode.CANCELLED

    [disconnected] = [e for e in grpc_server.fake.events if e["event"] == "disconnected"]
    assert disconnected["chunks"] < 300
    [(answer, finish_reason)] = await wait_for_turn(grpc_server, "cancel")
    assert finish_reason == "cancelled"
    assert answer.startswith("".join(received))
    assert answer.startswith("echo(1): count")
    assert 3 <= len(tokens(answer)) < 300


async def test_client_deadline_cancels_the_upstream_call(
    grpc_server: Server, original: SimpleNamespace
):
    def run() -> tuple[list[str], grpc.RpcError | None]:
        received: list[str] = []
        with grpc.insecure_channel(target(grpc_server)) as channel:
            stub = original.grpc.ChatStub(channel)
            request = original.pb2.askrequest(prompt=f"slow {LONG_ANSWER}", conversation_id="late")
            error = None
            try:
                for reply in stub.Ask(request, timeout=0.5):
                    received.append(reply.response)
            except grpc.RpcError as exc:
                error = exc
            trio.from_thread.run(wait_for_event, grpc_server.fake, "disconnected")
            return received, error

    received, error = await in_thread(run)
    assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert received  # the answer had started
    [(answer, finish_reason)] = await wait_for_turn(grpc_server, "late")
    assert finish_reason == "cancelled"
    assert answer.startswith("".join(received))
    assert 1 <= len(tokens(answer)) < 300


@dataclasses.dataclass
class RawCall:
    """What the bare HTTP/2 client got: the response texts and the trailers, if any came."""

    received: list[str]
    trailers: dict[str, str] | None


async def raw_ask(
    port: int,
    request: chat_pb2.AskRequest,
    *,
    pieces: int | None = None,
    headers: Sequence[tuple[str, str]] = (),
) -> RawCall:
    """A bare HTTP/2 gRPC client: ask, then read until the trailers, or until ``pieces``
    messages came and then close the TCP connection without a word.

    (purerpc's client never closes its socket, and grpcio resets its streams,
    so neither can act as a client that vanishes, or one that sends a
    ``grpc-timeout`` and then waits for the server to enforce it.)
    """
    h2_conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    h2_conn.initiate_connection()
    request_headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/chat.Chat/Ask"),
        (":authority", f"127.0.0.1:{port}"),
        ("te", "trailers"),
        ("content-type", "application/grpc"),
        *headers,
    ]
    h2_conn.send_headers(1, request_headers)
    body = request.SerializeToString()
    h2_conn.send_data(1, struct.pack(">?I", False, len(body)) + body, end_stream=True)
    call = RawCall([], None)
    buffer = b""
    with trio.fail_after(CALL_TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(h2_conn.data_to_send())
            while call.trailers is None and (pieces is None or len(call.received) < pieces):
                data = await stream.receive_some(65536)
                assert data, "the server closed the connection"
                for event in h2_conn.receive_data(data):
                    if isinstance(event, h2.events.DataReceived):
                        h2_conn.acknowledge_received_data(event.flow_controlled_length, 1)
                        buffer += event.data
                    elif isinstance(event, h2.events.TrailersReceived):
                        call.trailers = {k.decode(): v.decode() for k, v in event.headers}
                while len(buffer) >= 5 and len(buffer) >= 5 + (size := int.from_bytes(buffer[1:5])):
                    reply = chat_pb2.AskResponse.FromString(buffer[5 : 5 + size])
                    call.received.append(reply.response)
                    buffer = buffer[5 + size :]
                await stream.send_all(h2_conn.data_to_send())
    return call


async def test_client_hanging_up_cancels_the_upstream_call(grpc_server: Server):
    request = chat_pb2.AskRequest(conversation_id="gone", prompt="bye [[fake:stall_after=2]]")
    call = await raw_ask(grpc_server.running.grpc_port, request, pieces=3)  # the start, 2 pieces

    await wait_for_event(grpc_server.fake, "disconnected", within=1.0)
    [(answer, finish_reason)] = await wait_for_turn(grpc_server, "gone")
    assert finish_reason == "cancelled"
    assert answer.startswith("".join(call.received))
    assert "".join(call.received).startswith("echo(1): bye")


async def test_client_cancel_reaches_a_call_waiting_for_the_model(
    grpc_server: Server, original: SimpleNamespace
):
    """The reset is delivered to the call itself, not noticed at its next send."""

    def run() -> list[str]:
        with grpc.insecure_channel(target(grpc_server)) as channel:
            stub = original.grpc.ChatStub(channel)
            request = original.pb2.askrequest(
                prompt="wait [[fake:stall_after=2]]", conversation_id="stalled"
            )
            call = stub.Ask(request, timeout=CALL_TIMEOUT)
            received = [next(call).response for _ in range(3)]  # the start, then 2 pieces
            assert received[0] == ""
            call.cancel()
            trio.from_thread.run(wait_for_event, grpc_server.fake, "disconnected")
            return received

    received = await in_thread(run)
    [(answer, finish_reason)] = await wait_for_turn(grpc_server, "stalled")
    assert (answer, finish_reason) == ("".join(received), "cancelled")


async def test_the_server_enforces_the_client_deadline(grpc_server: Server):
    request = chat_pb2.AskRequest(conversation_id="timed", prompt="wait [[fake:stall_after=2]]")
    started = trio.current_time()
    call = await raw_ask(grpc_server.running.grpc_port, request, headers=[("grpc-timeout", "300m")])

    assert call.trailers is not None
    assert call.trailers["grpc-status"] == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
    assert 0.3 <= trio.current_time() - started < 2
    assert len(call.received) == 3  # the start, then the 2 pieces before the stall
    await wait_for_event(grpc_server.fake, "disconnected", within=1.0)
    [(answer, finish_reason)] = await wait_for_turn(grpc_server, "timed")
    assert (answer, finish_reason) == ("".join(call.received), "cancelled")


# --------------------------------------------------------------------------- API keys


async def test_api_keys_in_metadata_own_the_conversations(
    start_server: StartServer, original: SimpleNamespace, health: SimpleNamespace
):
    alice, bob = "alice-SECRET-1234", "bob-SECRET-5678"
    server = await start_server(
        GRPC_PORT=str(free_port()),
        HTTP_PORT="off",
        SHUTDOWN_GRACE="2",
        API_KEYS=f"alice:{alice},bob:{bob}",
    )

    def run() -> dict[str, Any]:
        with grpc.insecure_channel(target(server)) as channel:
            stub = original.grpc.ChatStub(channel)

            def ask(key: str | None, prompt: str) -> str:
                metadata = [("authorization", f"Bearer {key}")] if key else None
                request = original.pb2.askrequest(prompt=prompt, conversation_id="1")
                replies = stub.Ask(request, metadata=metadata, timeout=CALL_TIMEOUT)
                return "".join(reply.response for reply in replies)

            def refused(key: str | None) -> grpc.RpcError:
                with pytest.raises(grpc.RpcError) as failed:
                    ask(key, "let me in")
                return failed.value

            check = health.grpc.HealthStub(channel).Check
            return {
                "missing": refused(None),
                "wrong": refused("not-a-key"),
                "alice": ask(alice, "I am Alice"),
                "bob": ask(bob, "I am Bob"),
                "alice again": ask(alice, "who am I?"),
                "health": check(health.pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT).status,
            }

    results = await in_thread(run)

    for error in (results["missing"], results["wrong"]):
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "SECRET" not in error.details() and "not-a-key" not in error.details()
    assert results["alice"] == "echo(1): I am Alice"
    assert results["bob"] == "echo(1): I am Bob"  # the same id, another key: another conversation
    assert results["alice again"] == "echo(3): who am I?"
    contents = [m["content"] for m in server.fake.requests[-1]["body"]["messages"]]
    assert "I am Alice" in contents and "I am Bob" not in contents
    assert results["health"] == health.pb2.HealthCheckResponse.SERVING  # probes need no key
    assert len(server.fake.requests) == 3  # the refused asks never reached the model


# --------------------------------------------------------------------------- health


async def test_health_check(grpc_server: Server, health: SimpleNamespace):
    def run() -> tuple[list[int], grpc.RpcError]:
        with grpc.insecure_channel(target(grpc_server)) as channel:
            stub = health.grpc.HealthStub(channel)
            statuses = [
                stub.Check(health.pb2.HealthCheckRequest(service=name), timeout=CALL_TIMEOUT).status
                for name in ("", "chat.Chat")
            ]
            with pytest.raises(grpc.RpcError) as failed:
                stub.Check(health.pb2.HealthCheckRequest(service="nope.Nope"), timeout=CALL_TIMEOUT)
            return statuses, failed.value

    statuses, unknown = await in_thread(run)
    serving = health.pb2.HealthCheckResponse.SERVING
    assert statuses == [serving, serving]
    assert unknown.code() == grpc.StatusCode.NOT_FOUND


async def test_health_watch_sends_the_status_then_waits(
    grpc_server: Server, health: SimpleNamespace
):
    def run() -> tuple[int, grpc.StatusCode]:
        with grpc.insecure_channel(target(grpc_server)) as channel:
            call = health.grpc.HealthStub(channel).Watch(
                health.pb2.HealthCheckRequest(service="chat.Chat"), timeout=CALL_TIMEOUT
            )
            first = next(call).status
            # Nothing more comes while the status stays the same: the call is still open.
            assert not call.done()
            call.cancel()
            return first, call.code()

    first, code = await in_thread(run)
    assert first == health.pb2.HealthCheckResponse.SERVING
    assert code == grpc.StatusCode.CANCELLED


# --------------------------------------------------------------------------- listening


async def test_second_server_on_the_same_port_fails_naming_it(
    start_server: StartServer, original: SimpleNamespace
):
    port = free_port()
    first = await start_server(GRPC_PORT=str(port), HTTP_PORT="off")

    with pytest.raises(ListenError, match=rf"\b{port}\b"):
        await start_server(GRPC_PORT=str(port), HTTP_PORT="off")

    replies = await original_ask(first, original, "first", "still mine")
    assert "".join(replies) == "echo(1): still mine"
