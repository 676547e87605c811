"""The OpenAI-compatible API: /v1/models and /v1/chat/completions through the official SDK.

The ``openai`` package, unmodified (``AsyncOpenAI`` on trio, and ``OpenAI``
from a worker thread), against a real server and the fake upstream. Without
a conversation the request is relayed: what the fake received is what the
client sent, and what the client got is what the fake answered. With one
(``extra_body={"conversation": …}`` or the ``X-Conversation-Id`` header) the
client sends only its new message and the server keeps the history.
"""

from __future__ import annotations

import json

import httpx2
import openai
import pytest
import trio
from helpers.http import bearer
from helpers.logs import capture_access, check_access_line, metric, scrape
from helpers.openai_sdk import async_client, sync_client
from helpers.upstream import UPSTREAM_KEY, events_of, queue_faults, upstream_messages
from helpers.waiting import wait_until

from easybackend import errors
from easybackend.settings import DEFAULT_MODEL

KEY = "openai-user-SECRET-1111"
MODEL = DEFAULT_MODEL  # the server's GPT_ENGINE (the fake answers under any name)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def sent(fake, index: int = -1) -> dict:
    """The body of a completion request the fake received."""
    return fake.requests[index]["body"]


# -- models


async def test_models_lists_and_retrieves_the_servers_model(server):
    model = server.settings.model
    async with async_client(server) as client:
        listed = await client.models.list()
        assert [m.id for m in listed.data] == [model]
        assert listed.data[0].object == "model" and listed.data[0].owned_by
        assert isinstance(listed.data[0].created, int)
        assert (await client.models.retrieve(model)).id == model
        with pytest.raises(openai.NotFoundError) as missing:
            await client.models.retrieve("no-such-model")
    assert missing.value.body == {
        "message": "no model 'no-such-model' for this key",
        "type": "invalid_request_error",
        "param": "model",
        "code": "not_found",
    }
    with sync_client(server) as client:  # the sync client, from a thread
        listed = await trio.to_thread.run_sync(client.models.list)
    assert [m.id for m in listed.data] == [model]


# -- the stateless relay


async def test_relay_forwards_every_field_and_returns_the_providers_answer(server):
    fake = server.fake
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]},
    ]
    async with async_client(server) as client:
        completion = await client.chat.completions.create(
            model=MODEL,
            messages=messages,
            temperature=0.3,
            seed=7,
            response_format={"type": "json_object"},
            tools=TOOLS,
            tool_choice="auto",
            extra_body={"x_vendor_option": {"depth": [1, 2]}},
        )
    body = sent(fake)
    # exactly the client's fields, none added (not even stream), none changed
    assert body == {
        "model": MODEL,
        "messages": messages,
        "temperature": 0.3,
        "seed": 7,
        "response_format": {"type": "json_object"},
        "tools": TOOLS,
        "tool_choice": "auto",
        "x_vendor_option": {"depth": [1, 2]},
    }
    # the fake's own answer, passed back: its id, its model, its usage
    assert completion.id == fake.requests[-1]["id"]
    assert completion.object == "chat.completion"
    assert completion.model == MODEL
    assert completion.choices[0].message.content == "echo(2): What is this?"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == 4
    # stateless: nothing stored
    async with server.client() as http:
        assert (await http.get("/conversations")).json()["conversations"] == []


async def test_relay_without_a_model_uses_gpt_engine(server):
    async with server.client() as http:
        reply = await http.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
        )
    assert reply.status_code == 200, reply.text
    assert sent(server.fake)["model"] == server.settings.model
    assert reply.json()["choices"][0]["message"]["content"] == "echo(1): hi"


async def test_relay_stream_sends_no_usage_unless_asked(server):
    fake = server.fake
    async with async_client(server) as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "one two three"}], stream=True
        )
        chunks = [chunk async for chunk in stream]
    # the relay asked the provider for usage (to count tokens) ...
    assert sent(fake)["stream"] is True
    assert sent(fake)["stream_options"] == {"include_usage": True}
    # ... and the client, who did not, got none: no usage chunk
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)
    assert {chunk.id for chunk in chunks} == {fake.requests[-1]["id"]}
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text == "echo(1): one two three"
    assert chunks[-1].choices[0].finish_reason == "stop"
    # on the wire: not even the "usage": null the provider put in every chunk
    async with server.client() as http:
        body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            raw = (await response.aread()).decode()
    events = [line for line in raw.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-1]) and "usage" not in raw


async def test_relay_stream_with_include_usage_ends_with_the_providers_usage(server):
    async with async_client(server) as client:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "one two"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert sent(server.fake)["stream_options"] == {"include_usage": True}
    *answer, last = chunks
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (6, 3)
    assert all(chunk.usage is None for chunk in answer)


async def test_relay_passes_tool_calls_back_streamed_and_whole(server):
    prompt = "Weather in Paris? [[fake:tool_call=get_weather]]"
    messages = [{"role": "user", "content": prompt}]
    async with async_client(server) as client:
        # the SDK's own stream helper assembles the chunks into the final message
        async with client.chat.completions.stream(
            model=MODEL, messages=messages, tools=TOOLS
        ) as stream:
            final = await stream.get_final_completion()
        whole = await client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    assert [r["body"]["tools"] for r in server.fake.requests] == [TOOLS, TOOLS]
    for completion in (final, whole):
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and call.type == "function"
        assert json.loads(call.function.arguments) == {"echo": "echo(1): Weather in Paris?"}
    # a tool result goes back the same way, as sent
    followup = [
        *messages,
        whole.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        {"role": "user", "content": "thanks"},
    ]
    async with async_client(server) as client:
        answer = await client.chat.completions.create(model=MODEL, messages=followup, tools=TOOLS)
    assert sent(server.fake)["messages"] == followup
    assert answer.choices[0].message.content == "echo(4): thanks"


async def test_relay_refusals_of_the_provider_keep_their_status(server):
    fake = server.fake
    await queue_faults(fake, {"status": 400}, {"status": 404}, {"status": 422}, {"status": 500})
    messages = [{"role": "user", "content": "hi"}]
    async with async_client(server) as client:
        for expected, status in (
            (openai.BadRequestError, 400),
            (openai.NotFoundError, 404),
            (openai.UnprocessableEntityError, 422),
            (openai.InternalServerError, 502),  # the provider failing is not the client's doing
        ):
            with pytest.raises(expected) as refused:
                await client.chat.completions.create(model=MODEL, messages=messages)
            assert refused.value.status_code == status
            error = refused.value.body
            assert set(error) == {"message", "type", "param", "code"}
            if status < 500:
                assert error["code"] == errors.UpstreamRejected.code
                assert error["message"] == (
                    f"the model provider refused the request (HTTP {status}):"
                    f" Injected fault: HTTP {status}"
                )
            else:
                assert error["code"] == errors.UpstreamError.code
                assert error["type"] == "server_error"


def test_a_relayed_refusal_quotes_the_provider_but_never_the_upstream_key():
    request = httpx2.Request("POST", "http://provider/v1/chat/completions")
    said = f"bad field; you sent Authorization: Bearer {UPSTREAM_KEY}\x00 \x1b[31m"
    body = {"message": said + "x" * 2000, "param": "tools[0]", "type": "invalid_request_error"}
    response = httpx2.Response(422, request=request, json={"error": body})
    exc = openai.UnprocessableEntityError("refused", response=response, body=body)
    error = errors.from_relayed_upstream(exc, secret=UPSTREAM_KEY)
    assert isinstance(error, errors.UpstreamRejected)
    assert (error.status, error.param) == (422, "tools[0]")
    assert UPSTREAM_KEY not in error.message and "Bearer ***" in error.message
    assert "\x00" not in error.message and "\x1b" not in error.message
    assert len(error.message) < errors.MAX_QUOTED_MESSAGE + 100
    # the server's own key and the provider's limits stay the server's errors
    for status, cls in ((401, errors.UpstreamAuthFailed), (429, errors.UpstreamRateLimited)):
        response = httpx2.Response(status, request=request, json={"error": body})
        made = {401: openai.AuthenticationError, 429: openai.RateLimitError}[status](
            "x", response=response, body=body
        )
        assert type(errors.from_relayed_upstream(made, secret=UPSTREAM_KEY)) is cls


async def test_relay_retries_before_the_first_byte_and_fails_cleanly_after(start_server):
    server = await start_server(UPSTREAM_RETRIES="1")
    fake = server.fake
    await queue_faults(fake, {"status": 503})
    async with async_client(server) as client:
        completion = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "again"}]
        )
        assert completion.choices[0].message.content == "echo(1): again"
        assert len(fake.requests) == 2  # refused once, retried once
        # broken off mid-answer: the pieces that came, then the SDK's APIError
        await queue_faults(fake, {"disconnect_after": 2}, {"disconnect_after": 2})
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "a b c d e"}], stream=True
        )
        got = []
        with pytest.raises(openai.APIError) as broken:
            async for chunk in stream:
                got.append(chunk.choices[0].delta.content or "")
        assert "".join(got) == "echo(1): a"
        assert broken.value.body["code"] == errors.UpstreamError.code
    assert len(fake.requests) == 3  # not retried once the answer had begun


async def test_relay_stall_is_an_upstream_timeout(start_server):
    server = await start_server(UPSTREAM_IDLE_TIMEOUT="0.5")
    async with async_client(server) as client:
        with trio.fail_after(5), pytest.raises(openai.APIError) as stalled:
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "a b c [[fake:stall_after=1]]"}],
                stream=True,
            )
            async for _ in stream:
                pass
    assert stalled.value.body["code"] == errors.UpstreamTimeout.code


async def test_client_gone_mid_relay_closes_the_upstream_call(server):
    fake = server.fake
    body = {
        "model": MODEL,
        "stream": True,
        "messages": [{"role": "user", "content": "[[fake:tokens=500]] [[fake:delay=0.01]]"}],
    }
    async with server.client() as http:
        with trio.fail_after(5):
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if '"content":"echo' in line:
                        break
    rid = fake.requests[-1]["id"]
    await wait_until(lambda: "disconnected" in events_of(fake, rid))
    assert [e["chunks"] for e in fake.events if e["id"] == rid][-1] < 500


async def test_relay_asks_are_accounted_with_protocol_openai(server):
    with capture_access() as access:
        async with async_client(server) as client:
            response = await client.chat.completions.with_raw_response.create(
                model=MODEL,
                messages=[{"role": "user", "content": "count me"}],
                extra_headers={"X-Request-Id": "relay-request-1"},
            )
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "and me"}], stream=True
            )
            async for _ in stream:
                pass
        lines = await access.wait_for(2)
    assert response.headers["x-request-id"] == "relay-request-1"
    assert response.parse().choices[0].message.content == "echo(1): count me"
    for line in lines:
        check_access_line(line)
        assert (line["protocol"], line["conversation_id"], line["outcome"]) == ("openai", "-", "ok")
    assert lines[0]["request_id"] == "relay-request-1"
    # the provider's usage: 2 words + 4 prompt tokens, 3 answer tokens
    assert [(line["prompt_tokens"], line["completion_tokens"]) for line in lines] == [(6, 3)] * 2
    async with server.client() as http:
        text = await scrape(http)
    assert metric(text, "easybackend_asks_total", protocol="openai", outcome="ok") == 2


# -- conversation mode


async def test_conversation_in_the_body_remembers_history_and_stores_turns(server):
    fake = server.fake
    async with server.client() as http:
        await http.put("/conversations/c1/system", json={"prompt": "You are a cat."})
    async with async_client(server) as client:
        first = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "My name is Ada."}],
            extra_body={"conversation": "c1"},
        )
        second = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is my name?"}],
            max_completion_tokens=50,
            extra_body={"conversation": "c1"},
        )
    # the server sent the stored system prompt and the first turn with the new message
    assert upstream_messages(fake) == [
        {"role": "system", "content": "You are a cat."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "echo(2): My name is Ada."},
        {"role": "user", "content": "What is my name?"},
    ]
    assert sent(fake)["max_tokens"] == 50
    assert second.choices[0].message.content == "echo(4): What is my name?"
    assert second.object == "chat.completion" and second.choices[0].finish_reason == "stop"
    assert second.usage.total_tokens == second.usage.prompt_tokens + second.usage.completion_tokens
    async with server.client() as http:
        detail = (await http.get("/conversations/c1")).json()
    turns = detail["history"]
    assert [t["messages"][0]["text"] for t in turns] == ["My name is Ada.", "What is my name?"]
    assert [first.id, second.id] == [f"chatcmpl-{t['id']}" for t in turns]
    assert second.model_extra == {"conversation_id": "c1", "turn_id": turns[1]["id"]}


async def test_conversation_in_the_header_streams_and_remembers_with_the_sync_client(server):
    fake = server.fake
    with sync_client(server, default_headers={"X-Conversation-Id": "c2"}) as client:

        def ask(text: str) -> list:
            stream = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": text}],
                stream=True,
                stream_options={"include_usage": True},
            )
            return list(stream)

        first = await trio.to_thread.run_sync(ask, "red")
        second = await trio.to_thread.run_sync(ask, "and blue")
    assert [(m["role"], m["content"]) for m in upstream_messages(fake)] == [
        ("user", "red"),
        ("assistant", "echo(1): red"),
        ("user", "and blue"),
    ]
    *answer, finish, usage = second
    assert answer[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in answer) == "echo(3): and blue"
    assert finish.choices[0].finish_reason == "stop"
    assert usage.choices == [] and usage.usage.completion_tokens > 0
    assert len({chunk.id for chunk in second}) == 1 and second[0].id.startswith("chatcmpl-")
    async with server.client() as http:
        turns = (await http.get("/conversations/c2")).json()["history"]
    assert finish.model_extra == {"conversation_id": "c2", "turn_id": turns[1]["id"]}
    assert [t["messages"][1]["text"] for t in turns] == ["echo(1): red", "echo(3): and blue"]
    assert first[-1].usage is not None


async def test_conversation_system_messages_several_prompts_and_branches(server):
    fake = server.fake
    async with async_client(server) as client:
        first = await client.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "developer", "content": "Answer in French."},
                {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
                {"role": "user", "content": "How are you?"},
            ],
            extra_body={"conversation": "c3"},
        )
        # this turn's system prompt, and the user messages as one prompt
        assert upstream_messages(fake) == [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hello\n\nHow are you?"},
        ]
        await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "two"}],
            extra_body={"conversation": "c3"},
        )
        # a branch: the answer after the first turn, not after the head
        turn_id = first.model_extra["turn_id"]
        await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "two, again"}],
            extra_body={"conversation": "c3", "parent_id": turn_id},
        )
    assert [m["content"] for m in upstream_messages(fake)] == [
        "Hello\n\nHow are you?",
        "echo(2): Hello\n\nHow are you?",
        "two, again",
    ]


@pytest.mark.parametrize(
    ("messages", "extra", "param"),
    [
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            {},
            "messages[0].content[0]",
        ),
        (
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "again"},
            ],
            {},
            "messages[1]",
        ),
        ([{"role": "tool", "tool_call_id": "c", "content": "x"}], {}, "messages[0].role"),
        ([{"role": "user", "content": "hi"}], {"tools": TOOLS}, "tools"),
        ([{"role": "user", "content": "hi"}], {"n": 2}, "n"),
        ([{"role": "system", "content": "only a system"}], {}, "messages"),
        ([{"role": "user", "content": "hi"}], {"conversation": "not/valid"}, "conversation"),
        ([{"role": "user", "content": "hi"}], {"parent_id": "no-such-turn"}, None),
    ],
)
async def test_conversation_mode_refuses_what_a_turn_cannot_hold(server, messages, extra, param):
    body = {"conversation": "c4", **extra}
    async with async_client(server) as client:
        expected = openai.NotFoundError if "parent_id" in extra else openai.BadRequestError
        with pytest.raises(expected) as refused:
            await client.chat.completions.create(model=MODEL, messages=messages, extra_body=body)
    error = refused.value.body
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert error["code"] in (errors.InvalidInput.code, errors.NotFound.code)
    assert not server.fake.requests  # refused before any upstream call


async def test_conversation_mode_takes_nulls_and_fields_that_ask_for_nothing(server):
    # what SDKs and apps send by default (null, no tools, plain text) is no reason to refuse
    extra = {
        "conversation": "c5",
        "n": None,
        "seed": None,
        "tools": [],
        "tool_choice": "none",
        "response_format": {"type": "text"},
    }
    async with async_client(server) as client:
        answer = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], top_p=0.5, extra_body=extra
        )
        with pytest.raises(openai.BadRequestError):  # out of range: refused by the core
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], top_p=2, extra_body=extra
            )
    assert answer.choices[0].message.content == "echo(1): hi"
    sent_body = sent(server.fake)
    assert sent_body["top_p"] == 0.5 and len(server.fake.requests) == 1
    assert not {"tools", "tool_choice", "response_format", "seed", "n"} & set(sent_body)


# MODELS with aliases, GPT_ENGINE one of them: what an ask names is not what the provider is called
ALIASES = {"GPT_ENGINE": "fast", "MODELS": "fast=fake-fast-model,slow=fake-slow-model"}


async def test_conversation_mode_names_the_provider_model_in_every_chunk(start_server):
    """The chunks name the model the provider is called with (an alias's, the default's, the
    conversation's own), from the first one on, as the whole answer and the stored turn do."""
    server = await start_server(**ALIASES)
    async with server.client() as http:
        await http.put("/conversations/own/settings", json={"model": "slow"})
    cases = [  # (model named, conversation, the provider model)
        ("slow", "named", "fake-slow-model"),
        (openai.NOT_GIVEN, "default", "fake-fast-model"),
        (openai.NOT_GIVEN, "own", "fake-slow-model"),
    ]
    async with async_client(server) as client:
        for model, conversation, provider_model in cases:
            asked = {"messages": [{"role": "user", "content": "hi"}], "model": model}
            stream = await client.chat.completions.create(
                **asked,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"conversation": conversation},
            )
            chunks = [chunk async for chunk in stream]
            whole = await client.chat.completions.create(
                **asked, extra_body={"conversation": conversation}
            )
            assert sent(server.fake)["model"] == provider_model
            assert [c.model for c in chunks] == [provider_model] * len(chunks), conversation
            assert whole.model == provider_model, conversation


async def test_the_body_and_the_header_must_name_the_same_conversation(server):
    async with async_client(server) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "hi"}],
                extra_body={"conversation": "a"},
                extra_headers={"X-Conversation-Id": "b"},
            )
    assert refused.value.body["param"] == "conversation"


# -- errors and limits


async def test_a_wrong_key_is_an_authentication_error_and_is_accounted(start_server):
    server = await start_server(API_KEYS=f"app:{KEY}")
    with capture_access() as access:
        async with async_client(server, key="sk-wrong-SECRET-2222") as client:
            with pytest.raises(openai.AuthenticationError) as denied:
                await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}]
                )
            with pytest.raises(openai.AuthenticationError):
                await client.models.list()
        (line,) = await access.wait_for(1)
    assert denied.value.body["type"] == "authentication_error"
    assert denied.value.body["code"] == errors.Unauthenticated.code
    assert denied.value.response.headers["www-authenticate"].startswith("Bearer")
    assert (line["protocol"], line["outcome"]) == ("openai", errors.Unauthenticated.code)
    assert not server.fake.requests
    async with async_client(server, key=KEY) as client:
        completion = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"conversation": "k"},
        )
    assert completion.choices[0].message.content == "echo(1): hi"
    async with server.client(headers=bearer(KEY)) as http:  # the key's own namespace
        assert (await http.get("/conversations/k")).status_code == 200


async def test_too_many_answers_and_the_providers_429_are_rate_limit_errors(start_server):
    server = await start_server(MAX_STREAMS_PER_KEY="1")
    slow = [{"role": "user", "content": "[[fake:tokens=400]] [[fake:delay=0.01]]"}]
    async with async_client(server) as client:
        stream = await client.chat.completions.create(model=MODEL, messages=slow, stream=True)
        async with stream:
            await anext(stream.__aiter__())  # one answer in progress
            for extra in ({}, {"extra_body": {"conversation": "busy"}}):
                with pytest.raises(openai.RateLimitError) as limited:
                    await client.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": "me too"}], **extra
                    )
                assert limited.value.body["code"] == errors.TooManyRequests.code
        await queue_faults(server.fake, {"status": 429, "retry_after": 60})
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}]
            )
    assert limited.value.body["code"] == errors.UpstreamRateLimited.code
    assert limited.value.body["type"] == "rate_limit_error"


async def test_errors_under_v1_are_in_openais_shape(server):
    async with server.client() as http:
        for method, path, status in (
            ("GET", "/v1/no-such-route", 404),
            ("GET", "/v1/chat/completions", 405),
            ("POST", "/v1/chat/completions", 400),  # not JSON
        ):
            reply = await http.request(method, path, content=b"{nope")
            assert reply.status_code == status, (path, reply.text)
            error = reply.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, error
            assert error["type"] == "invalid_request_error"
        reply = await http.post("/v1/chat/completions", json={"messages": []})
        assert reply.json()["error"]["param"] == "messages"
        # the native routes keep their own shape
        reply = await http.get("/conversations/nope")
        assert set(reply.json()["error"]) == {"code", "message"}


async def test_the_shutdown_grace_ends_a_relayed_stream_with_an_error_event(start_server):
    server = await start_server(SHUTDOWN_GRACE="0.5")
    fake = server.fake
    long = [{"role": "user", "content": "[[fake:tokens=2000]] [[fake:delay=0.01]]"}]
    async with async_client(server) as client:
        stream = await client.chat.completions.create(model=MODEL, messages=long, stream=True)
        chunks = 0
        with trio.fail_after(10), pytest.raises(openai.APIError) as cut:
            async for _ in stream:
                chunks += 1
                if chunks == 3:
                    server.shutdown.set()  # the grace ends 0.5 s later, mid-answer
    assert cut.value.body["code"] == errors.ShuttingDown.code
    assert cut.value.body["type"] == "service_unavailable_error"
    rid = fake.requests[-1]["id"]
    await wait_until(lambda: "disconnected" in events_of(fake, rid))  # the upstream call closed


async def test_the_role_chunk_goes_out_with_the_first_token(server):
    """The chunk that only names the role is held until the first output, then both are sent in
    one write (the fake sends it at once, the first token 0.3 s later)."""
    body = {
        "model": MODEL,
        "stream": True,
        "messages": [{"role": "user", "content": "a b [[fake:delay=0.3]]"}],
    }
    async with server.client() as http:
        with trio.fail_after(5):
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                first = b""
                async for part in response.aiter_raw():
                    first += part
                    if first.endswith(b"\n\n"):
                        break
    events = first.decode().split("\n\n")[:-1]
    assert len(events) == 2, events
    assert '"role":"assistant"' in events[0] and '"content":"echo(1):"' in events[1]
