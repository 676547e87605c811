"""A stream that fails unexpectedly after its first event still ends in its protocol's way.

A fault that is not one of the service's errors (a bug, or a store raising something
unforeseen) after the first piece went out: the client of every streamed HTTP answer
(native SSE, the /v1 chat-completions stream in conversation mode, the Responses stream)
gets its protocol's last event with ``internal_error`` / ``server_error`` and a message
that tells nothing of the fault, the traceback is logged once, and the server serves on.
The fault is made by replacing the store's ``append_turn`` in the running server, so it
strikes after the answer streamed, when the turn is stored.
"""

from __future__ import annotations

import json
import logging

import pytest
from helpers.http import sse_frames
from helpers.openai_sdk import async_client

from easybackend.errors import INTERNAL_MESSAGE, InternalError
from easybackend.settings import DEFAULT_MODEL

FAULT = "the-store-broke: internal detail 7f3a"


@pytest.fixture
async def broken(start_server):
    """A server whose store raises an unforeseen error when it stores a turn."""
    server = await start_server()
    store = server.running.service.storage

    async def append_turn(*args, **kwargs):
        raise RuntimeError(FAULT)

    store.append_turn = append_turn
    return server


def _data_events(body: str) -> list[dict]:
    return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]


async def test_native_sse_ends_with_an_internal_error_event(broken, caplog):
    caplog.set_level(logging.ERROR)
    async with broken.client() as client:
        reply = await client.post("/ask/c1/stream", json={"prompt": "hello there"})
        alive = await client.get("/healthz")
    frames = sse_frames(reply.text)
    assert [name for _, name, _ in frames][:2] == ["start", "delta"]
    assert frames[-1] == (None, "error", {"code": InternalError.code, "message": INTERNAL_MESSAGE})
    assert FAULT not in reply.text and alive.status_code == 200
    logged = [r for r in caplog.records if r.exc_info and FAULT in str(r.exc_info[1])]
    assert len(logged) == 1  # once, with its traceback


async def test_chat_completions_stream_ends_with_an_error_object(broken):
    async with broken.client() as client:
        reply = await client.post(
            "/v1/chat/completions",
            json={
                "model": DEFAULT_MODEL,
                "messages": [{"role": "user", "content": "hello there"}],
                "conversation": "c2",
                "stream": True,
            },
        )
    events = _data_events(reply.text)
    assert events[0]["object"] == "chat.completion.chunk"
    assert events[-1]["error"]["message"] == INTERNAL_MESSAGE, events[-1]
    assert "[DONE]" not in reply.text and FAULT not in reply.text


async def test_responses_stream_ends_with_response_failed(broken):
    async with async_client(broken) as client:
        async with client.responses.stream(model=DEFAULT_MODEL, input="hello there") as stream:
            events = [event async for event in stream]
    assert events[0].type == "response.created"
    assert any(event.type == "response.output_text.delta" for event in events)
    last = events[-1]
    assert last.type == "response.failed", [event.type for event in events]
    assert last.response.status == "failed" and last.response.error.code == "server_error"
    assert FAULT not in last.response.error.message
