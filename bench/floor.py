"""The relay floor: what the required stack costs before EasyBackend does anything.

    python bench/floor.py            # 5 rounds of 200 asks per protocol
    python bench/floor.py --quick    # a smoke run

A bare relay built from the same parts as the server, and nothing else: a
quart-trio app served by hypercorn's trio worker, whose two routes pass the
prompt to the model through EasyBackend's upstream client (the ``openai`` SDK
on the lean transport) and send the answer back, as JSON or as Server-Sent
Events in EasyBackend's format. No validation, storage, token counting,
authentication, logging or metrics.

Its added time to first token at concurrency 1, measured as bench.py measures
the server (same clients, same fake upstream, direct and relay taking turns),
is the part of EasyBackend's figure that comes with quart, hypercorn and the
SDK; the rest is what EasyBackend itself does per ask.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from functools import partial
from pathlib import Path

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402
from easybackend.metrics import Metrics  # noqa: E402
from easybackend.settings import load_settings  # noqa: E402
from easybackend.upstream.openai_client import (  # noqa: E402
    Completion,
    OpenAIUpstream,
    UpstreamCall,
)


def relay_app(upstream: OpenAIUpstream) -> QuartTrio:
    app = QuartTrio(__name__)

    def call(prompt: str) -> UpstreamCall:
        messages = [{"role": "user", "content": prompt}]
        return UpstreamCall(messages=messages, model="m", temperature=1.0, max_tokens=None)

    @app.post("/ask/<conversation_id>")
    async def ask(conversation_id: str) -> Response:
        body = await request.get_json(force=True)
        pieces = [item async for item in upstream.stream(call(body["prompt"]))]
        answer = {"response": "".join(p for p in pieces if isinstance(p, str))}
        return Response(json.dumps(answer), mimetype="application/json")

    @app.post("/ask/<conversation_id>/stream")
    async def ask_stream(conversation_id: str) -> Response:
        body = await request.get_json(force=True)

        async def events():
            async for item in upstream.stream(call(body["prompt"])):
                if isinstance(item, Completion):
                    yield f"event: end\ndata: {json.dumps({'finish_reason': item.finish_reason})}\n\n"
                else:
                    yield f"event: delta\ndata: {json.dumps({'text': item})}\n\n"

        response = Response(events(), mimetype="text/event-stream")
        response.timeout = None
        return response

    return app


class FloorStack(bench.Stack):
    """The fake upstream as a child process, and the bare relay in this process on ``self.http``."""

    async def start_relay(self, nursery: trio.Nursery, stop: trio.Event) -> None:
        settings = load_settings(
            environ={"OPENAI_API_KEY": "bench-key", "OPENAI_BASE_URL": self.upstream_url},
            env_file=None,
        )
        upstream = OpenAIUpstream(settings, Metrics())
        config = Config()
        config.bind = [f"127.0.0.1:{self.http}"]
        config.accesslog = config.errorlog = None
        await nursery.start(partial(serve, relay_app(upstream), config, shutdown_trigger=stop.wait))


async def main(args: argparse.Namespace) -> list[dict[str, object]]:
    samples = 20 if args.quick else 200
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        stack = FloorStack(Path(tmp))
        try:
            await stack.start_upstream()
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                await stack.start_relay(nursery, stop)
                for protocol in (bench.HttpWhole, bench.Sse):
                    row = await bench.ttft(stack, protocol, 1, samples, bench.UNPACED, rounds=5)
                    row["protocol"] = f"{row['protocol']} (bare relay)"
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                stop.set()
        finally:
            stack.stop()
    return rows


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    trio.run(main, parser.parse_args())


if __name__ == "__main__":
    cli()
