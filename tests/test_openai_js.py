"""The official OpenAI JavaScript SDK (npm ``openai``, pinned in tests/js) against a live server.

``tests/js/chat.mjs`` streams a chat completion through the relay, keeps a
conversation by the body field and by the header, and checks the SDK's typed
errors; it prints what it got, and this test checks that and what the fake
upstream received. It needs Node.js and the SDK installed with
``npm ci --prefix tests/js`` (the README's test command and CI do it): without
``node`` the test is skipped, saying so; with node but without the SDK it
fails with the command to run.
"""

from __future__ import annotations

import pytest
from helpers.js_sdk import NODE, run_script
from helpers.openai_sdk import base_url
from helpers.upstream import upstream_messages

from easybackend import errors

KEY = "js-client-SECRET-3333"

pytestmark = pytest.mark.skipif(
    NODE is None, reason="Node.js (node) is not installed: the JavaScript SDK tests need it"
)


async def test_the_javascript_sdk_streams_keeps_conversations_and_raises_typed_errors(
    start_server,
):
    server = await start_server(API_KEYS=f"js:{KEY}")
    model = server.settings.model
    got = await run_script(
        "chat.mjs",
        {
            "EASYBACKEND_BASE_URL": base_url(server),
            "EASYBACKEND_KEY": KEY,
            "EASYBACKEND_MODEL": model,
        },
    )
    fake = server.fake
    relay = got["relay"]
    assert relay["text"] == "echo(1): hello from js"
    assert relay["ids"] == [fake.requests[0]["id"]]  # the provider's chunks, passed through
    assert relay["usage"]["completion_tokens"] == 4
    # the conversation in the body: the server sent the first turn with the second prompt
    body = got["body"]
    assert body["first"] == "echo(1): my colour is green"
    assert [f"chatcmpl-{turn}" for turn in body["turn_ids"]] == body["ids"]
    assert [(m["role"], m["content"]) for m in upstream_messages(fake, 2)] == [
        ("user", "my colour is green"),
        ("assistant", "echo(1): my colour is green"),
        ("user", "what is my colour?"),
    ]
    # the conversation in the header, streamed: one id per answer, the history remembered
    first, second = got["header"]
    assert first["text"] == "echo(1): one" and second["finish"] == "stop"
    assert len(second["ids"]) == 1 and second["usage"] is None  # no usage unless asked
    assert [m["content"] for m in upstream_messages(fake, 4)] == ["one", "echo(1): one", "two"]
    assert got["not_found"]["code"] == errors.NotFound.code
    assert got["bad_request"]["param"] == "messages[0].content[0]"
    assert got["models"] == [model]
    assert len(fake.requests) == 5  # the refused image part never went upstream


async def test_the_javascript_sdk_chains_responses_and_keeps_a_conversation(start_server):
    """``tests/js/responses.mjs``: a previous_response_id chain (streamed at its end), a
    branch, a conversation made with items and continued by a response, typed errors."""
    server = await start_server(API_KEYS=f"js:{KEY}")
    got = await run_script(
        "responses.mjs",
        {
            "EASYBACKEND_BASE_URL": base_url(server),
            "EASYBACKEND_KEY": KEY,
            "EASYBACKEND_MODEL": server.settings.model,
        },
    )
    fake = server.fake
    chain = got["chain"]
    assert chain["texts"] == [
        "echo(1): my name is Ada",
        "echo(3): what is my name?",
        "echo(5): and again?",
    ]
    assert len(set(chain["conversation"])) == 1 and chain["previous"] == chain["ids"][1]
    assert chain["kinds"][0] == "response.created" and chain["kinds"][-1] == "response.completed"
    assert chain["usage"]["output_tokens"] == 3
    assert [m["content"] for m in upstream_messages(fake, 2)] == [
        "my name is Ada",
        "echo(1): my name is Ada",
        "what is my name?",
        "echo(3): what is my name?",
        "and again?",
    ]
    assert got["branch"] == "echo(3): a branch"  # the first turn only, not the chain
    assert got["retrieved"] == chain["texts"][1]
    assert got["input_items"] == ["what is my name?"]
    conversation = got["conversation"]
    assert conversation["id"].startswith("conv_") and conversation["metadata"] == {"from": "js"}
    assert conversation["reply_conversation"] == conversation["id"]
    assert [(m["role"], m["content"]) for m in upstream_messages(fake)] == [
        ("system", "Be kind."),
        ("user", "hi"),
        ("assistant", "hello"),
        ("user", "one more"),
        ("user", "bye"),
    ]
    assert conversation["reply"] == "echo(5): bye"
    assert conversation["items"] == [
        ["system", "Be kind."],
        ["user", "hi"],
        ["assistant", "hello"],
        ["user", "one more"],
        ["user", "bye"],
        ["assistant", "echo(5): bye"],
    ]
    assert got["not_found"]["code"] == errors.NotFound.code
    assert got["bad_request"]["param"] == "input[0].content[0].type"
    assert len(fake.requests) == 5  # the refused image part never went upstream
