"""A chat-completions upstream that streams its whole answer in one chunk: one piece larger than a
client message, which the WebSocket and gRPC transports cut across several messages."""

from __future__ import annotations

import json

import trio


async def serve_one_piece(text: str, *, task_status: trio.TaskStatus[int]) -> None:
    """Answer every streamed chat completion with ``text`` as one content chunk; reports the
    port it listens on (loopback). Runs until cancelled."""

    async def handle(stream: trio.SocketStream) -> None:
        data = b""
        for _ in range(1000):  # requests on this connection
            while b"\r\n\r\n" not in data:
                more = await stream.receive_some()
                if not more:
                    return
                data += more
            head, _, data = data.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            while len(data) < length:
                more = await stream.receive_some()
                if not more:
                    return
                data += more
            data = data[length:]
            await stream.send_all(_reply(text))

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


def _reply(text: str) -> bytes:
    def event(delta: dict[str, object], finish: str | None = None, **extra: object) -> bytes:
        chunk = {
            "id": "c1",
            "object": "chat.completion.chunk",
            "model": "fake-model",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"

    body = (
        event({"role": "assistant"})
        + event({"content": text})
        + event({}, "stop")
        + event({}, usage={"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14})
        + b"data: [DONE]\n\n"
    )
    head = (
        f"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body
