"""gRPC security, as ``test_security.py`` for HTTP and WebSocket: API keys on every
chat.Chat RPC, per-key conversations, the per-key cap on answers in progress, size
limits, garbage on the socket and hostile conversation ids.

Covered in ``test_grpc.py`` already, so not repeated here: the health check without a
key and an oversized Ask (both with grpcio).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import purerpc
import pytest
import trio
from helpers.grpc import CALL_TIMEOUT, ask, rpc, rpc_error, status_of
from helpers.http import bearer
from helpers.servers import Server, StartServer, free_port

import easybackend.transports.grpc
from easybackend.proto_gen import chat_grpc, chat_pb2

KEYS = "alice:alice-SECRET-1111,bob:bob-SECRET-2222"
ALICE, BOB = "alice-SECRET-1111", "bob-SECRET-2222"
SLOW = "[[fake:delay=0.05]][[fake:tokens=10]]"  # about half a second per answer


@pytest.fixture
async def keyed(start_server: StartServer) -> Server:
    return await start_server(
        GRPC_PORT=str(free_port()), HTTP_PORT="off", SHUTDOWN_GRACE="2", API_KEYS=KEYS
    )


async def ask_as(server: Server, secret: str, conversation_id: str, prompt: str) -> str:
    request = chat_pb2.AskRequest(conversation_id=conversation_id, prompt=prompt)
    *pieces, last = await rpc(server, "Ask", request, metadata=bearer(secret))
    assert last.finish_reason == "stop"
    return "".join(piece.response for piece in pieces)


async def get_as(server: Server, secret: str, conversation_id: str) -> chat_pb2.Conversation:
    request = chat_pb2.ConversationRequest(conversation_id=conversation_id)
    return await rpc(server, "GetConversation", request, metadata=bearer(secret))


# --------------------------------------------------------------------------- API keys

# Every chat.Chat RPC, in an order in which each succeeds with the right key, its request made
# from the id of the conversation's first turn.
CALLS: list[tuple[str, Callable[[str], Any]]] = [
    ("Ask", lambda turn: chat_pb2.AskRequest(conversation_id="1", prompt="hi")),
    ("Regenerate", lambda turn: chat_pb2.RegenerateRequest(conversation_id="1", turn_id=turn)),
    ("ListConversations", lambda turn: chat_pb2.ListConversationsRequest()),
    ("GetConversation", lambda turn: chat_pb2.ConversationRequest(conversation_id="1")),
    ("SetHead", lambda turn: chat_pb2.SetHeadRequest(conversation_id="1", turn_id=turn)),
    (
        "SetSystemPrompt",
        lambda turn: chat_pb2.SetSystemPromptRequest(conversation_id="1", prompt="evil"),
    ),
    ("Rollback", lambda turn: chat_pb2.RollbackRequest(conversation_id="1", turns=1)),
    ("DeleteTurn", lambda turn: chat_pb2.DeleteTurnRequest(conversation_id="1", turn_id=turn)),
    ("DeleteConversation", lambda turn: chat_pb2.ConversationRequest(conversation_id="1")),
]


@pytest.mark.parametrize(
    "metadata",
    [{}, bearer("wrong-key"), {"authorization": ALICE}, bearer("")],
    ids=["none", "wrong", "no-scheme", "empty"],
)
async def test_without_the_right_key_every_rpc_is_unauthenticated(
    keyed: Server, metadata: dict[str, str]
):
    await ask_as(keyed, ALICE, "1", "alice's turn")
    [turn] = (await get_as(keyed, ALICE, "1")).history
    requests_before = len(keyed.fake.requests)

    for method, make in CALLS:
        error = await rpc_error(keyed, method, make(turn.id), metadata=metadata)
        code, message = status_of(error)
        assert code == purerpc.StatusCode.UNAUTHENTICATED, method
        assert "API key" in message, method
        assert "SECRET" not in message and "wrong-key" not in message, method

    assert len(keyed.fake.requests) == requests_before  # nothing reached the model
    untouched = await get_as(keyed, ALICE, "1")  # the refused calls changed nothing
    assert untouched.turns == untouched.stored_turns == 1
    assert not untouched.HasField("system_prompt") and untouched.head == turn.id


async def test_with_the_right_key_every_rpc_succeeds(keyed: Server):
    results: dict[str, Any] = {}
    first = ""
    for method, make in CALLS:
        results[method] = await rpc(keyed, method, make(first), metadata=bearer(ALICE))
        first = first or results["Ask"][-1].turn_id

    *pieces, last = results["Ask"]
    assert "".join(p.response for p in pieces) == "echo(1): hi" and last.finish_reason == "stop"
    assert results["Regenerate"][-1].finish_reason == "stop"
    assert [c.conversation_id for c in results["ListConversations"].conversations] == ["1"]
    assert results["GetConversation"].turns == 1
    assert results["GetConversation"].stored_turns == 2
    assert results["SetHead"].head == first
    assert results["SetSystemPrompt"].system_prompt == "evil"
    assert (results["Rollback"].removed, results["Rollback"].turns) == (1, 0)
    assert (results["DeleteTurn"].deleted, results["DeleteTurn"].HasField("head")) == (1, False)
    assert results["DeleteConversation"].conversation_id == "1"
    assert len(keyed.fake.requests) == 2


async def test_two_keys_on_one_conversation_id_get_two_conversations(keyed: Server):
    assert await ask_as(keyed, ALICE, "1", "alice speaks") == "echo(1): alice speaks"
    assert await ask_as(keyed, BOB, "1", "bob speaks") == "echo(1): bob speaks"  # not alice's

    alice_view, bob_view = await get_as(keyed, ALICE, "1"), await get_as(keyed, BOB, "1")
    assert [t.messages[0].text for t in alice_view.history] == ["alice speaks"]
    assert [t.messages[0].text for t in bob_view.history] == ["bob speaks"]
    listing = await rpc(
        keyed, "ListConversations", chat_pb2.ListConversationsRequest(), metadata=bearer(BOB)
    )
    assert [c.conversation_id for c in listing.conversations] == ["1"]

    await rpc(
        keyed,
        "DeleteConversation",
        chat_pb2.ConversationRequest(conversation_id="1"),
        metadata=bearer(BOB),
    )
    error = await rpc_error(
        keyed,
        "GetConversation",
        chat_pb2.ConversationRequest(conversation_id="1"),
        metadata=bearer(BOB),
    )
    assert status_of(error)[0] == purerpc.StatusCode.NOT_FOUND
    assert (await get_as(keyed, ALICE, "1")).turns == 1  # bob deleted only his own


# --------------------------------------------------------------------------- limits


async def test_answers_in_progress_per_key_are_capped(start_server: StartServer):
    server = await start_server(
        GRPC_PORT=str(free_port()),
        HTTP_PORT="off",
        SHUTDOWN_GRACE="2",
        API_KEYS=KEYS,
        MAX_STREAMS_PER_KEY="2",
    )
    outcomes: list[tuple[str, str]] = []

    async def one(secret: str, conversation_id: str) -> None:
        request = chat_pb2.AskRequest(conversation_id=conversation_id, prompt=f"{SLOW} x")
        try:
            *_, last = await rpc(server, "Ask", request, metadata=bearer(secret))
            outcomes.append((secret, last.finish_reason))
        except BaseException as exc:  # noqa: B036 (purerpc raises the failure in groups)
            failed, rest = (
                exc.split(purerpc.RpcFailedError)
                if isinstance(exc, BaseExceptionGroup)
                else ((exc, None) if isinstance(exc, purerpc.RpcFailedError) else (None, exc))
            )
            if rest is not None:
                raise
            while isinstance(failed, BaseExceptionGroup):
                [failed] = failed.exceptions
            assert isinstance(failed, purerpc.RpcFailedError)
            code, message = status_of(failed)
            assert code == purerpc.StatusCode.RESOURCE_EXHAUSTED, message
            assert "2 answers in progress" in message
            outcomes.append((secret, "refused"))

    with trio.fail_after(CALL_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(one, ALICE, f"cap-{i}")
            nursery.start_soon(one, BOB, "cap-bob")

    assert sorted(outcomes) == sorted(
        [(ALICE, "stop"), (ALICE, "stop"), (ALICE, "refused"), (ALICE, "refused"), (BOB, "stop")]
    )
    assert len(server.fake.requests) == 3  # the refused asks never reached the model
    assert await ask_as(server, ALICE, "after", "my turn now") == "echo(1): my turn now"


async def test_oversized_management_request_is_resource_exhausted(start_server: StartServer):
    server = await start_server(
        GRPC_PORT=str(free_port()), HTTP_PORT="off", SHUTDOWN_GRACE="2", MAX_BODY_BYTES="4096"
    )
    request = chat_pb2.SetSystemPromptRequest(conversation_id="big", prompt="x" * 5000)

    code, message = status_of(await rpc_error(server, "SetSystemPrompt", request))

    assert code == purerpc.StatusCode.RESOURCE_EXHAUSTED
    assert "4096" in message
    missing = await rpc_error(
        server, "GetConversation", chat_pb2.ConversationRequest(conversation_id="big")
    )
    assert status_of(missing)[0] == purerpc.StatusCode.NOT_FOUND  # nothing was set
    assert await ask(server, "big", "small") == "echo(1): small"  # still serving


# --------------------------------------------------------------------------- garbage


async def closed_after(port: int, data: bytes, *, half_close: bool) -> bytes:
    """Send ``data`` on a plain TCP connection; return what came back before the server
    closed it (failing if it does not within 5 s). ``half_close``: then send EOF."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(data)
            if half_close:
                await stream.send_eof()
            received = b""
            try:
                while chunk := await stream.receive_some(65536):
                    received += chunk
            except trio.BrokenResourceError:  # reset rather than closed: closed all the same
                pass
            return received


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
TRUNCATED_SETTINGS = b"\x00\x00\x06\x04\x00\x00\x00\x00\x00"  # a header; the 6 bytes never come


@pytest.mark.parametrize(
    ("data", "half_close"),
    [
        (random.Random(1234).randbytes(4096), False),
        (b"\x00" * 64, False),
        (PREFACE[:10], True),
        (PREFACE + TRUNCATED_SETTINGS, True),
        (PREFACE + b"\x00" * 9, False),  # an empty DATA frame where SETTINGS must come
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False),
    ],
    ids=[
        "random",
        "zeros",
        "truncated-preface-then-eof",
        "truncated-settings-then-eof",
        "data-before-settings",
        "http1",
    ],
)
async def test_garbage_on_the_socket_closes_the_connection(
    grpc_server: Server, data: bytes, half_close: bool
):
    await closed_after(grpc_server.running.grpc_port, data, half_close=half_close)

    assert await ask(grpc_server, "after-garbage", "still there?") == "echo(1): still there?"


@pytest.mark.parametrize(
    "data",
    [b"", PREFACE[:10], PREFACE + TRUNCATED_SETTINGS],
    ids=["nothing", "truncated-preface", "truncated-settings"],
)
async def test_a_connection_stuck_in_the_preface_is_closed(
    grpc_server: Server, monkeypatch: pytest.MonkeyPatch, data: bytes
):
    monkeypatch.setattr(easybackend.transports.grpc, "PREFACE_TIMEOUT", 0.5)
    port = grpc_server.running.grpc_port
    started = trio.current_time()

    # then silence, with the connection left open on our side
    await closed_after(port, data, half_close=False)

    assert 0.4 <= trio.current_time() - started < 3
    assert await ask(grpc_server, "after-stall", "still there?") == "echo(1): still there?"
    # a real client, slower than the timeout between its calls, is not cut off
    with trio.fail_after(CALL_TIMEOUT):
        async with purerpc.insecure_channel("127.0.0.1", port) as channel:
            stub = chat_grpc.ChatStub(channel)
            listing = chat_pb2.ListConversationsRequest()
            first = await stub.ListConversations(listing)
            await trio.sleep(1)
            second = await stub.ListConversations(listing)
    assert first == second and len(second.conversations) == 1


# --------------------------------------------------------------------------- hostile ids


@pytest.mark.parametrize(
    "conversation_id",
    ["../x", "a\x00b", "x" * 10_000, "a/b", "é", "x" * 129],
    ids=["dot-dot-slash", "nul", "10000-chars", "slash", "non-ascii", "129-chars"],
)
async def test_hostile_conversation_ids_are_invalid_argument(
    grpc_server: Server, conversation_id: str
):
    calls = [
        ("Ask", chat_pb2.AskRequest(conversation_id=conversation_id, prompt="hi")),
        ("GetConversation", chat_pb2.ConversationRequest(conversation_id=conversation_id)),
        (
            "SetSystemPrompt",
            chat_pb2.SetSystemPromptRequest(conversation_id=conversation_id, prompt="x"),
        ),
        ("Rollback", chat_pb2.RollbackRequest(conversation_id=conversation_id, turns=1)),
        ("DeleteConversation", chat_pb2.ConversationRequest(conversation_id=conversation_id)),
        ("Regenerate", chat_pb2.RegenerateRequest(conversation_id=conversation_id, turn_id="t")),
        ("SetHead", chat_pb2.SetHeadRequest(conversation_id=conversation_id, turn_id="root")),
        ("DeleteTurn", chat_pb2.DeleteTurnRequest(conversation_id=conversation_id, turn_id="t")),
    ]
    for method, request in calls:
        code, message = status_of(await rpc_error(grpc_server, method, request))
        assert code == purerpc.StatusCode.INVALID_ARGUMENT, method
        assert message == (
            "conversation_id must be 1-128 characters of A-Z, a-z, 0-9, '_', '-', '.', ':'"
        ), method  # readable, and the id is not echoed back

    assert grpc_server.fake.requests == []
    listing = await rpc(grpc_server, "ListConversations", chat_pb2.ListConversationsRequest())
    assert list(listing.conversations) == []
    assert await ask(grpc_server, "ok", "fine") == "echo(1): fine"
