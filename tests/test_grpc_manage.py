"""Conversation management over gRPC (purerpc and grpcio clients), and the same
conversations seen through the HTTP API.

Calls go through :mod:`helpers.grpc` (one purerpc call, bounded in time) or grpcio.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import grpc
import purerpc
import pytest
import trio
from helpers.grpc import CALL_TIMEOUT, as_json, ask, rpc, rpc_error, status_of
from helpers.servers import Server, StartServer, free_port
from helpers.upstream import ALLOW_OTHER_MODEL, roles_and_contents, upstream_messages

from easybackend.proto_gen import chat_pb2

# --------------------------------------------------------------------------- listing


async def test_list_is_paginated_newest_first(grpc_server: Server):
    for name in ("l1", "l2", "l3", "l4", "l5"):
        await ask(grpc_server, name, f"hi {name}")
    await ask(grpc_server, "l2", "l2 is active again")

    seen, pages, cursor = [], [], ""
    with trio.fail_after(CALL_TIMEOUT):
        while True:
            request = chat_pb2.ListConversationsRequest(limit=2, cursor=cursor)
            page = await rpc(grpc_server, "ListConversations", request)
            pages.append(len(page.conversations))
            seen += [(c.conversation_id, c.turns) for c in page.conversations]
            cursor = page.next_cursor
            if not cursor:
                break
    assert seen == [("l2", 2), ("l5", 1), ("l4", 1), ("l3", 1), ("l1", 1)]
    assert pages == [2, 2, 1]

    everything = await rpc(grpc_server, "ListConversations", chat_pb2.ListConversationsRequest())
    assert [c.conversation_id for c in everything.conversations] == ["l2", "l5", "l4", "l3", "l1"]
    assert everything.next_cursor == ""  # limit 0 is 50 per page: one page
    newest = everything.conversations[0]
    assert not newest.HasField("system_prompt")
    assert newest.usage.prompt_tokens > 0 and newest.usage.completion_tokens > 0
    assert newest.usage.total_tokens == newest.usage.prompt_tokens + newest.usage.completion_tokens
    assert newest.created_at.endswith("Z") and newest.last_activity > newest.created_at
    # the very same page as the HTTP API's
    async with grpc_server.client() as client:
        assert (await client.get("/conversations")).json() == as_json(everything)


@pytest.mark.parametrize(
    ("request_fields", "expected"),
    [
        ({"cursor": "garbage!"}, "cursor"),
        ({"limit": 1000}, "limit"),
        ({"limit": -1}, "limit"),
    ],
    ids=["bad-cursor", "limit-too-large", "negative-limit"],
)
async def test_bad_listing_request_is_invalid_argument(
    grpc_server: Server, request_fields: dict[str, Any], expected: str
):
    await ask(grpc_server, "one", "hello")
    request = chat_pb2.ListConversationsRequest(**request_fields)

    code, message = status_of(await rpc_error(grpc_server, "ListConversations", request))

    assert code == purerpc.StatusCode.INVALID_ARGUMENT
    assert expected in message


# --------------------------------------------------------------------------- reading


async def test_get_conversation_shows_turns_messages_usage_and_system_prompt(
    start_server: StartServer,
):
    grpc_server = await start_server(
        GRPC_PORT=str(free_port()), SHUTDOWN_GRACE="2", **ALLOW_OTHER_MODEL
    )
    await rpc(
        grpc_server,
        "SetSystemPrompt",
        chat_pb2.SetSystemPromptRequest(conversation_id="g1", prompt="be a pirate"),
    )
    *_, first_end = await rpc(
        grpc_server, "Ask", chat_pb2.AskRequest(conversation_id="g1", prompt="hello")
    )
    await ask(grpc_server, "g1", "again", model="other-model", max_tokens=1)

    conversation = await rpc(
        grpc_server, "GetConversation", chat_pb2.ConversationRequest(conversation_id="g1")
    )

    assert conversation.conversation_id == "g1" and conversation.turns == 2
    assert conversation.HasField("system_prompt") and conversation.system_prompt == "be a pirate"
    one, two = conversation.history
    assert one.turn == 1 and two.turn == 2
    assert [(m.role, m.text) for m in one.messages] == [
        ("user", "hello"),
        ("assistant", "echo(2): hello"),  # the system prompt and the prompt
    ]
    assert one.messages[0].tokens == 1 and one.messages[1].tokens > 1
    assert one.model == grpc_server.settings.model and one.finish_reason == "stop"
    assert one.usage == first_end.usage  # what Ask reported is what was stored
    assert one.created_at.endswith("Z") and one.finished_at >= one.created_at
    assert two.model == "other-model" and two.finish_reason == "length"
    assert two.messages[1].text == "echo(4):"
    total = one.usage.total_tokens + two.usage.total_tokens
    assert conversation.usage.total_tokens == total
    assert conversation.created_at <= one.created_at
    assert conversation.last_activity >= two.finished_at


# --------------------------------------------------------------------------- changing


async def test_rollback_is_seen_by_the_next_ask(grpc_server: Server):
    for prompt in ("one", "two", "three"):
        await ask(grpc_server, "rb", prompt)

    reply = await rpc(
        grpc_server, "Rollback", chat_pb2.RollbackRequest(conversation_id="rb", turns=2)
    )
    assert (reply.conversation_id, reply.removed, reply.turns) == ("rb", 2, 1)
    await ask(grpc_server, "rb", "four")
    assert roles_and_contents(upstream_messages(grpc_server.fake)) == [
        ("user", "one"),
        ("assistant", "echo(1): one"),
        ("user", "four"),
    ]

    reply = await rpc(
        grpc_server, "Rollback", chat_pb2.RollbackRequest(conversation_id="rb", turns=10)
    )
    assert (reply.removed, reply.turns) == (2, 0)  # fewer than asked: all there were
    await ask(grpc_server, "rb", "five")
    assert roles_and_contents(upstream_messages(grpc_server.fake)) == [("user", "five")]

    for turns in (0, -1):
        code, message = status_of(
            await rpc_error(
                grpc_server, "Rollback", chat_pb2.RollbackRequest(conversation_id="rb", turns=turns)
            )
        )
        assert code == purerpc.StatusCode.INVALID_ARGUMENT and "turns" in message
    code, message = status_of(
        await rpc_error(
            grpc_server, "Rollback", chat_pb2.RollbackRequest(conversation_id="nope", turns=1)
        )
    )
    assert code == purerpc.StatusCode.NOT_FOUND and "nope" in message


async def test_system_prompt_set_then_cleared(start_server: StartServer):
    server = await start_server(
        GRPC_PORT=str(free_port()), HTTP_PORT="off", FIRST_PROMPT="global persona"
    )

    def set_prompt(**fields: Any) -> Awaitable[chat_pb2.SetSystemPromptResponse]:
        request = chat_pb2.SetSystemPromptRequest(conversation_id="sp", **fields)
        return rpc(server, "SetSystemPrompt", request)

    reply = await set_prompt(prompt="pirate persona")
    assert reply.conversation_id == "sp"
    assert reply.HasField("system_prompt") and reply.system_prompt == "pirate persona"
    # set before the first ask: the conversation exists, with no turns yet
    created = await rpc(
        server, "GetConversation", chat_pb2.ConversationRequest(conversation_id="sp")
    )
    assert (created.turns, created.system_prompt) == (0, "pirate persona")

    await ask(server, "sp", "ahoy")
    assert roles_and_contents(upstream_messages(server.fake))[0] == ("system", "pirate persona")
    await ask(server, "other", "hi")
    assert roles_and_contents(upstream_messages(server.fake))[0] == ("system", "global persona")

    for cleared in ({"prompt": ""}, {}):  # empty, or not set at all
        await set_prompt(prompt="again a pirate")
        reply = await set_prompt(**cleared)
        assert not reply.HasField("system_prompt"), cleared
        await ask(server, "sp", "back to global")
        assert roles_and_contents(upstream_messages(server.fake))[0] == (
            "system",
            "global persona",
        ), cleared
    stored = await rpc(
        server, "GetConversation", chat_pb2.ConversationRequest(conversation_id="sp")
    )
    assert not stored.HasField("system_prompt")


async def test_delete_then_not_found_everywhere(grpc_server: Server):
    await ask(grpc_server, "del", "remember me")
    request = chat_pb2.ConversationRequest(conversation_id="del")

    reply = await rpc(grpc_server, "DeleteConversation", request)
    assert reply.conversation_id == "del"

    for method, message in (
        ("GetConversation", request),
        ("DeleteConversation", request),
        ("Rollback", chat_pb2.RollbackRequest(conversation_id="del", turns=1)),
    ):
        code, text = status_of(await rpc_error(grpc_server, method, message))
        assert code == purerpc.StatusCode.NOT_FOUND, method
        assert "del" in text, method
    listing = await rpc(grpc_server, "ListConversations", chat_pb2.ListConversationsRequest())
    assert list(listing.conversations) == []
    await ask(grpc_server, "del", "fresh start")
    assert roles_and_contents(upstream_messages(grpc_server.fake)) == [("user", "fresh start")]


MANAGEMENT_CALLS = {
    "GetConversation": lambda cid: chat_pb2.ConversationRequest(conversation_id=cid),
    "DeleteConversation": lambda cid: chat_pb2.ConversationRequest(conversation_id=cid),
    "Rollback": lambda cid: chat_pb2.RollbackRequest(conversation_id=cid, turns=1),
    "SetSystemPrompt": lambda cid: chat_pb2.SetSystemPromptRequest(conversation_id=cid, prompt="x"),
}


@pytest.mark.parametrize("method", list(MANAGEMENT_CALLS))
@pytest.mark.parametrize("conversation_id", ["bad id", ""], ids=["space", "empty"])
async def test_invalid_conversation_id_is_invalid_argument(
    grpc_server: Server, method: str, conversation_id: str
):
    error = await rpc_error(grpc_server, method, MANAGEMENT_CALLS[method](conversation_id))

    code, message = status_of(error)
    assert code == purerpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith("conversation_id must be 1-128 characters")
    listing = await rpc(grpc_server, "ListConversations", chat_pb2.ListConversationsRequest())
    assert list(listing.conversations) == []  # nothing was created


# --------------------------------------------------------------------------- grpcio


def unary(channel: grpc.Channel, method: str, request_type: Any, response_type: Any) -> Any:
    return channel.unary_unary(
        f"/chat.Chat/{method}",
        request_serializer=request_type.SerializeToString,
        response_deserializer=response_type.FromString,
    )


async def test_grpcio_client_manages_conversations(grpc_server: Server):
    await ask(grpc_server, "io", "hello from purerpc")

    def run() -> dict[str, Any]:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_server.running.grpc_port}") as channel:
            listing = unary(
                channel,
                "ListConversations",
                chat_pb2.ListConversationsRequest,
                chat_pb2.ListConversationsResponse,
            )
            get = unary(
                channel, "GetConversation", chat_pb2.ConversationRequest, chat_pb2.Conversation
            )
            rollback = unary(
                channel, "Rollback", chat_pb2.RollbackRequest, chat_pb2.RollbackResponse
            )
            results: dict[str, Any] = {
                "list": listing(chat_pb2.ListConversationsRequest(limit=1), timeout=CALL_TIMEOUT),
                "get": get(
                    chat_pb2.ConversationRequest(conversation_id="io"), timeout=CALL_TIMEOUT
                ),
                "rollback": rollback(
                    chat_pb2.RollbackRequest(conversation_id="io", turns=1), timeout=CALL_TIMEOUT
                ),
            }
            with pytest.raises(grpc.RpcError) as failed:
                get(chat_pb2.ConversationRequest(conversation_id="missing"), timeout=CALL_TIMEOUT)
            results["missing"] = failed.value
            with pytest.raises(grpc.RpcError) as failed:
                get(chat_pb2.ConversationRequest(conversation_id="../x"), timeout=CALL_TIMEOUT)
            results["invalid"] = failed.value
            return results

    results = await trio.to_thread.run_sync(run)

    [summary] = results["list"].conversations
    assert (summary.conversation_id, summary.turns) == ("io", 1)
    assert results["list"].next_cursor  # a full page of one: there may be more
    [turn] = results["get"].history
    assert [m.text for m in turn.messages] == ["hello from purerpc", "echo(1): hello from purerpc"]
    assert (results["rollback"].removed, results["rollback"].turns) == (1, 0)
    assert results["missing"].code() == grpc.StatusCode.NOT_FOUND
    assert "missing" in results["missing"].details()
    assert results["invalid"].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "conversation_id" in results["invalid"].details()


# --------------------------------------------------------------------------- with HTTP


async def test_ask_over_grpc_read_over_http_and_the_other_way(grpc_server: Server):
    await ask(grpc_server, "x1", "asked over grpc")
    await rpc(
        grpc_server,
        "SetSystemPrompt",
        chat_pb2.SetSystemPromptRequest(conversation_id="x1", prompt="grpc persona"),
    )
    async with grpc_server.client() as client:
        over_http = (await client.get("/conversations/x1")).json()
        await client.post("/ask/x2", json={"prompt": "asked over http"})
        await client.put("/conversations/x2/system", json={"prompt": "http persona"})
        await client.post("/ask/x2", json={"prompt": "and again"})
        x2_over_http = (await client.get("/conversations/x2")).json()
        listing_over_http = (await client.get("/conversations", params={"limit": 1})).json()

    x1 = await rpc(
        grpc_server, "GetConversation", chat_pb2.ConversationRequest(conversation_id="x1")
    )
    assert over_http["history"][0]["messages"][1]["text"] == "echo(1): asked over grpc"
    assert over_http["system_prompt"] == "grpc persona"
    assert as_json(x1) == over_http  # every field, times included, the same

    x2 = await rpc(
        grpc_server, "GetConversation", chat_pb2.ConversationRequest(conversation_id="x2")
    )
    assert [m.text for t in x2.history for m in t.messages] == [
        "asked over http", "echo(1): asked over http",
        "and again", "echo(4): and again",
    ]  # fmt: skip
    assert x2.system_prompt == "http persona"
    assert as_json(x2) == x2_over_http
    listing = await rpc(
        grpc_server, "ListConversations", chat_pb2.ListConversationsRequest(limit=1)
    )
    assert as_json(listing) == listing_over_http  # the same page and the same cursor

    await rpc(grpc_server, "Rollback", chat_pb2.RollbackRequest(conversation_id="x2", turns=1))
    await rpc(grpc_server, "DeleteConversation", chat_pb2.ConversationRequest(conversation_id="x1"))
    async with grpc_server.client() as client:
        assert (await client.get("/conversations/x2")).json()["turns"] == 1
        assert (await client.get("/conversations/x1")).status_code == 404
        assert (await client.delete("/conversations/x2")).status_code == 204
    code, _ = status_of(
        await rpc_error(
            grpc_server, "GetConversation", chat_pb2.ConversationRequest(conversation_id="x2")
        )
    )
    assert code == purerpc.StatusCode.NOT_FOUND
