"""gRPC clients: purerpc (``rpc``, any chat.Chat method, and health) and grpcio (``grpc_ask``,
whose call objects expose the initial metadata that carries the request id; ``grpcio_call``,
any chat.Chat method), the management messages in the HTTP API's JSON form (``as_json``), and
protos compiled for grpcio at test time (``compile_for_grpcio``: the original's).

Every call is bounded: purerpc's by a trio deadline, grpcio's by its own gRPC
timeout (a blocking call, run in a worker thread).
"""

from __future__ import annotations

import dataclasses
import importlib
import shutil
import sys
from collections.abc import Awaitable, Mapping
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any
from unittest import mock

import grpc
import purerpc
import trio
from google.protobuf import descriptor_pool, json_format
from grpc_tools import protoc

from easybackend.proto_gen import chat_grpc, chat_pb2, health_grpc, health_pb2

from .servers import Server

CALL_TIMEOUT = 15.0
STREAMED = {"Ask", "Regenerate", "Resume"}  # the chat.Chat methods that stream their answer


def _port(server: Server | int) -> int:
    return server if isinstance(server, int) else server.running.grpc_port


# -- purerpc ------------------------------------------------------------------------------------


async def rpc(
    server: Server | int, method: str, request: Any, *, metadata: Mapping[str, str] | None = None
) -> Any:
    """Call ``chat.Chat/<method>`` with purerpc; a streamed answer (Ask, Regenerate) is the
    list of its messages.

    ``metadata`` is sent as it is (e.g. ``bearer(secret)``).
    """
    sent = list(metadata.items()) if metadata else None
    with trio.fail_after(CALL_TIMEOUT):
        async with purerpc.insecure_channel("127.0.0.1", _port(server)) as channel:
            stub = getattr(chat_grpc.ChatStub(channel), method)
            if method in STREAMED:
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


# A conversation's settings, as the HTTP API names them (null there: unset in the message).
SETTINGS = ("model", "temperature", "max_context_tokens", "memory", "system", "title", "expires_in")


def as_json(message: Any, *, tree: bool = False) -> dict[str, Any]:
    """A management message in the HTTP API's JSON form.

    Where HTTP has null, the message has an unset field (system prompt, head,
    a first turn's parent) or an empty next cursor. Without ``tree`` (HTTP's
    path view has no ``tree`` key) the message's ``tree`` must be empty and is
    left out.
    """
    body = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    if "next_cursor" in body:
        body["next_cursor"] = body["next_cursor"] or None
    for item in [body, *body.get("conversations", [])]:
        if "conversation_id" in item and "stored_turns" in item:  # a conversation
            item.setdefault("system_prompt", None)
            item.setdefault("head", None)
            item.setdefault("title", None)
            item["settings"] = {name: item.get("settings", {}).get(name) for name in SETTINGS}
        for turn in [*item.get("history", []), *item.get("tree", [])]:
            turn.setdefault("parent_id", None)
            turn.setdefault("upstream", None)
    if "history" in body and not tree:
        assert body.pop("tree") == [], "a tree in the path view"
    return body


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


def grpcio_stream_blocking(
    port: int,
    method: str,
    request: Any,
    *,
    request_id: str | None = None,
    api_key: str | None = None,
    sink: list[chat_pb2.AskResponse] | None = None,
    cancel_after: int | None = None,
    timeout: float = CALL_TIMEOUT,
) -> GrpcResult:
    """One streamed ``chat.Chat/<method>`` call (Ask, Regenerate) with grpcio (blocking: run it
    in a thread); a failed call is in the result's ``code``, not raised.

    Replies are appended to ``sink`` as they arrive, so that a caller can
    watch an answer in progress. With ``cancel_after``, the call is cancelled
    (reset) once that many replies came.
    """
    replies = sink if sink is not None else []
    metadata = [("x-request-id", request_id)] if request_id is not None else []
    if api_key is not None:
        metadata.append(("authorization", f"Bearer {api_key}"))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stream = channel.unary_stream(
            f"/chat.Chat/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=chat_pb2.AskResponse.FromString,
        )
        call = stream(request, metadata=metadata, timeout=timeout)
        try:
            for reply in call:
                replies.append(reply)
                if len(replies) == cancel_after:
                    call.cancel()
        except grpc.RpcError:
            pass
        return GrpcResult(
            replies=replies,
            metadata=dict(call.initial_metadata() or ()),
            code=call.code(),
            details=call.details() or "",
            trailing=dict(call.trailing_metadata() or ()),
        )


def grpc_ask_blocking(port: int, conversation_id: str, prompt: str, **options: Any) -> GrpcResult:
    """One ``chat.Chat/Ask`` call with grpcio; ``options`` as :func:`grpcio_stream_blocking`'s."""
    request = chat_pb2.AskRequest(conversation_id=conversation_id, prompt=prompt)
    return grpcio_stream_blocking(port, "Ask", request, **options)


async def grpcio_stream(port: int, method: str, request: Any, **options: Any) -> GrpcResult:
    """:func:`grpcio_stream_blocking` in a worker thread."""
    with trio.fail_after(CALL_TIMEOUT + 5):
        return await trio.to_thread.run_sync(
            lambda: grpcio_stream_blocking(port, method, request, **options)
        )


async def grpc_ask(port: int, conversation_id: str, prompt: str, **options: Any) -> GrpcResult:
    """:func:`grpc_ask_blocking` in a worker thread."""
    with trio.fail_after(CALL_TIMEOUT + 5):
        return await trio.to_thread.run_sync(
            lambda: grpc_ask_blocking(port, conversation_id, prompt, **options)
        )


def grpcio_call(port: int, method: str, request: Any, response_type: Any) -> Any:
    """One unary ``chat.Chat/<method>`` call with grpcio (blocking: run it in a thread).

    Raises ``grpc.RpcError`` when the call fails.
    """
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(
            f"/chat.Chat/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        return call(request, timeout=CALL_TIMEOUT)


def compile_for_grpcio(proto: Path, out: Path, stem: str) -> SimpleNamespace:
    """Compile ``proto`` for grpcio into ``out`` as ``<stem>.proto`` and import the modules.

    They are loaded into a private descriptor pool: the original declares a
    service named ``chat.Chat`` like ours does (and the health proto the same
    names as ours), and one pool holds one definition of a name.
    """
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(proto, out / f"{stem}.proto")
    args = [
        "protoc",
        f"-I{out}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"{stem}.proto",
    ]
    assert protoc.main(args) == 0, f"protoc failed on {proto}"
    sys.path.insert(0, str(out))
    try:
        pool = descriptor_pool.DescriptorPool()
        with mock.patch.object(descriptor_pool, "Default", return_value=pool):
            pb2: ModuleType = importlib.import_module(f"{stem}_pb2")
            pb2_grpc: ModuleType = importlib.import_module(f"{stem}_pb2_grpc")
    finally:
        sys.path.remove(str(out))
    return SimpleNamespace(pb2=pb2, grpc=pb2_grpc)
