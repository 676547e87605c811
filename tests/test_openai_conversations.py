"""The Conversations API (/v1/conversations and their items) through the official ``openai`` SDK.

Conversations under /v1 are the native ones: a conversation made here is
read with ``GET /conversations/{id}``, a native one (asked over HTTP or the
WebSocket) is continued with ``responses.create(conversation=…)``. Items are
the messages of the active path; adding them calls no model.
"""

from __future__ import annotations

import openai
import pytest
import trio
from helpers.openai_sdk import async_client, sync_client
from helpers.servers import free_port
from helpers.upstream import echo, upstream_messages
from helpers.websocket import ws_json_ask

from easybackend.settings import DEFAULT_MODEL

MODEL = DEFAULT_MODEL
KEY_A, KEY_B = "alice-SECRET-aaaa", "bob-SECRET-bbbb"


async def native(server, conversation_id: str) -> dict:
    async with server.client() as http:
        reply = await http.get(f"/conversations/{conversation_id}")
    assert reply.status_code == 200, reply.text
    return reply.json()


def texts(items) -> list[tuple[str, str]]:
    return [(item.role, item.content[0].text) for item in items]


async def test_create_with_items_makes_turns_without_the_model_on_both_backends(backend_server):
    server = backend_server
    async with async_client(server) as client:
        conversation = await client.conversations.create(
            metadata={"topic": "ships"},
            items=[
                {"type": "message", "role": "system", "content": "You are a pirate."},
                {"role": "user", "content": "Ahoy"},
                {"role": "assistant", "content": [{"type": "output_text", "text": "Arr!"}]},
                {"role": "user", "content": [{"type": "input_text", "text": "Where to?"}]},
            ],
        )
        assert conversation.id.startswith("conv_") and conversation.object == "conversation"
        assert conversation.metadata == {"topic": "ships"} and conversation.created_at > 0
        assert server.fake.requests == []  # no model was called
        listed = await client.conversations.items.list(conversation.id, order="asc")
        assert texts(listed.data) == [
            ("system", "You are a pirate."),
            ("user", "Ahoy"),
            ("assistant", "Arr!"),
            ("user", "Where to?"),
        ]
        assert listed.data[0].id == "msg_system" and listed.has_more is False
        # the conversation is a native one: a system prompt, a pair and a lone user message
        shown = await native(server, conversation.id)
        assert shown["system_prompt"] == "You are a pirate."
        assert [[m["text"] for m in t["messages"]] for t in shown["history"]] == [
            ["Ahoy", "Arr!"],
            ["Where to?", ""],
        ]
        # a response continues it: the lone message is sent, its empty answer is not
        response = await client.responses.create(
            model=MODEL, conversation={"id": conversation.id}, input="Tell me more"
        )
        assert upstream_messages(server.fake) == [
            {"role": "system", "content": "You are a pirate."},
            {"role": "user", "content": "Ahoy"},
            {"role": "assistant", "content": "Arr!"},
            {"role": "user", "content": "Where to?"},
            {"role": "user", "content": "Tell me more"},
        ]
        assert response.conversation.id == conversation.id
        newest = await client.conversations.items.list(conversation.id, limit=2)
    assert texts(newest.data) == [
        ("assistant", echo(5, "Tell me more")),
        ("user", "Tell me more"),
    ]
    assert newest.has_more is True and newest.last_id == f"msg_{response.id[5:]}_u"


async def test_retrieve_update_and_delete_a_conversation(backend_server):
    server = backend_server
    async with async_client(server) as client:
        made = await client.conversations.create()
        assert made.metadata == {}
        updated = await client.conversations.update(made.id, metadata={"a": "1", "b": "2"})
        assert updated.metadata == {"a": "1", "b": "2"} and updated.id == made.id
        shown = await client.conversations.retrieve(made.id)
        assert (shown.metadata, shown.created_at) == ({"a": "1", "b": "2"}, made.created_at)
        deleted = await client.conversations.delete(made.id)
        assert (deleted.id, deleted.deleted, deleted.object) == (
            made.id,
            True,
            "conversation.deleted",
        )
        with pytest.raises(openai.NotFoundError):
            await client.conversations.retrieve(made.id)
        with pytest.raises(openai.NotFoundError):
            await client.conversations.delete(made.id)
        with pytest.raises(openai.BadRequestError) as too_many:
            await client.conversations.create(metadata={f"k{i}": "v" for i in range(17)})
        assert too_many.value.body["param"] == "metadata"
    async with server.client() as http:
        assert (await http.get(f"/conversations/{made.id}")).status_code == 404


async def test_items_create_list_retrieve_and_delete(server):
    async with async_client(server) as client:
        conversation = await client.conversations.create()
        added = await client.conversations.items.create(
            conversation.id,
            items=[
                {"role": "user", "content": "one"},
                {"role": "assistant", "content": "two"},
                {"role": "assistant", "content": "three"},
                {"role": "user", "content": "four"},
                {"role": "user", "content": "five"},
            ],
        )
        assert texts(added.data) == [
            ("user", "one"),
            ("assistant", "two"),
            ("assistant", "three"),
            ("user", "four"),
            ("user", "five"),
        ]
        assert added.first_id == added.data[0].id and added.last_id == added.data[-1].id
        ids = [item.id for item in added.data]
        # the SDK's auto-pagination walks every page (after = the last id of the page)
        walked = [
            item.id async for item in client.conversations.items.list(conversation.id, limit=2)
        ]
        assert walked == ids[::-1]
        ascending = [
            item.id
            async for item in client.conversations.items.list(conversation.id, limit=2, order="asc")
        ]
        assert ascending == ids
        after = await client.conversations.items.list(
            conversation.id, order="asc", after=ids[1], limit=2
        )
        assert [item.id for item in after.data] == ids[2:4] and after.has_more is True
        item = await client.conversations.items.retrieve(ids[2], conversation_id=conversation.id)
        assert (item.role, item.content[0].text, item.status) == ("assistant", "three", "completed")
        # delete one message of a pair: the other stays; the conversation is returned
        left = await client.conversations.items.delete(ids[0], conversation_id=conversation.id)
        assert left.id == conversation.id
        with pytest.raises(openai.NotFoundError):
            await client.conversations.items.retrieve(ids[0], conversation_id=conversation.id)
        with pytest.raises(openai.NotFoundError):
            await client.conversations.items.delete(ids[0], conversation_id=conversation.id)
        # delete a lone message: its turn leaves the tree, the path closes over it
        await client.conversations.items.delete(ids[2], conversation_id=conversation.id)
        remaining = await client.conversations.items.list(conversation.id, order="asc")
        assert texts(remaining.data) == [("assistant", "two"), ("user", "four"), ("user", "five")]
        await client.responses.create(model=MODEL, conversation=conversation.id, input="six")
        assert [m["content"] for m in upstream_messages(server.fake)] == [
            "two",
            "four",
            "five",
            "six",
        ]
        with pytest.raises(openai.NotFoundError):
            await client.conversations.items.retrieve("msg_nope", conversation_id=conversation.id)
        with pytest.raises(openai.NotFoundError):
            await client.conversations.items.create("conv_missing", items=[])
    shown = await native(server, conversation.id)
    assert shown["turns"] == 4 and shown["stored_turns"] == 4


async def test_the_system_prompt_is_an_item(server):
    async with async_client(server) as client:
        conversation = await client.conversations.create()
        await client.conversations.items.create(
            conversation.id, items=[{"role": "developer", "content": "Be brief."}]
        )
        item = await client.conversations.items.retrieve(
            "msg_system", conversation_id=conversation.id
        )
        assert (item.role, item.content[0].text) == ("system", "Be brief.")
        await client.responses.create(model=MODEL, conversation=conversation.id, input="hi")
        assert upstream_messages(server.fake)[0] == {"role": "system", "content": "Be brief."}
        await client.conversations.items.delete("msg_system", conversation_id=conversation.id)
        listed = await client.conversations.items.list(conversation.id)
        assert "msg_system" not in [item.id for item in listed.data]
    assert (await native(server, conversation.id))["system_prompt"] is None


async def test_bad_items_are_refused_naming_the_field(server):
    async with async_client(server) as client:
        with pytest.raises(openai.BadRequestError) as image:
            await client.conversations.create(
                items=[
                    {
                        "role": "user",
                        "content": [{"type": "input_image", "image_url": "https://x/a.png"}],
                    }
                ]
            )
        assert image.value.body["param"] == "items[0].content[0].type"
        conversation = await client.conversations.create()
        with pytest.raises(openai.BadRequestError) as call:
            await client.conversations.items.create(
                conversation.id,
                items=[{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}],
            )
        assert call.value.body["param"] == "items[0].type"
        with pytest.raises(openai.BadRequestError) as empty:
            await client.conversations.items.create(
                conversation.id, items=[{"role": "user", "content": ""}]
            )
        assert empty.value.body["param"] == "items[0].content"
    assert (await native(server, conversation.id))["stored_turns"] == 0


async def test_another_keys_conversations_are_not_found(start_server):
    server = await start_server(API_KEYS=f"alice:{KEY_A},bob:{KEY_B}")
    async with async_client(server, KEY_A) as alice, async_client(server, KEY_B) as bob:
        mine = await alice.conversations.create(items=[{"role": "user", "content": "secret"}])
        (item,) = (await alice.conversations.items.list(mine.id)).data
        for attempt in (
            bob.conversations.retrieve(mine.id),
            bob.conversations.update(mine.id, metadata={"x": "y"}),
            bob.conversations.delete(mine.id),
            bob.conversations.items.list(mine.id),
            bob.conversations.items.create(mine.id, items=[{"role": "user", "content": "x"}]),
            bob.conversations.items.retrieve(item.id, conversation_id=mine.id),
            bob.conversations.items.delete(item.id, conversation_id=mine.id),
            bob.responses.create(model=MODEL, input="x", conversation=mine.id),
        ):
            with pytest.raises(openai.NotFoundError):
                await attempt
        assert (await alice.conversations.retrieve(mine.id)).id == mine.id
        assert texts((await alice.conversations.items.list(mine.id)).data) == [("user", "secret")]


async def test_one_conversation_across_the_native_api_responses_and_the_websocket(start_server):
    """Cross-API continuity: each ask sees the previous turns, whatever API made them."""
    server = await start_server(WS_PORT=str(free_port()))
    async with server.client() as http:
        first = await http.post("/ask/123", json={"prompt": "native first"})
    assert first.status_code == 200
    with sync_client(server) as client:  # the sync client, from a worker thread
        response = await trio.to_thread.run_sync(
            lambda: client.responses.create(model=MODEL, conversation="123", input="then responses")
        )
    assert response.conversation.id == "123"
    assert [m["content"] for m in upstream_messages(server.fake)] == [
        "native first",
        first.json()["response"],
        "then responses",
    ]
    replies = await ws_json_ask(
        server.running.ws_port, {"conversation_id": "123", "prompt": "then the websocket"}
    )
    assert replies[-1]["type"] == "end"
    assert [m["content"] for m in upstream_messages(server.fake)] == [
        "native first",
        first.json()["response"],
        "then responses",
        response.output_text,
        "then the websocket",
    ]
    shown = await native(server, "123")
    assert [turn["messages"][0]["text"] for turn in shown["history"]] == [
        "native first",
        "then responses",
        "then the websocket",
    ]
    assert shown["history"][1]["id"] == response.id.removeprefix("resp_")
    async with async_client(server) as client:
        items = await client.conversations.items.list("123", order="asc")
        assert (await client.conversations.retrieve("123")).id == "123"
    assert [item.content[0].text for item in items.data][::2] == [
        "native first",
        "then responses",
        "then the websocket",
    ]
