"""Who is calling (SPEC §7): one Caller made by the core, refusals accounted on every protocol.

Every service method takes the caller as a required keyword (no anonymous
default); an ask refused before the core took it (a wrong key, a full
WebSocket queue, a server shutting down) still gets its access line and is
counted under its outcome, on HTTP, SSE, WebSocket and gRPC; WebSocket asks
carry the client's request id from the handshake or the JSON ask.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re

import grpc
import trio
import trio_websocket
from helpers.grpc import CALL_TIMEOUT, grpc_ask
from helpers.logs import capture_access, check_access_line, metric
from helpers.servers import Server, StartServer, free_port, port_closed
from helpers.waiting import wait_until
from helpers.websocket import ws_url

from easybackend.chat import caller as caller_module
from easybackend.chat.service import AskRequest, ChatService
from easybackend.proto_gen import chat_pb2

GENERATED_ID = re.compile(r"[0-9a-f]{16}")
KEYS = "alice:sk-alice-SECRET-0001"
ALICE, WRONG = "sk-alice-SECRET-0001", "sk-wrong-SECRET-0000"
SLOW = "[[fake:tokens=200]] [[fake:delay=0.05]] slow"  # about 10 s, unless cut


def asks_counted(server: Server, protocol: str, outcome: str) -> float:
    text = server.running.service.metrics.render().decode()
    return metric(text, "easybackend_asks_total", protocol=protocol, outcome=outcome)


def grpc_ask_method(channel: grpc.Channel):
    return channel.unary_stream(
        "/chat.Chat/Ask",
        request_serializer=chat_pb2.AskRequest.SerializeToString,
        response_deserializer=chat_pb2.AskResponse.FromString,
    )


# -- the caller is required everywhere -----------------------------------------------------------


def test_no_service_method_has_a_default_caller_or_owner():
    public = [
        getattr(ChatService, name)
        for name in (
            "list_conversations",
            "get_conversation",
            "delete_conversation",
            "rollback",
            "set_system_prompt",
        )
    ]
    for method in public:
        parameters = inspect.signature(method).parameters
        assert "owner" not in parameters, method
        caller = parameters["caller"]
        assert caller.kind is inspect.Parameter.KEYWORD_ONLY, method
        assert caller.default is inspect.Parameter.empty, method
    for method in (ChatService.ask, ChatService.complete):  # they take an AskRequest
        assert list(inspect.signature(method).parameters) == ["self", "request"], method
    fields = {field.name: field for field in dataclasses.fields(AskRequest)}
    assert not {"owner", "request_id", "client", "protocol"} & set(fields)
    assert fields["caller"].kw_only
    assert fields["caller"].default is dataclasses.MISSING
    assert fields["caller"].default_factory is dataclasses.MISSING
    # nothing a handler could forget to set: no context variables behind the caller
    assert not hasattr(caller_module, "CURRENT") and not hasattr(caller_module, "PEER")
    for name, method in inspect.getmembers(ChatService, inspect.isfunction):
        for parameter in inspect.signature(method).parameters.values():
            assert parameter.name != "owner", name


# -- refusals are accounted on every protocol ----------------------------------------------------


async def test_refused_keys_get_an_access_line_and_a_count_on_every_protocol(
    start_server: StartServer,
):
    server = await start_server(API_KEYS=KEYS, WS_PORT=str(free_port()), GRPC_PORT=str(free_port()))
    with capture_access() as access:
        async with server.client() as client:
            wrong = {"Authorization": f"Bearer {WRONG}"}
            response = await client.post(
                "/ask/r-http", json={"prompt": "hi"}, headers={**wrong, "X-Request-Id": "r-1"}
            )
            assert response.status_code == 401
            response = await client.post(
                "/ask/r-sse/stream", json={"prompt": "hi"}, headers={"X-Request-Id": "r-2"}
            )
            assert response.status_code == 401
            # management calls are not asks: refused, but not counted as asks
            assert (await client.get("/conversations", headers=wrong)).status_code == 401
        failed = await grpc_ask(
            server.running.grpc_port, "r-grpc", "hi", api_key=WRONG, request_id="r-3"
        )
        assert failed.code == grpc.StatusCode.UNAUTHENTICATED
        assert failed.trailing["x-request-id"] == "r-3"
        with trio.fail_after(CALL_TIMEOUT):
            try:
                async with trio_websocket.open_websocket_url(
                    ws_url(server.running.ws_port),
                    extra_headers=[(b"Authorization", b"Bearer " + WRONG.encode())],
                ):
                    raise AssertionError("the handshake was accepted")
            except trio_websocket.ConnectionRejected as rejected:
                assert rejected.status_code == 401
        lines = await access.wait_for(4)
    assert len(lines) == 4, lines
    for line in lines:
        check_access_line(line)
        assert line["outcome"] == "unauthenticated" and line["key"] == "-", line
        assert line["ttft_ms"] is None and line["completion_tokens"] == 0, line
    assert [(line["protocol"], line["conversation_id"]) for line in lines] == [
        ("http", "r-http"),
        ("sse", "r-sse"),
        ("grpc", "r-grpc"),
        ("ws", "-"),  # a refused handshake names no conversation
    ]
    assert [line["request_id"] for line in lines[:3]] == ["r-1", "r-2", "r-3"]
    for protocol in ("http", "sse", "grpc", "ws"):
        assert asks_counted(server, protocol, "unauthenticated") == 1, protocol


async def test_a_full_websocket_queue_refuses_with_a_line_and_a_count(start_server: StartServer):
    server = await start_server(API_KEYS=KEYS, WS_PORT=str(free_port()))
    refused: list[dict[str, object]] = []
    with capture_access() as access:
        with trio.fail_after(CALL_TIMEOUT):
            async with trio_websocket.open_websocket_url(
                ws_url(server.running.ws_port),
                extra_headers=[(b"Authorization", b"Bearer " + ALICE.encode())],
            ) as ws:
                first = {"type": "ask", "conversation_id": "q0", "prompt": SLOW, "id": 0}
                await ws.send_message(json.dumps(first))
                assert json.loads(await ws.get_message())["type"] == "start"  # it is running
                for number in range(1, 19):  # 16 fit in the queue, then they are refused
                    ask = {"type": "ask", "conversation_id": f"q{number}", "prompt": "hi"}
                    await ws.send_message(json.dumps({**ask, "id": number}))
                while len(refused) < 2:
                    reply = json.loads(await ws.get_message())
                    if reply["type"] == "error":
                        refused.append(reply)
    assert [reply["code"] for reply in refused] == ["too_many_requests"] * 2
    assert [reply["id"] for reply in refused] == [17, 18]
    lines = [line for line in access.lines if line["outcome"] == "too_many_requests"]
    assert [(line["protocol"], line["conversation_id"], line["key"]) for line in lines] == [
        ("ws", "q17", "alice"),
        ("ws", "q18", "alice"),
    ]
    assert [line["request_id"] for line in lines] == [reply["request_id"] for reply in refused]
    assert asks_counted(server, "ws", "too_many_requests") == 2


async def test_asks_refused_at_shutdown_get_a_line_and_a_count_on_every_protocol(
    start_server: StartServer,
):
    server = await start_server(
        SHUTDOWN_GRACE="10", WS_PORT=str(free_port()), GRPC_PORT=str(free_port())
    )
    fake = server.fake
    with capture_access() as access:
        async with (
            server.client() as busy,
            server.client() as kept_alive,
            trio.open_nursery() as nursery,
        ):
            assert (await kept_alive.get("/healthz")).status_code == 200  # kept open
            nursery.start_soon(lambda: busy.post("/ask/in-flight", json={"prompt": SLOW}))
            async with trio_websocket.open_websocket_url(ws_url(server.running.ws_port)) as ws:
                await ws.send_message(
                    json.dumps({"type": "ask", "conversation_id": "ws-busy", "prompt": SLOW})
                )
                assert json.loads(await ws.get_message())["type"] == "start"

                def grpc_calls() -> grpc.RpcError:
                    with grpc.insecure_channel(f"127.0.0.1:{server.running.grpc_port}") as channel:
                        ask = grpc_ask_method(channel)
                        busy_call = ask(
                            chat_pb2.AskRequest(conversation_id="grpc-busy", prompt=SLOW),
                            timeout=CALL_TIMEOUT,
                        )
                        next(busy_call)  # the connection now stays up through the drain
                        trio.from_thread.run(shut_down)
                        late = ask(
                            chat_pb2.AskRequest(conversation_id="grpc-late", prompt="hi"),
                            metadata=[("x-request-id", "late-grpc")],
                            timeout=CALL_TIMEOUT,
                        )
                        try:
                            list(late)
                        except grpc.RpcError as error:
                            busy_call.cancel()
                            return error
                        raise AssertionError("the late call was answered")

                async def shut_down() -> None:
                    await wait_until(lambda: len(fake.requests) >= 3)
                    server.shutdown.set()
                    await port_closed(server.running.grpc_port)  # the drain has begun

                grpc_refused = await trio.to_thread.run_sync(grpc_calls)
                assert grpc_refused.code() == grpc.StatusCode.UNAVAILABLE
                response = await kept_alive.post(
                    "/ask/http-late", json={"prompt": "hi"}, headers={"X-Request-Id": "late-http"}
                )
                assert response.status_code == 503
                await ws.send_message(
                    json.dumps({"type": "ask", "conversation_id": "ws-late", "prompt": "hi"})
                )
                while (reply := json.loads(await ws.get_message()))["type"] != "error":
                    pass
                assert reply["code"] == "shutting_down"
                nursery.cancel_scope.cancel()
    lines = [line for line in access.lines if line["outcome"] == "shutting_down"]
    by_protocol = {line["protocol"]: line for line in lines}
    assert len(lines) == 3 and set(by_protocol) == {"http", "ws", "grpc"}, lines
    assert by_protocol["http"]["conversation_id"] == "http-late"
    assert by_protocol["http"]["request_id"] == "late-http"
    assert by_protocol["ws"]["conversation_id"] == "ws-late"
    assert by_protocol["ws"]["request_id"] == reply["request_id"]
    assert by_protocol["grpc"]["request_id"] == "late-grpc"  # refused before its message is read
    for protocol in ("http", "ws", "grpc"):
        assert asks_counted(server, protocol, "shutting_down") == 1, protocol
    assert len(fake.requests) == 3  # none of the refused asks reached the model


# -- WebSocket request ids -----------------------------------------------------------------------


async def test_websocket_request_ids_from_the_handshake_or_the_json_ask(
    start_server: StartServer,
):
    server = await start_server(WS_PORT=str(free_port()))
    port = server.running.ws_port

    async def replies_on(ws: trio_websocket.WebSocketConnection, count: int) -> list[dict]:
        ends = []
        while len(ends) < count:
            reply = json.loads(await ws.get_message())
            if reply["type"] in ("end", "error"):
                ends.append(reply)
        return ends

    def ask(conversation_id: str, **fields: object) -> str:
        return json.dumps(
            {"type": "ask", "conversation_id": conversation_id, "prompt": "hi", **fields}
        )

    with capture_access() as access, trio.fail_after(CALL_TIMEOUT):
        headers = [(b"X-Request-Id", b"ws-connection-1")]
        async with trio_websocket.open_websocket_url(ws_url(port), extra_headers=headers) as ws:
            await ws.send_message(ask("h1"))
            await ws.send_message(ask("h2", request_id="ask-own.2"))
            await ws.send_message(ask("h3", request_id="not acceptable!"))
            await ws.send_message(ask("bad id"))
            first, own, replaced, failed = await replies_on(ws, 4)
            await ws.send_message("<|ask|>$h4$hello")
            while (await ws.get_message()) != "<|end|>":
                pass
        async with trio_websocket.open_websocket_url(ws_url(port)) as ws:
            await ws.send_message(ask("n1"))
            await ws.send_message(ask("n2", request_id=7))  # not a string: a new id
            plain, numbered = await replies_on(ws, 2)
        lines = await access.wait_for(7)

    assert first["request_id"] == "ws-connection-1"
    assert own["request_id"] == "ask-own.2"
    assert GENERATED_ID.fullmatch(replaced["request_id"])
    assert failed["type"] == "error" and failed["request_id"] == "ws-connection-1"
    assert GENERATED_ID.fullmatch(plain["request_id"])
    assert GENERATED_ID.fullmatch(numbered["request_id"])
    assert plain["request_id"] != numbered["request_id"]
    ids = {line["conversation_id"]: line["request_id"] for line in lines if line["outcome"] == "ok"}
    assert ids == {
        "h1": "ws-connection-1",
        "h2": "ask-own.2",
        "h3": replaced["request_id"],
        "h4": "ws-connection-1",  # the original protocol uses the handshake's id
        "n1": plain["request_id"],
        "n2": numbered["request_id"],
    }
    assert all("not acceptable" not in str(line) for line in lines)
