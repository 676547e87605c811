"""HTTP clients' helpers: the bearer credential, SSE bodies, JSON errors, raw requests."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx2
import trio


def bearer(secret: str | None) -> dict[str, str]:
    """The ``authorization`` header (HTTP) or metadata entry (gRPC) presenting ``secret``.

    None presents nothing; an empty secret is sent as it is (``"Bearer "``).
    """
    return {"authorization": f"Bearer {secret}"} if secret is not None else {}


def sse_frames(text: str) -> list[tuple[int | None, str, dict[str, Any]]]:
    """Split a Server-Sent Events body into (id, event, data) frames; every frame has an event
    and data. In a native answer's body (its frames have ids), every frame but an ``error`` is
    numbered, counting up by one."""
    frames = []
    assert text.endswith("\n\n"), text[-200:]
    for block in text.split("\n\n")[:-1]:
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        assert set(fields) - {"id"} == {"event", "data"}, block
        seq = int(fields["id"]) if "id" in fields else None
        frames.append((seq, fields["event"], json.loads(fields["data"])))
    numbers = [seq for seq, _, _ in frames if seq is not None]
    if numbers:
        assert all((seq is None) == (name == "error") for seq, name, _ in frames), frames
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers
    return frames


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """An answer's SSE body as (event, data) pairs after its ``start`` frame (checked: the
    first, id 1, naming the turn the ``end`` names)."""
    frames = sse_frames(text)
    if frames and frames[0][1] == "start":
        seq, _, start = frames.pop(0)
        assert seq == 1 and set(start) == {"conversation_id", "turn_id"}, start
        ends = [data for _, name, data in frames if name == "end"]
        assert all(end["turn_id"] == start["turn_id"] for end in ends), (start, ends)
    return [(name, data) for _, name, data in frames]


def error_code(response: httpx2.Response) -> str:
    """The ``code`` of a JSON error response, checking its shape."""
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return body["error"]["code"]


async def raw_request(port: int, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send one HTTP/1.1 request exactly as written (no URL normalisation); returns (status, body)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        request = (
            f"{head} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        await stream.send_all(request)
        data = b""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some()
                assert chunk, f"connection closed before a whole response: {data!r}"
                data += chunk
            head_bytes, _, content = data.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head_bytes)
            assert length, head_bytes
            while len(content) < int(length[1]):
                chunk = await stream.receive_some()
                assert chunk, "connection closed before the whole body arrived"
                content += chunk
    return int(head_bytes.split(b"\r\n")[0].split()[1]), content


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
