"""gRPC clients: purerpc (``rpc``, any chat.Chat method, and health) and grpcio (``grpc_ask``,
whose call objects expose the initial metadata that carries the request id).

Every call is bounded: purerpc's by a trio deadline, grpcio's by its own gRPC
timeout (a blocking call, run in a worker thread).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Mapping
from typing import Any

import grpc
import purerpc
import trio

from easybackend.proto_gen import chat_grpc, chat_pb2, health_grpc, health_pb2

from .servers import Server

CALL_TIMEOUT = 15.0


def _port(server: Server | int) -> int:
    return server if isinstance(server, int) else server.running.grpc_port


# -- purerpc ------------------------------------------------------------------------------------


async def rpc(
    server: Server | int, method: str, request: Any, *, metadata: Mapping[str, str] | None = None
) -> Any:
    """Call ``chat.Chat/<method>`` with purerpc; Ask's answer is the list of its messages.

    ``metadata`` is sent as it is (e.g. ``bearer(secret)``).
    """
    sent = list(metadata.items()) if metadata else None
    with trio.fail_after(CALL_TIMEOUT):
        async with purerpc.insecure_channel("127.0.0.1", _port(server)) as channel:
            stub = getattr(chat_grpc.ChatStub(channel), method)
            if method == "Ask":
                return [reply async for reply in stub(request, metadata=sent)]
            return await stub(request, metadata=sent)


async def expect_rpc_failure(call: Awaitable[Any]) -> purerpc.RpcFailedError:
    """Await ``call`` expecting it to fail; returns the error, unwrapped from the exception
    groups purerpc's channel raises it in."""
    try:
        result = await call
    except purerpc.RpcFailedError as exc:
        return exc
    except BaseExceptionGroup as group:
        failed, rest = group.split(purerpc.RpcFailedError)
        assert failed is not None and rest is None, repr(group)
        while isinstance(failed, BaseExceptionGroup):
            [failed] = failed.exceptions
        return failed
    raise AssertionError(f"the call succeeded: {result!r}")


async def rpc_error(
    server: Server | int,
    method: str,
    request: Any,
    *,
    metadata: Mapping[str, str] | None = None,
) -> purerpc.RpcFailedError:
    """Like :func:`rpc`, expecting the call to fail; returns the error."""
    return await expect_rpc_failure(rpc(server, method, request, metadata=metadata))


def status_of(error: purerpc.RpcFailedError) -> tuple[purerpc.StatusCode, str]:
    return error.status.status_code, error.status.status_message


async def ask(server: Server | int, conversation_id: str, prompt: str, **fields: Any) -> str:
    """Ask over gRPC with purerpc; returns the whole answer (which must have finished)."""
    request = chat_pb2.AskRequest(conversation_id=conversation_id, prompt=prompt, **fields)
    *pieces, last = await rpc(server, "Ask", request)
    assert last.finish_reason, last
    return "".join(piece.response for piece in pieces)


async def grpc_health(port: int, service: str = "") -> int:
    """``grpc.health.v1.Health/Check`` with purerpc; returns the status."""
    with trio.fail_after(10):
        async with purerpc.insecure_channel("127.0.0.1", port) as channel:
            stub = health_grpc.HealthStub(channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
    return reply.status


# -- grpcio -------------------------------------------------------------------------------------


@dataclasses.dataclass
class GrpcResult:
    replies: list[chat_pb2.AskResponse]
    metadata: dict[str, str]  # the initial metadata
    code: grpc.StatusCode
    details: str
    trailing: dict[str, str] = dataclasses.field(default_factory=dict)  # the trailing metadata

    @property
    def text(self) -> str:
        return "".join(reply.response for reply in self.replies)


def grpc_ask_blocking(
    port: int,
    conversation_id: str,
    prompt: str,
    *,
    request_id: str | None = None,
    api_key: str | None = None,
    sink: list[chat_pb2.AskResponse] | None = None,
    timeout: float = CALL_TIMEOUT,
) -> GrpcResult:
    """One ``chat.Chat/Ask`` call with grpcio (blocking: run it in a thread).

    Replies are appended to ``sink`` as they arrive, so that a caller can
    watch an answer in progress.
    """
    replies = sink if sink is not None else []
    metadata = [("x-request-id", request_id)] if request_id is not None else []
    if api_key is not None:
        metadata.append(("authorization", f"Bearer {api_key}"))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        ask = channel.unary_stream(
            "/chat.Chat/Ask",
            request_serializer=chat_pb2.AskRequest.SerializeToString,
            response_deserializer=chat_pb2.AskResponse.FromString,
        )
        call = ask(
            chat_pb2.AskRequest(conversation_id=conversation_id, prompt=prompt),
            metadata=metadata,
            timeout=timeout,
        )
        try:
            for reply in call:
                replies.append(reply)
        except grpc.RpcError:
            pass
        return GrpcResult(
            replies=replies,
            metadata=dict(call.initial_metadata() or ()),
            code=call.code(),
            details=call.details() or "",
            trailing=dict(call.trailing_metadata() or ()),
        )


async def grpc_ask(port: int, conversation_id: str, prompt: str, **options: Any) -> GrpcResult:
    """:func:`grpc_ask_blocking` in a worker thread."""
    with trio.fail_after(CALL_TIMEOUT + 5):
        return await trio.to_thread.run_sync(
            lambda: grpc_ask_blocking(port, conversation_id, prompt, **options)
        )
