"""The gRPC server's life cycle: graceful shutdown, the grace deadline, health at shutdown, TLS.

Clients are grpcio, calling with the generated messages of
``easybackend.proto_gen``; blocking calls run in a worker thread, each bounded
by its own gRPC timeout.
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
import trustme
from helpers.grpc import CALL_TIMEOUT
from helpers.servers import Server, StartServer, free_port, port_closed

from easybackend.chat.caller import Callers
from easybackend.chat.service import AskRequest, Delta, End, Usage
from easybackend.listeners import bind_tcp
from easybackend.proto_gen import chat_pb2, health_pb2
from easybackend.settings import Settings
from easybackend.transports.grpc import serve_grpc


def ask_method(channel: grpc.Channel) -> Any:
    return channel.unary_stream(
        "/chat.Chat/Ask",
        request_serializer=chat_pb2.AskRequest.SerializeToString,
        response_deserializer=chat_pb2.AskResponse.FromString,
    )


def check_method(channel: grpc.Channel) -> Any:
    return channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )


def watch_method(channel: grpc.Channel) -> Any:
    return channel.unary_stream(
        "/grpc.health.v1.Health/Watch",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )


async def start_grpc(start_server: StartServer, grace: float) -> Server:
    return await start_server(
        GRPC_PORT=str(free_port()), HTTP_PORT="off", SHUTDOWN_GRACE=str(grace)
    )


async def stopped(server: Server, within: float) -> None:
    with trio.fail_after(within):
        await server.stopped.wait()


async def test_shutdown_lets_calls_in_flight_finish_and_refuses_new_ones(
    start_server: StartServer,
):
    server = await start_grpc(start_server, grace=10)
    port = server.running.grpc_port

    async def shut_down() -> None:
        server.shutdown.set()
        await port_closed(port)  # accepting stopped, so the drain has begun

    def run() -> tuple[list[chat_pb2.AskResponse], grpc.RpcError, int]:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            ask = ask_method(channel)
            request = chat_pb2.AskRequest(
                conversation_id="drain", prompt="finish me [[fake:tokens=30]][[fake:delay=0.02]]"
            )
            call = ask(request, timeout=CALL_TIMEOUT)
            replies = [next(call)]
            trio.from_thread.run(shut_down)
            late = ask(
                chat_pb2.AskRequest(conversation_id="late", prompt="hi"), timeout=CALL_TIMEOUT
            )
            with pytest.raises(grpc.RpcError) as refused:
                list(late)
            health = check_method(channel)(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)
            replies.extend(call)
            return replies, refused.value, health.status

    replies, refused, health = await trio.to_thread.run_sync(run)

    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in refused.details()
    assert health == health_pb2.HealthCheckResponse.NOT_SERVING  # health still answers
    start, *pieces, last = replies
    assert start.seq == 1 and start.turn_id == last.turn_id
    assert len(pieces) == 30
    assert "".join(p.response for p in pieces).startswith("echo(1): finish me")
    assert last.finish_reason == "stop"
    await stopped(server, within=5)
    assert [r["body"]["messages"][-1]["content"] for r in server.fake.requests] == [
        "finish me [[fake:tokens=30]][[fake:delay=0.02]]"
    ]  # the refused call never reached the model


async def test_calls_still_running_after_the_grace_are_cancelled(start_server: StartServer):
    server = await start_grpc(start_server, grace=0.5)
    port = server.running.grpc_port

    def run() -> tuple[list[str], grpc.RpcError]:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = chat_pb2.AskRequest(
                conversation_id="slow", prompt="never ends [[fake:tokens=300]][[fake:delay=0.05]]"
            )
            call = ask_method(channel)(request, timeout=CALL_TIMEOUT)
            received = [next(call).response]
            trio.from_thread.run_sync(server.shutdown.set)
            with pytest.raises(grpc.RpcError) as failed:
                received.extend(reply.response for reply in call)
            return received, failed.value

    with trio.fail_after(5):
        received, error = await trio.to_thread.run_sync(run)

    assert error.code() == grpc.StatusCode.UNAVAILABLE  # the connection was closed under it
    assert len(received) < 300
    await stopped(server, within=2)
    assert any(e["event"] == "disconnected" for e in server.fake.events)
    assert not any(e["event"] == "completed" for e in server.fake.events)


async def test_health_watch_reports_not_serving_at_shutdown(start_server: StartServer):
    server = await start_grpc(start_server, grace=5)

    def run() -> tuple[list[int], grpc.StatusCode]:
        with grpc.insecure_channel(f"127.0.0.1:{server.running.grpc_port}") as channel:
            call = watch_method(channel)(
                health_pb2.HealthCheckRequest(service="chat.Chat"), timeout=CALL_TIMEOUT
            )
            statuses = [next(call).status]
            trio.from_thread.run_sync(server.shutdown.set)
            statuses.extend(reply.status for reply in call)
            return statuses, call.code()

    statuses, code = await trio.to_thread.run_sync(run)

    serving = health_pb2.HealthCheckResponse
    assert statuses == [serving.SERVING, serving.NOT_SERVING]
    assert code == grpc.StatusCode.OK
    await stopped(server, within=2)  # the watch did not hold the drain up


class EchoService:
    """Stands in for ChatService where only the transport is under test."""

    caller = Callers(Settings()).caller  # who is calling: decided as by ChatService

    def refused(self, error: Exception, **details: object) -> None:
        """An ask refused before ask(): nothing to account for here."""

    async def ask(self, request: AskRequest) -> AsyncIterator[Delta | End]:
        yield Delta("echo: ")
        yield Delta(request.prompt)
        if request.prompt == "crash":
            raise RuntimeError("hidden internal detail")
        yield End(request.conversation_id, "stub-model", "stop", Usage(1, 2), turn_id="t1", turn=1)


@dataclasses.dataclass
class StubServer:
    port: int
    shutdown: trio.Event
    done: trio.Event


@pytest.fixture
def serve_stub(
    nursery: trio.Nursery, make_settings: Callable[..., Settings]
) -> Callable[..., Awaitable[StubServer]]:
    """Run serve_grpc itself over EchoService; keyword arguments go to serve_grpc."""

    async def start(settings: Settings | None = None, **kwargs: Any) -> StubServer:
        sock = bind_tcp("127.0.0.1", 0, name="gRPC")
        server = StubServer(sock.getsockname()[1], trio.Event(), trio.Event())

        async def run(*, task_status: trio.TaskStatus[None]) -> None:
            try:
                await serve_grpc(
                    EchoService(),  # type: ignore[arg-type]
                    settings or make_settings(),
                    sock,
                    server.shutdown,
                    task_status=task_status,
                    **kwargs,
                )
            finally:
                server.done.set()

        with trio.fail_after(5):
            await nursery.start(run)
        return server

    return start


def ask_stub(port: int, prompt: str) -> list[chat_pb2.AskResponse]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        request = chat_pb2.AskRequest(conversation_id="stub", prompt=prompt)
        return list(ask_method(channel)(request, timeout=CALL_TIMEOUT))


async def test_unexpected_errors_are_internal_without_details(
    serve_stub: Callable[..., Awaitable[StubServer]], caplog: pytest.LogCaptureFixture
):
    server = await serve_stub()

    def run() -> tuple[list[str], grpc.RpcError]:
        received: list[str] = []
        with pytest.raises(grpc.RpcError) as failed:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                request = chat_pb2.AskRequest(conversation_id="stub", prompt="crash")
                for reply in ask_method(channel)(request, timeout=CALL_TIMEOUT):
                    received.append(reply.response)
        return received, failed.value

    received, error = await trio.to_thread.run_sync(run)

    assert received == ["echo: ", "crash"]
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "internal server error"
    logged = [
        r for r in caplog.records if r.exc_info and "hidden internal detail" in str(r.exc_info[1])
    ]
    assert logged and logged[0].levelname == "ERROR"
    replies = await trio.to_thread.run_sync(ask_stub, server.port, "next")
    assert "".join(r.response for r in replies) == "echo: next"


async def test_tls(serve_stub: Callable[..., Awaitable[StubServer]]):
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    server_context.set_alpn_protocols(["h2"])
    server = await serve_stub(ssl_context=server_context)

    def call(channel: grpc.Channel) -> list[chat_pb2.AskResponse]:
        request = chat_pb2.AskRequest(conversation_id="tls", prompt="hello")
        return list(ask_method(channel)(request, timeout=CALL_TIMEOUT))

    def secure() -> list[chat_pb2.AskResponse]:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
        with grpc.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
            return call(channel)

    def plaintext() -> grpc.RpcError:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.RpcError) as failed:
                call(channel)
            return failed.value

    *pieces, last = await trio.to_thread.run_sync(secure)
    assert "".join(p.response for p in pieces) == "echo: hello"
    assert (last.finish_reason, last.model, last.usage.total_tokens) == ("stop", "stub-model", 3)

    error = await trio.to_thread.run_sync(plaintext)
    assert error.code() == grpc.StatusCode.UNAVAILABLE

    server.shutdown.set()
    with trio.fail_after(5):
        await server.done.wait()


async def test_tls_from_the_settings(start_server: StartServer, tmp_path: Path):
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    server = await start_server(
        GRPC_PORT=str(free_port()), HTTP_PORT="off", TLS_CERTFILE=str(cert), TLS_KEYFILE=str(key)
    )
    address = f"127.0.0.1:{server.running.grpc_port}"
    request = chat_pb2.AskRequest(conversation_id="tls", prompt="secure")

    def secure() -> list[chat_pb2.AskResponse]:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
        with grpc.secure_channel(address, credentials) as channel:
            return list(ask_method(channel)(request, timeout=CALL_TIMEOUT))

    def plaintext() -> grpc.RpcError:
        with grpc.insecure_channel(address) as channel:
            with pytest.raises(grpc.RpcError) as failed:
                list(ask_method(channel)(request, timeout=CALL_TIMEOUT))
            return failed.value

    *pieces, last = await trio.to_thread.run_sync(secure)
    assert "".join(p.response for p in pieces) == "echo(1): secure"
    assert last.finish_reason == "stop"
    error = await trio.to_thread.run_sync(plaintext)
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def frame_types(data: bytes) -> list[int]:
    """The types of the HTTP/2 frames in ``data`` (4: SETTINGS, 7: GOAWAY, ...)."""
    types = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3])
        types.append(data[3])
        data = data[9 + length :]
    return types


async def test_idle_connections_get_goaway_at_shutdown(
    serve_stub: Callable[..., Awaitable[StubServer]], make_settings: Callable[..., Settings]
):
    server = await serve_stub(make_settings(SHUTDOWN_GRACE="30"))

    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)  # a client that never calls
        async with stream:
            server.shutdown.set()
            await server.done.wait()  # no waiting for the grace: the connection had no call
            received = b""
            while data := await stream.receive_some(65536):
                received += data
    assert frame_types(received)[-1] == 7  # GOAWAY, then the connection is closed
    await port_closed(server.port)
