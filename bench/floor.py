"""The relay floor: what the required stack costs before EasyBackend does anything.

    python bench/floor.py            # 5 rounds of 200 asks per protocol
    python bench/floor.py --quick    # a smoke run

Bare relays built from the same parts as the server, and nothing else, each
passing the prompt to the model through EasyBackend's upstream client (the
``openai`` SDK on the lean transport) and sending the answer back in
EasyBackend's format:

- HTTP and SSE: a quart-trio app served by hypercorn's trio worker, with the
  two ask routes (whole answer as JSON, Server-Sent Events);
- WebSocket: trio-websocket's server, one ``ask`` message in, ``delta``
  messages and an ``end`` message out;
- gRPC: purerpc's own ``Server`` (which listens on every interface) with the
  ``chat.Chat`` service's ``Ask``.

No validation, storage, token counting, authentication, logging or metrics.

Their added time to first token at concurrency 1, measured as bench.py measures
the server (same clients, same fake upstream, direct and relay taking turns),
is the part of EasyBackend's figure that comes with these libraries; the rest
is what EasyBackend itself does per ask.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import purerpc
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402
from easybackend.metrics import Metrics  # noqa: E402
from easybackend.proto_gen import chat_grpc, chat_pb2  # noqa: E402
from easybackend.settings import load_settings  # noqa: E402
from easybackend.upstream.openai_client import (  # noqa: E402
    Answering,
    Completion,
    OpenAIUpstream,
    UpstreamCall,
)


def call(prompt: str) -> UpstreamCall:
    messages = [{"role": "user", "content": prompt}]
    return UpstreamCall(messages=messages, model="m", temperature=1.0, max_tokens=None)


async def answer_of(upstream: OpenAIUpstream, prompt: str) -> AsyncIterator[str | Completion]:
    """The upstream's pieces and its Completion (what upstream it is, the relay does not say)."""
    async for item in upstream.stream(call(prompt)):
        if not isinstance(item, Answering):
            yield item


def relay_app(upstream: OpenAIUpstream) -> QuartTrio:
    app = QuartTrio(__name__)

    @app.post("/ask/<conversation_id>")
    async def ask(conversation_id: str) -> Response:
        body = await request.get_json(force=True)
        pieces = [item async for item in answer_of(upstream, body["prompt"])]
        answer = {"response": "".join(p for p in pieces if isinstance(p, str))}
        return Response(json.dumps(answer), mimetype="application/json")

    @app.post("/ask/<conversation_id>/stream")
    async def ask_stream(conversation_id: str) -> Response:
        body = await request.get_json(force=True)

        async def events():
            async for item in answer_of(upstream, body["prompt"]):
                if isinstance(item, Completion):
                    yield f"event: end\ndata: {json.dumps({'finish_reason': item.finish_reason})}\n\n"
                else:
                    yield f"event: delta\ndata: {json.dumps({'text': item})}\n\n"

        response = Response(events(), mimetype="text/event-stream")
        response.timeout = None
        return response

    return app


async def serve_ws_relay(upstream: OpenAIUpstream, port: int) -> None:
    async def handle(request: WebSocketRequest) -> None:
        ws = await request.accept()
        with contextlib.suppress(ConnectionClosed):  # the client is done
            while True:
                ask = json.loads(await ws.get_message())
                async for item in answer_of(upstream, ask["prompt"]):
                    if isinstance(item, Completion):
                        end = {"type": "end", "finish_reason": item.finish_reason}
                        await ws.send_message(json.dumps(end))
                    else:
                        await ws.send_message(json.dumps({"type": "delta", "text": item}))

    await serve_websocket(handle, "127.0.0.1", port, None)


class GrpcRelay(chat_grpc.ChatServicer):
    def __init__(self, upstream: OpenAIUpstream) -> None:
        self.upstream = upstream

    async def Ask(self, message: chat_pb2.AskRequest):  # noqa: N802
        async for item in answer_of(self.upstream, message.prompt):
            if isinstance(item, Completion):
                yield chat_pb2.AskResponse(finish_reason=item.finish_reason)
            else:
                yield chat_pb2.AskResponse(response=item)


class FloorStack(bench.Stack):
    """The fake upstream and the bare relays as child processes, the relays on the stack's
    HTTP, WebSocket and gRPC ports: a process of their own, as the server has, so that the
    client's messages cross between processes as often on the relay as on the server."""

    async def start_relays(self) -> None:
        command = [
            sys.executable, __file__, "--serve-relays", self.upstream_url,
            str(self.http), str(self.ws), str(self.grpc),
        ]  # fmt: skip
        self.processes.append(subprocess.Popen(command, cwd=bench.ROOT))  # noqa: ASYNC220
        for port in (self.http, self.ws, self.grpc):
            await bench.wait_for_port(port)


async def serve_relays(upstream_url: str, http: int, ws: int, grpc: int) -> None:
    """Run the three relays until cancelled (the benchmark terminates this process)."""
    logging.getLogger("purerpc.server").setLevel(logging.ERROR)  # a client closing is no news
    settings = load_settings(
        environ={"OPENAI_API_KEY": "bench-key", "OPENAI_BASE_URL": upstream_url}, env_file=None
    )
    upstream = OpenAIUpstream(settings, Metrics())
    config = Config()
    config.bind = [f"127.0.0.1:{http}"]
    config.accesslog = config.errorlog = None
    grpc_server = purerpc.Server(grpc)
    grpc_server.add_service(GrpcRelay(upstream).service)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(serve, relay_app(upstream), config))
        nursery.start_soon(serve_ws_relay, upstream, ws)
        nursery.start_soon(grpc_server.serve_async)


async def main(args: argparse.Namespace) -> list[dict[str, object]]:
    samples = 20 if args.quick else 200
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        stack = FloorStack(Path(tmp))
        try:
            await stack.start_upstream()
            await stack.start_relays()
            for protocol in (bench.HttpWhole, bench.Sse, bench.WebSocket, bench.Grpc):
                row = await bench.ttft(stack, protocol, 1, samples, bench.UNPACED, rounds=5)
                row["protocol"] = f"{row['protocol']} (bare relay)"
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            stack.stop()
    return rows


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument(
        "--serve-relays",
        nargs=4,
        metavar=("UPSTREAM_URL", "HTTP_PORT", "WS_PORT", "GRPC_PORT"),
        help="only run the relays (the benchmark starts this process itself)",
    )
    args = parser.parse_args()
    if args.serve_relays:
        url, *ports = args.serve_relays
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(serve_relays, url, *map(int, ports))
    else:
        trio.run(main, args)


if __name__ == "__main__":
    cli()
