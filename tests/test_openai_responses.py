"""The Responses API (/v1/responses) through the official ``openai`` SDK, over the fake upstream.

The ``openai`` package, unmodified (``AsyncOpenAI`` on trio, ``OpenAI`` from a
worker thread), against a real server whose model provider is the fake
chat-completions server: nothing needs the provider to have a Responses API.
What the fake received shows the context each response was given.
"""

from __future__ import annotations

import json

import openai
import pytest
import trio
from helpers.http import parse_sse
from helpers.logs import capture_access
from helpers.openai_sdk import async_client, sync_client
from helpers.upstream import echo, history_of, upstream_messages
from helpers.waiting import wait_until

from easybackend.settings import DEFAULT_MODEL

MODEL = DEFAULT_MODEL  # the server's GPT_ENGINE (the fake answers under any name)
STREAM_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
DONE_EVENTS = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]
KEY_A, KEY_B = "alice-SECRET-aaaa", "bob-SECRET-bbbb"
SLOW = "[[fake:tokens=400]] [[fake:delay=0.02]]"  # an answer that takes 8 seconds


def turn_of(response_id: str) -> str:
    assert response_id.startswith("resp_"), response_id
    return response_id.removeprefix("resp_")


async def native_conversation(server, conversation_id: str, **params) -> dict:
    async with server.client() as http:
        reply = await http.get(f"/conversations/{conversation_id}", params=params)
    assert reply.status_code == 200, reply.text
    return reply.json()


# -- create


async def test_string_input_is_one_ask_of_a_new_conversation_sync_and_async(server):
    async with async_client(server) as client:
        response = await client.responses.create(model=MODEL, input="Hello there")
    assert response.object == "response" and response.status == "completed"
    assert response.output_text == echo(1, "Hello there")
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant"
    assert message.id == f"msg_{turn_of(response.id)}_a" and message.status == "completed"
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    usage = response.usage
    assert usage.output_tokens == 3 and usage.input_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert response.model == MODEL and response.store is True and response.truncation == "auto"
    assert response.error is None and response.incomplete_details is None
    assert response.completed_at and response.created_at
    # the new conversation is conv_<turn id>, a native conversation like any other
    conversation_id = f"conv_{turn_of(response.id)}"
    assert response.conversation.id == conversation_id
    native = await native_conversation(server, conversation_id)
    (turn,) = native["history"]
    assert turn["id"] == turn_of(response.id)
    assert [m["text"] for m in turn["messages"]] == ["Hello there", echo(1, "Hello there")]
    assert upstream_messages(server.fake) == [{"role": "user", "content": "Hello there"}]

    with sync_client(server) as client:  # the sync client, from a worker thread
        again = await trio.to_thread.run_sync(
            lambda: client.responses.create(model=MODEL, input="From a thread")
        )
    assert again.output_text == echo(1, "From a thread")
    assert again.conversation.id != conversation_id  # a new conversation again


async def test_message_items_and_instructions_make_the_context(server):
    async with async_client(server) as client:
        response = await client.responses.create(
            model=MODEL,
            instructions="You are terse.",
            input=[
                {"role": "developer", "content": "Answer in French."},
                {"role": "user", "content": [{"type": "input_text", "text": "Name a colour"}]},
                {"type": "message", "role": "assistant", "content": "Bleu."},
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "Another"},
                        {"type": "input_text", "text": "please"},
                    ],
                },
            ],
        )
        items = await client.responses.input_items.list(response.id, order="asc")
        later = await client.responses.create(
            model=MODEL, input="And a third?", previous_response_id=response.id
        )
    # the instructions and the developer message are the system prompt; the earlier messages
    # come before the last user message, which is the prompt
    assert upstream_messages(server.fake, -2) == [
        {"role": "system", "content": "You are terse.\n\nAnswer in French."},
        {"role": "user", "content": "Name a colour"},
        {"role": "assistant", "content": "Bleu."},
        {"role": "user", "content": "Another\nplease"},
    ]
    assert response.output_text == echo(4, "Another\nplease")
    assert response.instructions == "You are terse."
    assert [(item.role, item.content[0].text) for item in items.data] == [
        ("developer", "Answer in French."),
        ("user", "Name a colour"),
        ("assistant", "Bleu."),
        ("user", "Another\nplease"),
    ]
    assert items.data[-1].id == f"msg_{turn_of(response.id)}_u"
    assert items.first_id == items.data[0].id and items.has_more is False
    # instructions are not carried over (as OpenAI's); the earlier messages are history now
    assert history_of(upstream_messages(server.fake)) == [
        ("Name a colour", "Bleu."),
        ("Another\nplease", echo(4, "Another\nplease")),
    ]
    assert later.instructions is None


async def test_store_false_keeps_nothing_retrievable(server):
    async with async_client(server) as client:
        first = await client.responses.create(model=MODEL, input="one")
        unstored = await client.responses.create(
            model=MODEL, input="two", previous_response_id=first.id, store=False
        )
        assert unstored.store is False and unstored.conversation is None
        assert unstored.output_text == echo(3, "two")  # it saw the chain
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(unstored.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.create(
                model=MODEL, input="three", previous_response_id=unstored.id
            )
        alone = await client.responses.create(model=MODEL, input="alone", store=False)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(alone.id)
    native = await native_conversation(server, first.conversation.id)
    assert native["stored_turns"] == 1
    async with server.client() as http:
        listed = (await http.get("/conversations")).json()["conversations"]
    assert [c["conversation_id"] for c in listed] == [first.conversation.id]


async def test_settings_are_sent_and_kept_with_the_response(server):
    async with async_client(server) as client:
        response = await client.responses.create(
            model=MODEL,
            input="Tune me",
            temperature=0.25,
            top_p=0.5,
            max_output_tokens=64,
            metadata={"topic": "tuning"},
            user="end-user-7",
        )
        kept = await client.responses.retrieve(response.id)
    body = server.fake.requests[-1]["body"]
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.25, 0.5, 64)
    for shown in (response, kept):
        assert (shown.temperature, shown.top_p, shown.max_output_tokens) == (0.25, 0.5, 64)
        assert shown.metadata == {"topic": "tuning"} and shown.user == "end-user-7"
    assert kept.output_text == response.output_text and kept.usage == response.usage
    assert kept.id == response.id and kept.status == "completed"


async def test_an_answer_cut_by_max_output_tokens_is_incomplete(server):
    async with async_client(server) as client:
        response = await client.responses.create(
            model=MODEL, input="a b c d e f g h", max_output_tokens=2
        )
        kept = await client.responses.retrieve(response.id)
    assert server.fake.requests[-1]["body"]["max_tokens"] == 2
    for shown in (response, kept):
        assert shown.status == "incomplete"
        assert shown.incomplete_details.reason == "max_output_tokens"
        assert shown.output[0].status == "incomplete" and shown.usage.output_tokens == 2


# -- streaming


async def test_stream_sends_openais_events_and_the_final_response(server):
    async with async_client(server) as client:
        async with client.responses.stream(model=MODEL, input="Stream this please") as stream:
            events = [event async for event in stream]
            final = await stream.get_final_response()
    kinds = [event.type for event in events]
    deltas = [event for event in events if event.type == "response.output_text.delta"]
    assert kinds == STREAM_EVENTS + ["response.output_text.delta"] * len(deltas) + [
        *DONE_EVENTS,
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert "".join(d.delta for d in deltas) == echo(1, "Stream this please") == final.output_text
    assert deltas
    item_id = f"msg_{turn_of(final.id)}_a"
    assert {d.item_id for d in deltas} == {item_id}
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert events[-1].response.status == "completed" and final.status == "completed"
    assert final.usage.output_tokens == 4
    async with async_client(server) as client:
        assert (await client.responses.retrieve(final.id)).output_text == final.output_text

    # on the wire: each SSE event's name is its data's type
    async with server.client() as http:
        reply = await http.post(
            "/v1/responses", json={"model": MODEL, "input": "raw", "stream": True}
        )
    assert reply.headers["content-type"].startswith("text/event-stream")
    frames = parse_sse(reply.text)
    assert all(name == data["type"] for name, data in frames)
    assert frames[-1][0] == "response.completed"


async def test_stream_with_the_sync_client(server):
    def run() -> tuple[list[str], str]:
        with sync_client(server) as client:
            with client.responses.stream(model=MODEL, input="sync stream") as stream:
                kinds = [event.type for event in stream]
                return kinds, stream.get_final_response().output_text

    kinds, text = await trio.to_thread.run_sync(run)
    assert kinds[:4] == STREAM_EVENTS and kinds[-1] == "response.completed"
    assert text == echo(1, "sync stream")


async def test_the_stream_names_the_provider_model_from_response_created_on(start_server):
    """With aliases (MODELS), the default (GPT_ENGINE) and a conversation's own model, every
    event and the final response name the model the provider is called with, as the stored
    response does: ``response.created`` too, and a background response from its create on."""
    server = await start_server(
        GPT_ENGINE="fast", MODELS="fast=fake-fast-model,slow=fake-slow-model"
    )
    async with server.client() as http:
        await http.put("/conversations/own/settings", json={"model": "slow"})
    cases = [  # (the request's fields, the provider model)
        ({"model": "slow"}, "fake-slow-model"),
        ({}, "fake-fast-model"),
        ({"conversation": "own"}, "fake-slow-model"),
    ]
    async with async_client(server) as client:
        for asked, provider_model in cases:
            # create(stream=True): the SDK's responses.stream() insists on a model
            stream = await client.responses.create(input="which model?", stream=True, **asked)
            events = [event async for event in stream]
            assert server.fake.requests[-1]["body"]["model"] == provider_model
            shown = [event.response.model for event in events if hasattr(event, "response")]
            assert shown == [provider_model] * 3, asked  # created, in_progress, completed
            final = events[-1].response
            assert final.status == "completed"
            assert (await client.responses.retrieve(final.id)).model == provider_model
        background = await client.responses.create(
            input="[[fake:delay=0.1]] later", background=True, model="slow"
        )
        assert background.status == "in_progress"
        assert background.model == "fake-slow-model"
        assert (await client.responses.retrieve(background.id)).model == "fake-slow-model"


async def test_an_error_before_the_first_piece_is_a_typed_error_not_a_stream(server):
    async with async_client(server) as client:
        with pytest.raises(openai.InternalServerError) as failed:
            async with client.responses.stream(
                model=MODEL, input="[[fake:status=500]] fail"
            ) as stream:
                async for _ in stream:
                    pass
    assert failed.value.status_code == 502
    assert failed.value.body["code"] == "upstream_error"


async def test_a_failure_mid_stream_ends_with_response_failed(server):
    async with async_client(server) as client:
        stream = await client.responses.create(
            model=MODEL, input="[[fake:tokens=20]] [[fake:disconnect_after=3]] break", stream=True
        )
        events = [event async for event in stream]
        # the SDK's helper yields it too; its final response is a completed one only
        broken = "[[fake:tokens=20]] [[fake:disconnect_after=3]] again"
        async with client.responses.stream(model=MODEL, input=broken) as helper:
            kinds = [event.type async for event in helper]
            with pytest.raises(RuntimeError, match="response.completed"):
                await helper.get_final_response()
    assert kinds[-1] == "response.failed" and "error" not in kinds
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "failed"
    assert events[-1].response.error.code == "server_error"
    assert [e.sequence_number for e in events] == list(range(len(events)))


async def test_the_shutdown_grace_ends_a_stream_with_response_failed_never_an_error_event(
    start_server,
):
    """After the stream began every failure is ``response.failed`` (the shutdown grace's end
    too): no ``error`` event is ever sent."""
    server = await start_server(SHUTDOWN_GRACE="0.5")
    body = {"model": MODEL, "input": "[[fake:tokens=2000]] [[fake:delay=0.01]]", "stream": True}
    text = ""
    async with server.client() as http:
        with trio.fail_after(10):
            async with http.stream("POST", "/v1/responses", json=body) as reply:
                assert reply.status_code == 200
                async for part in reply.aiter_text():
                    text += part
                    if text.count("response.output_text.delta") >= 6:  # event: and type
                        server.shutdown.set()  # the grace ends 0.5 s later, mid-answer
    frames = parse_sse(text)
    names = [name for name, _ in frames]
    assert names[-1] == "response.failed" and "error" not in names
    assert names.count("response.failed") == 1 and "response.completed" not in names
    failed = frames[-1][1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert "shutting down" in failed["error"]["message"]
    assert [data["sequence_number"] for _, data in frames] == list(range(len(frames)))


# -- chains and branches


async def test_previous_response_id_chains_and_branches_on_both_backends(backend_server):
    server = backend_server
    async with async_client(server) as client:
        one = await client.responses.create(model=MODEL, input="one")
        two = await client.responses.create(model=MODEL, input="two", previous_response_id=one.id)
        three = await client.responses.create(
            model=MODEL, input="three", previous_response_id=two.id
        )
        assert history_of(upstream_messages(server.fake)) == [
            ("one", echo(1, "one")),
            ("two", echo(3, "two")),
        ]
        assert {r.conversation.id for r in (one, two, three)} == {one.conversation.id}
        assert three.previous_response_id == two.id
        # from a response that is not the head: a branch whose context is its own path only
        branch = await client.responses.create(
            model=MODEL, input="two, again", previous_response_id=one.id
        )
        assert history_of(upstream_messages(server.fake)) == [("one", echo(1, "one"))]
        # and the first branch goes on from its last response
        four = await client.responses.create(
            model=MODEL, input="four", previous_response_id=three.id
        )
        assert [p for p, _ in history_of(upstream_messages(server.fake))] == [
            "one",
            "two",
            "three",
        ]
    native = await native_conversation(server, one.conversation.id, view="tree")
    parents = {turn["id"]: turn["parent_id"] for turn in native["tree"]}
    assert parents[turn_of(branch.id)] == turn_of(one.id)
    assert parents[turn_of(four.id)] == turn_of(three.id)
    assert native["head"] == turn_of(four.id) and native["stored_turns"] == 5


async def test_retrieve_input_items_and_delete_in_the_middle_of_a_chain(backend_server):
    server = backend_server
    async with async_client(server) as client:
        one = await client.responses.create(model=MODEL, input="one")
        two = await client.responses.create(
            model=MODEL,
            input=[
                {"role": "user", "content": "two a"},
                {"role": "assistant", "content": "two b"},
                {"role": "user", "content": "two c"},
            ],
            previous_response_id=one.id,
        )
        three = await client.responses.create(
            model=MODEL, input="three", previous_response_id=two.id
        )
        kept = await client.responses.retrieve(two.id)
        assert kept.output_text == two.output_text and kept.previous_response_id == one.id
        # input items, a page at a time, newest first by default
        pages = []
        async for item in client.responses.input_items.list(two.id, limit=1):
            pages.append(item.content[0].text)
        assert pages == ["two c", "two b", "two a"]
        # deleting a response in the middle takes its turns out: the chain closes over it
        assert await client.responses.delete(two.id) is None
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(two.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.delete(two.id)
        await client.responses.create(model=MODEL, input="four", previous_response_id=three.id)
        assert [p for p, _ in history_of(upstream_messages(server.fake))] == ["one", "three"]
        assert (await client.responses.retrieve(three.id)).output_text == three.output_text
    async with server.client() as http:
        raw = await http.delete(f"/v1/responses/{one.id}")
    assert raw.json() == {"id": one.id, "object": "response.deleted", "deleted": True}
    native = await native_conversation(server, one.conversation.id)
    assert [turn["messages"][0]["text"] for turn in native["history"]] == ["three", "four"]
    assert native["history"][0]["parent_id"] is None and native["history"][1]["turn"] == 2


async def test_a_native_turn_is_a_response(server):
    async with server.client() as http:
        asked = (await http.post("/ask/native-1", json={"prompt": "native"})).json()
    async with async_client(server) as client:
        shown = await client.responses.retrieve(f"resp_{asked['turn_id']}")
        after = await client.responses.create(
            model=MODEL, input="after", previous_response_id=shown.id
        )
    assert shown.output_text == asked["response"] and shown.conversation.id == "native-1"
    assert after.conversation.id == "native-1"
    assert history_of(upstream_messages(server.fake)) == [("native", asked["response"])]


# -- truncation


async def test_truncation_auto_drops_oldest_turns_and_disabled_refuses(start_server):
    server = await start_server(MAX_CONTEXT_TOKENS="120")
    words = " ".join(["word"] * 20)
    async with async_client(server) as client:
        previous = None
        for index in range(4):
            response = await client.responses.create(
                model=MODEL, input=f"{index} {words}", previous_response_id=previous
            )
            previous = response.id
        sent = len(server.fake.requests)
        # auto (the default): the oldest turns were left out of the last context
        assert len(history_of(upstream_messages(server.fake))) < 3
        with pytest.raises(openai.BadRequestError) as refused:
            await client.responses.create(
                model=MODEL, input="more", previous_response_id=previous, truncation="disabled"
            )
        assert len(server.fake.requests) == sent  # refused before the model was called
        assert refused.value.body["param"] == "input"
        # a chain that fits is answered with truncation disabled
        fits = await client.responses.create(model=MODEL, input="short", truncation="disabled")
        shorter = await client.responses.create(
            model=MODEL, input="also", previous_response_id=fits.id, truncation="disabled"
        )
    assert shorter.truncation == "disabled" and shorter.status == "completed"
    assert history_of(upstream_messages(server.fake)) == [("short", echo(1, "short"))]


# -- cancel


async def test_cancel_stops_a_streamed_response_and_keeps_what_was_sent(backend_server):
    server = backend_server
    async with async_client(server) as client, async_client(server) as other:
        async with client.responses.stream(model=MODEL, input=f"{SLOW} long") as stream:
            kinds = []
            async for event in stream:
                kinds.append(event.type)
                if event.type == "response.created":
                    response_id = event.response.id
                if event.type == "response.output_text.delta" and len(kinds) == 6:
                    # the response is in progress: retrieve shows it, another client cancels it
                    shown = await other.responses.retrieve(response_id)
                    assert shown.status == "in_progress"
                    cancelled = await other.responses.cancel(response_id)
        kept = await client.responses.retrieve(response_id)
        with pytest.raises(openai.BadRequestError):
            await client.responses.cancel(response_id)  # it is no longer in progress
        with pytest.raises(openai.NotFoundError):
            await client.responses.cancel("resp_0123456789abcdef01234567")
    assert cancelled.status == "cancelled" and cancelled.id == response_id
    assert kinds[-4:] == [*DONE_EVENTS, "response.incomplete"]
    assert kept.status == "cancelled" and kept.output[0].status == "incomplete"
    assert kept.output_text and kept.output_text == cancelled.output_text
    assert len(kept.output_text) < len(echo(1, "long")) + 400 * 3
    assert kept.usage.output_tokens > 0
    native = await native_conversation(server, kept.conversation.id)
    assert native["history"][0]["finish_reason"] == "cancelled"
    await wait_until(lambda: any(e["event"] == "disconnected" for e in server.fake.events))


# -- errors and ownership


async def test_unsupported_input_is_a_bad_request_naming_the_field(server):
    async with async_client(server) as client:
        cases = {
            "input[0].type": [{"type": "function_call_output", "call_id": "x", "output": "1"}],
            "input[0].content[1].type": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "look"},
                        {"type": "input_image", "image_url": "https://example.com/a.png"},
                    ],
                }
            ],
            "input[0].role": [{"role": "tool", "content": "x"}],
            "input": [{"role": "assistant", "content": "no question"}],
        }
        for param, given in cases.items():
            with pytest.raises(openai.BadRequestError) as refused:
                await client.responses.create(model=MODEL, input=given)
            assert refused.value.body["param"] == param, given
            assert refused.value.body["type"] == "invalid_request_error"
        with pytest.raises(openai.BadRequestError) as both:
            await client.responses.create(
                model=MODEL, input="x", conversation="c1", previous_response_id="resp_abc"
            )
        assert both.value.body["param"] == "previous_response_id"
        with pytest.raises(openai.BadRequestError) as tools:
            await client.responses.create(model=MODEL, input="x", tools=[{"type": "web_search"}])
        assert tools.value.body["param"] == "tools"
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.responses.create(
                model=MODEL, input="x", previous_response_id="resp_0123456789abcdef01234567"
            )
        assert unknown.value.body["param"] == "previous_response_id"
        with pytest.raises(openai.NotFoundError) as missing:
            await client.responses.create(model=MODEL, input="x", conversation="never-made")
        assert missing.value.body["param"] == "conversation"
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve("not-a-response-id")
    assert server.fake.requests == []


async def test_another_keys_responses_are_not_found(start_server):
    server = await start_server(API_KEYS=f"alice:{KEY_A},bob:{KEY_B}")
    async with async_client(server, KEY_A) as alice, async_client(server, KEY_B) as bob:
        mine = await alice.responses.create(model=MODEL, input="mine")
        for attempt in (
            bob.responses.retrieve(mine.id),
            bob.responses.delete(mine.id),
            bob.responses.cancel(mine.id),
            bob.responses.input_items.list(mine.id),
            bob.responses.create(model=MODEL, input="x", previous_response_id=mine.id),
            bob.responses.create(model=MODEL, input="x", conversation=mine.conversation.id),
        ):
            with pytest.raises(openai.NotFoundError):
                await attempt
        assert (await alice.responses.retrieve(mine.id)).output_text == mine.output_text
        with pytest.raises(openai.AuthenticationError):
            async with async_client(server, "wrong-SECRET") as stranger:
                await stranger.responses.retrieve(mine.id)


async def test_responses_are_asks_with_access_lines(server):
    with capture_access() as access:
        async with async_client(server) as client:
            await client.responses.create(model=MODEL, input="counted")
            with pytest.raises(openai.BadRequestError):
                await client.responses.create(model=MODEL, input=[{"type": "reasoning"}])
        lines = await access.wait_for(2)
    assert [(line["protocol"], line["outcome"]) for line in lines] == [
        ("openai", "ok"),
        ("openai", "invalid_input"),
    ]


async def test_the_openapi_document_lists_the_responses_routes(server):
    async with server.client() as http:
        spec = (await http.get("/openapi.json")).json()
    paths = spec["paths"]
    create = paths["/v1/responses"]["post"]
    assert set(create["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert {400, 401, 404, 429, 502, 503, 504} <= {int(s) for s in create["responses"]}
    assert create["requestBody"]["required"] is True
    for path, method in [
        ("/v1/responses/{response_id}", "get"),
        ("/v1/responses/{response_id}", "delete"),
        ("/v1/responses/{response_id}/input_items", "get"),
        ("/v1/responses/{response_id}/cancel", "post"),
    ]:
        assert {200, 404} <= {int(s) for s in paths[path][method]["responses"]}, path
    raw = json.dumps(spec)
    assert "OpenAIErrorBody" in raw


async def test_the_raw_body_and_sse_are_what_openai_sends(server):
    async with server.client() as http:
        reply = await http.post("/v1/responses", json={"input": "no model named"})
        assert reply.status_code == 200
        body = reply.json()
        assert body["model"] == server.settings.model and body["object"] == "response"
        bad = await http.post("/v1/responses", content=b"[1, 2]")
        assert bad.status_code == 400 and set(bad.json()["error"]) == {
            "message",
            "type",
            "param",
            "code",
        }
        unknown = await http.post("/v1/responses", json={"input": "x", "bogus": 1})
        assert unknown.json()["error"]["param"] == "bogus"


async def test_the_events_before_the_first_delta_go_out_with_it_in_one_write(server):
    """The opening events are sent with the first delta, and the closing ones together, each in
    one write: one chunk of the chunked body (the first token comes 0.3 s after the start, the
    next ones 0.3 s apart)."""
    body = json.dumps({"input": "a b [[fake:delay=0.3]]", "stream": True}).encode()
    stream = await trio.open_tcp_stream("127.0.0.1", server.running.http_port)
    async with stream:
        await stream.send_all(
            b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
        )
        data = b""
        with trio.fail_after(10):
            while not data.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's end
                chunk = await stream.receive_some()
                assert chunk, f"connection closed before the whole body: {data!r}"
                data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower(), head
    writes = []  # the chunks of the body, each one write of the server
    while True:
        size, _, rest = rest.partition(b"\r\n")
        if int(size, 16) == 0:
            break
        writes.append([kind for kind, _ in parse_sse(rest[: int(size, 16)].decode())])
        rest = rest[int(size, 16) + 2 :]
    delta = "response.output_text.delta"
    assert writes == [
        [*STREAM_EVENTS, delta],  # echo(1):
        [delta],  # " a"
        [delta],  # " b"
        [*DONE_EVENTS, "response.completed"],
    ], writes
