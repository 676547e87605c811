"""One conversation continued over HTTP, WebSocket and gRPC: one history, in order."""

from __future__ import annotations

import purerpc
import trio
from helpers.servers import free_port
from helpers.websocket import original_pieces
from trio_websocket import open_websocket_url

from easybackend.proto_gen import chat_grpc, chat_pb2


async def test_one_conversation_across_the_three_protocols(start_server):
    server = await start_server(WS_PORT=str(free_port()), GRPC_PORT=str(free_port()))
    async with server.client() as client:
        reply = await client.post("/ask/shared", json={"prompt": "over http"})
    assert reply.json()["response"] == "echo(1): over http"

    async with open_websocket_url(f"ws://127.0.0.1:{server.running.ws_port}") as ws:
        await ws.send_message("<|ask|>$shared$over websocket")
        pieces = await original_pieces(ws)
    assert "".join(pieces) == "echo(3): over websocket"

    with trio.fail_after(10):
        async with purerpc.insecure_channel("127.0.0.1", server.running.grpc_port) as channel:
            stub = chat_grpc.ChatStub(channel)
            request = chat_pb2.AskRequest(conversation_id="shared", prompt="over grpc")
            replies = [reply async for reply in stub.Ask(request)]
    assert "".join(r.response for r in replies) == "echo(5): over grpc"
    assert replies[-1].finish_reason == "stop"

    messages = [m["content"] for m in server.fake.requests[-1]["body"]["messages"]]
    assert messages == [
        "over http", "echo(1): over http",
        "over websocket", "echo(3): over websocket",
        "over grpc",
    ]  # fmt: skip
    async with server.client() as client:
        history = (await client.get("/conversations/shared")).json()
    assert [turn["messages"][0]["text"] for turn in history["history"]] == [
        "over http", "over websocket", "over grpc",
    ]  # fmt: skip
