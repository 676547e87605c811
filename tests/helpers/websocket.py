"""WebSocket clients: the original text protocol and the JSON protocol.

Every read is bounded: a helper fails the test rather than wait for ever.
"""

from __future__ import annotations

import json
from typing import Any

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

CALL_TIMEOUT = 15.0
END = "<|end|>"
ERR = "<|err|>"


def ws_url(port: int, query: str = "") -> str:
    return f"ws://127.0.0.1:{port}{query}"


async def original_frames(ws: WebSocketConnection, timeout: float = 10) -> list[str]:
    """The frames of one answer in the original protocol, up to and including ``<|end|>`` or
    an ``<|err|>`` frame."""
    frames = []
    with trio.fail_after(timeout):
        while True:
            frames.append(await ws.get_message())
            if frames[-1] == END or frames[-1].startswith(ERR):
                return frames


async def original_pieces(ws: WebSocketConnection, timeout: float = 10) -> list[str]:
    """The pieces of one answer in the original protocol (its ``<|end|>`` not included);
    fails the test on an ``<|err|>`` frame."""
    *pieces, last = await original_frames(ws, timeout)
    assert last == END, [*pieces, last]
    return pieces


async def ws_original_ask(port: int, conversation_id: str, prompt: str) -> list[str]:
    """One original-protocol ask on a new socket: the frames up to and including ``<|end|>``
    or ``<|err|>``."""
    with trio.fail_after(CALL_TIMEOUT):
        async with open_websocket_url(ws_url(port)) as ws:
            await ws.send_message(f"<|ask|>${conversation_id}${prompt}")
            return await original_frames(ws, CALL_TIMEOUT)


async def ws_json_ask(
    port: int, payload: dict[str, Any], *, api_key: str | None = None
) -> list[dict[str, Any]]:
    """Send one JSON ask on a new socket; the replies up to and including its end or error."""
    replies = []
    headers = [(b"Authorization", f"Bearer {api_key}".encode())] if api_key else None
    with trio.fail_after(CALL_TIMEOUT):
        async with open_websocket_url(ws_url(port), extra_headers=headers) as ws:
            await ws.send_message(json.dumps({"type": "ask", **payload}))
            while True:
                reply = json.loads(await ws.get_message())
                replies.append(reply)
                if reply["type"] in ("end", "error"):
                    return replies
