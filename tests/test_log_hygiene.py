"""Prompts and keys stay out of the logs at INFO, on every protocol, also when asks fail.

conftest.py watches the log records of the whole run for keys (every test key contains
SECRET) and for prompts containing PROMPT-SENTINEL; this module makes sure such prompts are
sent over every protocol, successfully and not, while the log level is INFO.
"""

from __future__ import annotations

import logging

import purerpc
import trio
from helpers.logs import LOG_WATCH
from helpers.servers import free_port
from helpers.websocket import original_frames
from trio_websocket import open_websocket_url

from easybackend.proto_gen import chat_grpc, chat_pb2

KEY = "hygiene-SECRET-4242"
PROMPTS = [
    "PROMPT-SENTINEL ordinary",
    "PROMPT-SENTINEL [[fake:status=500]]",
    "PROMPT-SENTINEL [[fake:disconnect_after=2]]",
    "PROMPT-SENTINEL [[fake:status=429]]",
]


async def test_no_prompt_or_key_is_logged_at_info(start_server, caplog):
    caplog.set_level(logging.INFO)
    server = await start_server(
        API_KEYS=f"hygiene:{KEY}", WS_PORT=str(free_port()), GRPC_PORT=str(free_port())
    )
    leaks_before = len(LOG_WATCH.leaks)
    async with server.client(headers={"Authorization": f"Bearer {KEY}"}) as client:
        for prompt in PROMPTS:
            await client.post("/ask/hyg-http", json={"prompt": prompt})
            await client.post("/ask/hyg-http/stream", json={"prompt": prompt})
        await client.post("/ask/hyg-http", json={"prompt": "PROMPT-SENTINEL", "temperature": 7})
    async with server.client(headers={"Authorization": "Bearer wrong-SECRET-key"}) as client:
        await client.post("/ask/hyg-http", json={"prompt": "PROMPT-SENTINEL unauthenticated"})
    async with open_websocket_url(f"ws://127.0.0.1:{server.running.ws_port}/?api_key={KEY}") as ws:
        for prompt in PROMPTS:
            await ws.send_message(f"<|ask|>$hyg-ws${prompt}")
            await original_frames(ws)
    metadata = [("authorization", f"Bearer {KEY}")]
    for prompt in PROMPTS:
        with trio.fail_after(10):
            async with purerpc.insecure_channel("127.0.0.1", server.running.grpc_port) as channel:
                stub = chat_grpc.ChatStub(channel)
                request = chat_pb2.AskRequest(conversation_id="hyg-grpc", prompt=prompt)
                try:
                    async for _ in stub.Ask(request, metadata=metadata):
                        pass
                except purerpc.RpcFailedError:
                    pass
    assert len(server.fake.requests) >= 3 * len(PROMPTS)  # the prompts did travel
    assert caplog.records  # the server did log at INFO meanwhile
    leaks = [
        r.getMessage()
        for r in caplog.records
        if "SECRET" in r.getMessage() or "PROMPT-SENTINEL" in r.getMessage()
    ]
    assert not leaks
    assert len(LOG_WATCH.leaks) == leaks_before
