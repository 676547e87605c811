"""A fake OpenAI-compatible chat-completions server for tests, benchmarks and ``--demo``.

It is a real HTTP server (hypercorn's trio worker serving a small raw ASGI app), so it can
run inside any trio nursery (:meth:`FakeUpstream.serve`) or standalone::

    python -m easybackend.fake_upstream --host 127.0.0.1 --port 8001 [--token-delay 0.01]

which prints ``fake upstream listening on http://HOST:PORT/v1`` once it accepts connections.

Endpoints
    ``POST /v1/chat/completions``  OpenAI wire format, streaming (SSE) or not.
    ``GET /v1/models``             lists the configured model.
    ``GET /_fake/requests``        every completion request received: ``{id, headers, body, fault}``.
    ``GET /_fake/events``          lifecycle events: ``{id, event, chunks, time}``.
    ``POST /_fake/reset``          clears requests, events and queued faults.
    ``POST /_fake/faults``         JSON list of fault objects, queued FIFO; each completion
                                   request that passes auth and validation pops one.
    anything else                  404 with an OpenAI-style error body.
With an ``api_key``, ``/v1/*`` needs ``Authorization: Bearer <key>`` (else 401, key not echoed).

The answer reveals what was received: ``f"echo({len(messages)}): {last_user_text}"``, where
``last_user_text`` is the content of the last ``user`` message, verbatim. It is split into
"tokens" with ``re.findall(r"\\s*\\S+|\\s+", answer)`` (joining them gives the answer back);
``max_tokens``/``max_completion_tokens`` below the token count cuts it (finish_reason
``"length"``). Streaming sends a role chunk, one ``chat.completion.chunk`` per token (token i
is due i token delays after the start, as from a model generating at a steady rate), a finish
chunk, a usage chunk if ``stream_options.include_usage``, then ``data: [DONE]``. Usage: ``prompt_tokens`` = sum over messages of (words + 4),
``completion_tokens`` = tokens sent.

Faults, queued or inline in the last user message as ``[[fake:key=value]]`` (inline wins per
key; directives are removed from the echoed text, and a text that had any is then stripped):
    ``status=500``          answer with that HTTP status and an OpenAI-style error body.
    ``retry_after=2``       with ``status``: send a ``Retry-After`` header.
    ``disconnect_after=3``  send 3 tokens, then drop the connection mid-body (the ASGI app
                            returns without finishing the response, so hypercorn closes the
                            socket before the terminating chunk: the client sees a broken stream;
                            non-streaming: a body shorter than its Content-Length).
    ``stall_after=2``       send 2 tokens, then send nothing until the client goes away.
    ``delay=0.05``          per-token delay for this request.
    ``tokens=200``          answer exactly 200 tokens: the echo, then ``" t1"``, ``" t2"``, ...
    ``tool_call=get_time``  answer with a call of the function ``get_time`` instead of text
                            (``tool_calls``, finish_reason ``"tool_calls"``): its arguments are
                            ``{"echo": <the answer's text>}``, streamed in pieces (the tokens).
    ``model=summarizer``    queued only: the fault waits for a request naming that model (the
                            first queued fault a request may take is the one it pops).

Events per completion request: ``started``, then ``stalled`` (if stalling), then exactly one of
``completed``, ``disconnected`` (client went away, noticed even while sleeping or stalled),
``failed`` (error status returned or connection deliberately dropped). ``chunks`` is the number
of content tokens sent so far. ``completed`` is recorded just before the last bytes are sent.
Hypercorn's own messages go to the ``easybackend.fake_upstream`` logger (WARNING by default).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import re
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_log = logging.getLogger(__name__)
if _log.level == logging.NOTSET:
    _log.setLevel(logging.WARNING)

_PIECE = re.compile(r"\s*\S+|\s+")
_WORD = re.compile(r"\S+")
_DIRECTIVE = re.compile(r"\[\[fake:(\w+)=([^\]]*)\]\]")
_ERROR_TYPES = {401: "invalid_api_key", 404: "model_not_found", 429: "rate_limit_exceeded"}
_FAULT_KEYS: dict[str, Callable[[Any], Any]] = {
    "status": int,
    "retry_after": float,
    "disconnect_after": int,
    "stall_after": int,
    "delay": float,
    "tokens": int,
    "tool_call": str,
    "model": str,
}


def _parse_fault(raw: Any) -> dict[str, Any]:
    """Validate and convert one fault object; raises ValueError."""
    if not isinstance(raw, dict):
        raise ValueError("a fault must be a JSON object")
    fault: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _FAULT_KEYS:
            raise ValueError(f"unknown fault key {key!r}")
        try:
            fault[key] = _FAULT_KEYS[key](value)
        except (TypeError, ValueError):
            raise ValueError(f"bad value for fault key {key!r}: {value!r}") from None
        if key == "tool_call":
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", fault[key]):
                raise ValueError("tool_call must name a function (A-Z a-z 0-9 _ -, 1-64)")
        elif key == "model":
            if not fault[key]:
                raise ValueError("model must name a model")
        elif fault[key] < 0:
            raise ValueError(f"fault key {key!r} must not be negative")
    if not 400 <= fault.get("status", 400) <= 599:
        raise ValueError("fault status must be within 400..599")
    return fault


def _is_dict(value: Any) -> bool:
    return isinstance(value, dict)


def _text(content: Any) -> str:
    if isinstance(content, list):  # content parts: the text of the text parts
        return "".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return content if isinstance(content, str) else ""


def _error(message: str, type_: str, code: str | None = None) -> Message:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def _start(status: int, *headers: tuple[bytes, bytes]) -> Message:
    return {"type": "http.response.start", "status": status, "headers": list(headers)}


def _body(data: bytes, more: bool = False) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": more}


async def _send_json(send: Send, status: int, obj: Any, *headers: tuple[bytes, bytes]) -> None:
    data = json.dumps(obj).encode()
    length = (b"content-length", b"%d" % len(data))
    await send(_start(status, (b"content-type", b"application/json"), length, *headers))
    await send(_body(data))


@dataclass
class _Reply:
    id: str
    model: str
    pieces: list[str]
    finish: str
    usage: dict[str, int]
    fault: dict[str, Any]
    delay: float
    include_usage: bool
    tool: str | None = None  # answer with a call of this function, its arguments as the pieces
    chunks: int = 0
    final: bool = False  # "completed" was recorded; the last bytes are being sent

    def __post_init__(self) -> None:
        head = (
            f'data: {{"id":"{self.id}","object":"chat.completion.chunk","created":'
            f'{int(time.time())},"model":{json.dumps(self.model)},"system_fingerprint":null,'
            '"choices":[{"index":0,"delta":'
        )
        tail = ',"usage":null}' if self.include_usage else "}"
        self._head, self._tail = head.encode(), f"{tail}\n\n".encode()

    def call_delta(self, index: int, piece: str) -> str:
        """The JSON ``delta`` of piece ``index`` of the tool call's arguments (the first names it)."""
        call: dict[str, Any] = {"index": 0, "function": {"arguments": piece}}
        if index == 0:
            call = {"index": 0, "id": f"call_{self.id}", "type": "function"}
            call["function"] = {"name": self.tool, "arguments": piece}
        return json.dumps({"tool_calls": [call]})

    def chunk(self, delta: str, finish: str = "null") -> bytes:
        """One SSE ``chat.completion.chunk`` event with a pre-encoded JSON ``delta``."""
        end = f',"logprobs":null,"finish_reason":{finish}}}]'
        return b"".join((self._head, delta.encode(), end.encode(), self._tail))


class FakeUpstream:
    """An in-process fake OpenAI chat-completions server; see the module docstring.

    ``requests`` and ``events`` are plain lists, readable (and clearable) directly by tests.
    """

    def __init__(
        self, *, token_delay: float = 0.0, api_key: str | None = None, model: str = "fake-model"
    ) -> None:
        self.token_delay = token_delay
        self.api_key = api_key
        self.model = model
        self.requests: list[dict] = []
        self.events: list[dict] = []
        self.port: int | None = None
        self._host = "127.0.0.1"
        self._faults: deque[dict[str, Any]] = deque()
        self._ids = itertools.count(1)

    def reset(self) -> None:
        """Clear recorded requests and events and the queued faults.

        Synchronous, so never interrupted by cancellation; requests still in flight go on
        appending their later events.
        """
        self.requests.clear()
        self.events.clear()
        self._faults.clear()

    def base_url(self) -> str:
        """The OpenAI ``base_url`` of the running server, e.g. ``http://127.0.0.1:PORT/v1``.

        Raises RuntimeError when not serving, including after :meth:`serve` was cancelled.
        """
        if self.port is None:
            raise RuntimeError("FakeUpstream is not serving")
        host = "127.0.0.1" if self._host in ("", "0.0.0.0", "::") else self._host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/v1"

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on ``host:port`` (0 = any free port) until cancelled.

        Calls ``task_status.started(bound_port)`` once connections are accepted. On
        cancellation the listener and all open connections (including in-flight streams) are
        closed at once, without logging, and ``port`` is reset to None.
        """
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(4096)
            bound = sock.getsockname()[1]
        except BaseException:
            sock.close()
            raise
        config = Config()
        config.bind = [f"fd://{sock.detach()}"]  # hypercorn's socket now owns the descriptor
        config.backlog = 4096
        config.accesslog = None
        config.errorlog = _log
        config.keep_alive_timeout = 75
        self._host = host
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(hypercorn_serve, self._app, config)
                self.port = bound
                task_status.started(bound)
        finally:
            self.port = None

    # -- ASGI ------------------------------------------------------------------------------

    async def _app(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        route = (scope["method"], scope["path"].rstrip("/"))
        if route[1].startswith("/v1") and not self._authorized(headers):
            if route == ("POST", "/v1/chat/completions"):
                self._record(headers, body, "failed")
            message = "Incorrect API key provided: sk-****"
            await _send_json(send, 401, _error(message, "invalid_request_error", "invalid_api_key"))
        elif route == ("POST", "/v1/chat/completions"):
            await self._completion(headers, body, receive, send)
        elif route == ("GET", "/v1/models"):
            model = {"id": self.model, "object": "model", "created": 0}
            model["owned_by"] = "easybackend-fake"
            await _send_json(send, 200, {"object": "list", "data": [model]})
        elif route == ("GET", "/_fake/requests"):
            await _send_json(send, 200, self.requests)
        elif route == ("GET", "/_fake/events"):
            await _send_json(send, 200, self.events)
        elif route == ("POST", "/_fake/reset"):
            self.reset()
            await _send_json(send, 200, {"ok": True})
        elif route == ("POST", "/_fake/faults"):
            try:
                raw = json.loads(body)
                faults = [_parse_fault(f) for f in (raw if isinstance(raw, list) else [raw])]
            except ValueError as exc:
                await _send_json(send, 400, _error(str(exc), "invalid_request_error"))
                return
            self._faults.extend(faults)
            await _send_json(send, 200, {"queued": len(self._faults)})
        else:
            error = f"Unknown route: {route[0]} {route[1]}"
            await _send_json(send, 404, _error(error, "invalid_request_error", "unknown_url"))

    def _authorized(self, headers: dict[str, str]) -> bool:
        return self.api_key is None or headers.get("authorization") == f"Bearer {self.api_key}"

    def _event(self, rid: str, event: str, chunks: int = 0) -> None:
        self.events.append({"id": rid, "event": event, "chunks": chunks, "time": time.monotonic()})

    def _record(self, headers: dict[str, str], body: bytes, event: str | None = None) -> dict:
        try:
            parsed: Any = json.loads(body)
        except ValueError:
            parsed = body.decode("utf-8", "replace")
        record = {"id": f"chatcmpl-{next(self._ids)}", "headers": headers, "body": parsed}
        record["fault"] = None
        self.requests.append(record)
        self._event(record["id"], "started")
        if event:
            self._event(record["id"], event)
        return record

    async def _completion(
        self, headers: dict[str, str], raw: bytes, receive: Receive, send: Send
    ) -> None:
        record = self._record(headers, raw)
        rid, body = record["id"], record["body"]
        messages = body.get("messages") if isinstance(body, dict) else None
        try:
            if not isinstance(body, dict):
                raise ValueError("We could not parse the JSON body of your request.")
            if not isinstance(messages, list) or not messages or not all(map(_is_dict, messages)):
                raise ValueError("'messages' must be a non-empty list of message objects.")
            users = [_text(m.get("content")) for m in messages if m.get("role") == "user"]
            last_user = users[-1] if users else ""
            inline = _parse_fault(dict(_DIRECTIVE.findall(last_user)))
        except ValueError as exc:
            self._event(rid, "failed")
            await _send_json(send, 400, _error(str(exc), "invalid_request_error"))
            return
        fault = {**self._pop_fault(body.get("model")), **inline}
        fault.pop("model", None)
        record["fault"] = fault or None
        if "status" in fault:
            self._event(rid, "failed")
            status = fault["status"]
            kind = "server_error" if status >= 500 else "invalid_request_error"
            kind = _ERROR_TYPES.get(status, kind)
            error = _error(f"Injected fault: HTTP {status}", kind, kind)
            retry = fault.get("retry_after")
            extra = [] if retry is None else [(b"retry-after", b"%g" % retry)]
            await _send_json(send, status, error, *extra)
            return
        reply = self._plan(rid, body, messages, last_user, fault)
        outcome = "disconnected"
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                if not reply.final:  # never cancel hypercorn's bookkeeping after the last send
                    nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            try:
                outcome = await (self._stream if body.get("stream") else self._whole)(reply, send)
            except Exception:  # the server refused the send: the client is gone
                outcome = "disconnected"
            nursery.cancel_scope.cancel()
        if not reply.final:
            self._event(rid, outcome, reply.chunks)

    def _pop_fault(self, model: object) -> dict[str, Any]:
        """The first queued fault a request for ``model`` may take (one naming no model, or
        that one), removed from the queue; {} if none."""
        for fault in self._faults:
            if fault.get("model", model) == model:
                self._faults.remove(fault)
                return fault
        return {}

    def _plan(
        self, rid: str, body: dict, messages: list[dict], last_user: str, fault: dict[str, Any]
    ) -> _Reply:
        text = _DIRECTIVE.sub("", last_user)
        text = text.strip() if text != last_user else text
        pieces = _PIECE.findall(f"echo({len(messages)}): {text}")
        tool = fault.get("tool_call")
        if tool is not None:  # the call's arguments, in pieces
            pieces = _PIECE.findall(json.dumps({"echo": f"echo({len(messages)}): {text}"}))
        if "tokens" in fault:
            n = fault["tokens"]
            pieces = (pieces + [f" t{i}" for i in range(1, n - len(pieces) + 1)])[:n]
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        finish = "stop" if tool is None else "tool_calls"
        if isinstance(limit, int) and limit < len(pieces):
            pieces, finish = pieces[: max(limit, 0)], "length"
        prompt = sum(len(_WORD.findall(_text(m.get("content")))) + 4 for m in messages)
        usage = {"prompt_tokens": prompt, "completion_tokens": len(pieces)}
        usage["total_tokens"] = prompt + len(pieces)
        options = body.get("stream_options")
        include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
        model, delay = str(body.get("model") or self.model), fault.get("delay", self.token_delay)
        return _Reply(rid, model, pieces, finish, usage, fault, float(delay), include_usage, tool)

    def _finish(self, reply: _Reply) -> None:
        # Recorded before the last send: the client may act on the end of the response before
        # this task runs again.
        reply.final = True
        self._event(reply.id, "completed", reply.chunks)

    async def _produce(self, reply: _Reply, emit: Callable[[str], Awaitable[None]]) -> bool:
        """Emit the tokens, applying delay/stall/disconnect faults; False = drop the connection.

        Tokens are paced like a model generating at a steady rate: token i (from 1) is due
        i delays after the start, however long sending the earlier ones took, so a streamed
        answer and a whole one are ready at the same moment.
        """
        started = trio.current_time()
        for index, piece in enumerate([*reply.pieces, None]):
            if index == reply.fault.get("stall_after"):
                self._event(reply.id, "stalled", reply.chunks)
                await trio.sleep_forever()
            if index == reply.fault.get("disconnect_after"):
                return False
            if piece is None:
                break
            if reply.delay:
                await trio.sleep_until(started + (index + 1) * reply.delay)
            await emit(piece)
            reply.chunks += 1
        return True

    async def _stream(self, reply: _Reply, send: Send) -> str:
        async def emit_piece(piece: str) -> None:
            await send(_body(reply.chunk('{"content":' + json.dumps(piece) + "}"), more=True))

        async def emit_call_piece(piece: str) -> None:
            await send(_body(reply.chunk(reply.call_delta(reply.chunks, piece)), more=True))

        sse = (b"content-type", b"text/event-stream; charset=utf-8")
        await send(_start(200, sse, (b"cache-control", b"no-cache")))
        role = '{"role":"assistant","content":%s}' % ("null" if reply.tool else '""')
        await send(_body(reply.chunk(role), more=True))
        if not await self._produce(reply, emit_call_piece if reply.tool else emit_piece):
            return "failed"  # returning mid-body makes hypercorn close the connection
        await send(_body(reply.chunk("{}", f'"{reply.finish}"'), more=True))
        if reply.include_usage:
            usage = {"id": reply.id, "object": "chat.completion.chunk", "created": int(time.time())}
            usage |= {"model": reply.model, "choices": [], "usage": reply.usage}
            await send(_body(b"data: %s\n\n" % json.dumps(usage).encode(), more=True))
        self._finish(reply)
        await send(_body(b"data: [DONE]\n\n"))
        return "completed"

    async def _whole(self, reply: _Reply, send: Send) -> str:
        async def nothing(piece: str) -> None:
            pass

        if not await self._produce(reply, nothing):  # promise a body, send part of it, drop
            await send(
                _start(200, (b"content-type", b"application/json"), (b"content-length", b"99"))
            )
            await send(_body(b'{"id":', more=True))
            return "failed"
        message = {"role": "assistant", "content": "".join(reply.pieces), "refusal": None}
        if reply.tool is not None:
            function = {"name": reply.tool, "arguments": message.pop("content")}
            message["content"] = None
            message["tool_calls"] = [
                {"id": f"call_{reply.id}", "type": "function", "function": function}
            ]
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish}
        completion = {"id": reply.id, "object": "chat.completion", "created": int(time.time())}
        completion |= {"model": reply.model, "choices": [choice], "usage": reply.usage}
        self._finish(reply)
        await _send_json(send, 200, completion)
        return "completed"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def main(argv: list[str] | None = None) -> int:
    """Run the fake upstream standalone; Ctrl-C or SIGTERM cancels it and exits with 0."""
    parser = argparse.ArgumentParser(
        prog="python -m easybackend.fake_upstream",
        description=__doc__,
        formatter_class=_HelpFormatter,
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to bind")
    add("--port", type=int, default=8001, help="port to bind; 0 picks a free one")
    add("--token-delay", type=float, default=0.0, metavar="SECONDS", help="delay before each token")
    add("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1 endpoints")
    add("--model", default="fake-model", help="model listed by /v1/models, used when none is named")
    args = parser.parse_args(argv)
    fake = FakeUpstream(token_delay=args.token_delay, api_key=args.api_key, model=args.model)

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(fake.serve, args.host, args.port)
                print(f"fake upstream listening on http://{args.host}:{port}/v1", flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(run)
    except KeyboardInterrupt:  # Ctrl-C before the signal receiver was installed
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
