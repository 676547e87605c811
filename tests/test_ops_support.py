"""Helpers shared by the operations tests (``test_ops_*.py``); this module holds no tests.

Metrics are read from ``/metrics`` with prometheus-client's own parser, access
lines are caught on the ``easybackend.access`` logger, faults are queued on
the fake upstream through its ``/_fake/faults`` endpoint, and gRPC calls go
through grpcio (in a thread), whose call objects expose the initial metadata
that carries the request id.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator
from typing import Any

import grpc
import httpx2
import purerpc
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import open_websocket_url

from easybackend.fake_upstream import FakeUpstream
from easybackend.proto_gen import chat_pb2, health_grpc, health_pb2

ACCESS_FIELDS = {
    "request_id",
    "protocol",
    "conversation_id",
    "key",
    "outcome",
    "ttft_ms",
    "duration_ms",
    "prompt_tokens",
    "completion_tokens",
}
CALL_TIMEOUT = 15.0


# -- the fake upstream --------------------------------------------------------------------------


async def queue_faults(fake: FakeUpstream, *faults: dict[str, Any]) -> None:
    """Queue faults on the fake (FIFO, one per completion request), through its HTTP endpoint."""
    async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{fake.port}", timeout=5) as client:
        response = await client.post("/_fake/faults", json=list(faults))
    assert response.status_code == 200, response.text


def started_times(fake: FakeUpstream) -> list[float]:
    return [event["time"] for event in fake.events if event["event"] == "started"]


# -- metrics ------------------------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    """The value of the sample ``name`` with exactly ``labels`` (0 when it is not exported yet)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


async def scrape(client: httpx2.AsyncClient) -> str:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain"), response.headers
    return response.text


# -- access lines -------------------------------------------------------------------------------


class _Catch(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclasses.dataclass
class AccessLines:
    handler: _Catch

    @property
    def records(self) -> list[logging.LogRecord]:
        return list(self.handler.records)

    @property
    def lines(self) -> list[dict[str, Any]]:
        """The structured fields of every access line so far."""
        return [record.access for record in self.handler.records]  # type: ignore[attr-defined]

    def by_request_id(self, request_id: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["request_id"] == request_id]

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Wait until at least ``count`` access lines were written; returns them all."""
        with trio.fail_after(timeout):
            while len(self.handler.records) < count:
                await trio.sleep(0.005)
        return self.lines


@contextlib.contextmanager
def capture_access() -> Iterator[AccessLines]:
    """Catch the access lines (logger ``easybackend.access``) written inside the block."""
    handler = _Catch()
    logger = logging.getLogger("easybackend.access")
    logger.addHandler(handler)
    try:
        yield AccessLines(handler)
    finally:
        logger.removeHandler(handler)


def check_access_line(line: dict[str, Any]) -> None:
    """Every field is there, with the right kind of value."""
    assert set(line) == ACCESS_FIELDS, line
    assert isinstance(line["request_id"], str) and line["request_id"], line
    assert line["protocol"] in ("http", "sse", "ws", "grpc"), line
    assert isinstance(line["duration_ms"], int | float) and line["duration_ms"] >= 0, line
    assert line["ttft_ms"] is None or 0 <= line["ttft_ms"] <= line["duration_ms"], line
    assert isinstance(line["prompt_tokens"], int) and isinstance(line["completion_tokens"], int)


# -- gRPC ---------------------------------------------------------------------------------------


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
    with trio.fail_after(CALL_TIMEOUT + 5):
        return await trio.to_thread.run_sync(
            lambda: grpc_ask_blocking(port, conversation_id, prompt, **options)
        )


async def grpc_health(port: int, service: str = "") -> int:
    """``grpc.health.v1.Health/Check`` with purerpc; returns the status."""
    with trio.fail_after(10):
        async with purerpc.insecure_channel("127.0.0.1", port) as channel:
            stub = health_grpc.HealthStub(channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
    return reply.status


# -- WebSocket ----------------------------------------------------------------------------------


async def ws_json_ask(
    port: int, payload: dict[str, Any], *, api_key: str | None = None
) -> list[dict[str, Any]]:
    """Send one JSON ask on a new socket; the replies up to and including its end or error."""
    replies = []
    headers = [(b"Authorization", f"Bearer {api_key}".encode())] if api_key else None
    with trio.fail_after(CALL_TIMEOUT):
        async with open_websocket_url(f"ws://127.0.0.1:{port}", extra_headers=headers) as ws:
            await ws.send_message(json.dumps({"type": "ask", **payload}))
            while True:
                reply = json.loads(await ws.get_message())
                replies.append(reply)
                if reply["type"] in ("end", "error"):
                    return replies


async def sse_leave_after_first_piece(client: httpx2.AsyncClient, conversation_id: str) -> None:
    """Ask for a long streamed answer and go away once its first piece has arrived."""
    prompt = "[[fake:tokens=500]] [[fake:delay=0.01]]"
    with trio.fail_after(5):
        async with client.stream(
            "POST", f"/ask/{conversation_id}/stream", json={"prompt": prompt}
        ) as response:
            async for line in response.aiter_lines():
                if line.startswith("event: delta"):
                    return


async def ws_original_ask(port: int, conversation_id: str, prompt: str) -> list[str]:
    """The original text protocol: the frames up to and including ``<|end|>`` or ``<|err|>``."""
    frames = []
    with trio.fail_after(CALL_TIMEOUT):
        async with open_websocket_url(f"ws://127.0.0.1:{port}") as ws:
            await ws.send_message(f"<|ask|>${conversation_id}${prompt}")
            while True:
                frames.append(await ws.get_message())
                if frames[-1] == "<|end|>" or frames[-1].startswith("<|err|>$"):
                    return frames
