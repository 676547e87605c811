"""Memory beyond the window over HTTP (SPEC §15): summaries, settings per conversation, titles.

The fake upstream echoes the last user message, so a summary call's answer is
the material it was given (the summary so far and the turns folded in), and a
summary's content can be followed from the turn it came from to the asks that
carry it.
"""

from __future__ import annotations

import pytest
import trio
from helpers.http import error_code
from helpers.logs import capture_access, metric, scrape
from helpers.memory import (
    ask_requests,
    summary_message,
    summary_of,
    summary_requests,
    title_requests,
    wait_for_summary,
)
from helpers.postgres import pg_url
from helpers.servers import free_port
from helpers.upstream import ALLOW_OTHER_MODEL, OTHER_MODEL, echo, queue_faults
from helpers.waiting import wait_until
from helpers.websocket import ws_json_ask

from easybackend.chat.memory import DEFAULT_SUMMARY_PROMPT, DEFAULT_TITLE_PROMPT
from easybackend.settings import DEFAULT_MODEL

FILLER = "lorem ipsum dolor sit amet " * 6
# A small window, so that a few turns fill it; summaries of at most 150 tokens.
SMALL = {"MAX_CONTEXT_TOKENS": "400", "SUMMARY_MAX_TOKENS": "150"}


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request) -> dict[str, str]:
    """The server's database: the SQLite default, or a schema of the local PostgreSQL."""
    if request.param == "sqlite":
        return {}
    return {"DATABASE_URL": pg_url(request.getfixturevalue("pg_schema"))}


async def ask(client, conversation_id: str, prompt: str, **extra) -> dict:
    reply = await client.post(f"/ask/{conversation_id}", json={"prompt": prompt, **extra})
    assert reply.status_code == 200, reply.text
    return reply.json()


def texts(messages: list[dict[str, str]], *roles: str) -> list[str]:
    return [m["content"] for m in messages if m["role"] in roles]


def last_ask(fake) -> list[dict[str, str]]:
    return ask_requests(fake)[-1]["body"]["messages"]


async def test_the_first_turn_reaches_the_model_through_the_summary_once_it_no_longer_fits(
    start_server, backend
):
    server = await start_server(MEMORY="summarize", **SMALL, **backend)
    async with server.client() as client:
        first = await ask(client, "long", "my secret word is zebra42")
        for number in range(8):
            await ask(client, "long", f"filler {number} {FILLER}")
        found = await wait_for_summary(client, "long")
        await ask(client, "long", "what is my secret word?")
        body = (await client.get("/conversations/long")).json()

    messages = last_ask(server.fake)
    # the raw first turn no longer fits the window...
    assert not any("zebra42" in text for text in texts(messages, "user", "assistant"))
    assert len(texts(messages, "user")) < 9
    # ...but its content reaches the model through the summary, a system message after none
    summary = summary_message(messages)
    assert summary is not None and "zebra42" in summary
    assert [m["role"] for m in messages[:2]] == ["system", "user"]
    # the summary was written by the model from the turn itself
    folded = summary_requests(server.fake)[0]["body"]["messages"]
    assert folded[0] == {"role": "system", "content": DEFAULT_SUMMARY_PROMPT}
    assert "User: my secret word is zebra42" in folded[1]["content"]
    assert found["covers"] >= 1 and found["model"] == DEFAULT_MODEL
    assert body["history"][0]["id"] == first["turn_id"]  # nothing was deleted
    # the kept turns are those after the turn the summary ends at, oldest first, up to the prompt
    kept = texts(messages, "user")[:-1]
    path = [turn["messages"][0]["text"] for turn in body["history"]]
    assert kept == path[len(path) - 1 - len(kept) : -1]


async def test_an_edited_summary_is_sent_as_edited(start_server):
    server = await start_server(MEMORY="summarize")
    async with server.client() as client:
        await ask(client, "edit", "my name is Ada")
        second = await ask(client, "edit", "I like tea")
        edited = await client.put(
            "/conversations/edit/summary", json={"summary": "The user is Ada; she likes tea."}
        )
        assert edited.status_code == 200, edited.text
        assert await summary_of(client, "edit") == edited.json()
        await ask(client, "edit", "what do I like?")

    assert edited.json()["summary"] == "The user is Ada; she likes tea."
    assert edited.json()["model"] is None  # given, not written by a model
    # with no summary yet, the edited one covers the path to the head
    assert edited.json()["covers"] == 2 and edited.json()["through"] == second["turn_id"]
    assert last_ask(server.fake) == [
        {
            "role": "system",
            "content": "Summary of the earlier part of this conversation:\n"
            "The user is Ada; she likes tea.",
        },
        {"role": "user", "content": "what do I like?"},
    ]
    assert summary_requests(server.fake) == []  # no model call made it


async def test_compact_folds_the_path_now_and_is_accounted(start_server, backend):
    server = await start_server(MEMORY="summarize", **backend)
    async with server.client() as client:
        for prompt in ("one", "two", "three"):
            await ask(client, "cp", prompt)
        before = (await client.get("/conversations/cp")).json()["usage"]
        key_before = (await client.get("/usage")).json()["total"]
        with capture_access() as access:
            compacted = await client.post("/conversations/cp/compact", json={"keep": 1})
            assert compacted.status_code == 200, compacted.text
            line = (await access.wait_for(1))[0]
        after = (await client.get("/conversations/cp")).json()["usage"]
        key_after = (await client.get("/usage")).json()["total"]
        text = await scrape(client)
        await ask(client, "cp", "four")
        again = await client.post("/conversations/cp/compact")  # no body: keep nothing
        assert again.status_code == 200, again.text

    material = summary_requests(server.fake)[0]["body"]["messages"][1]["content"]
    assert "User: one" in material and "User: two" in material and "three" not in material
    assert compacted.json()["covers"] == 2
    assert compacted.json()["summary"] == echo(2, material)
    # the next ask sends the summary, then the turn it left out, then the prompt
    messages = last_ask(server.fake)
    assert summary_message(messages) == echo(2, material)
    assert texts(messages, "user") == ["three", "four"]
    assert again.json()["covers"] == 4
    # its own access line and metrics, and its tokens in the conversation's usage
    assert line["protocol"] == "summary" and line["outcome"] == "ok"
    assert line["conversation_id"] == "cp" and line["completion_tokens"] > 0
    assert metric(text, "easybackend_asks_total", protocol="summary", outcome="ok") == 1
    assert after["completion_tokens"] == before["completion_tokens"] + line["completion_tokens"]
    assert after["prompt_tokens"] == before["prompt_tokens"] + line["prompt_tokens"]
    # and in the key's usage (keys off here: the usage of every ask), as one more request
    assert key_after["requests"] == key_before["requests"] + 1
    assert (
        key_after["total_tokens"]
        == key_before["total_tokens"] + after["total_tokens"] - (before["total_tokens"])
    )


async def test_summaries_need_memory_summarize_and_a_turn(server):
    async with server.client() as client:
        await ask(client, "tr", "hello")
        compact = await client.post("/conversations/tr/compact", json={})
        edit = await client.put("/conversations/tr/summary", json={"summary": "x"})
        empty = await client.put("/conversations/new/settings", json={"memory": "summarize"})
        nothing = await client.post("/conversations/new/compact", json={})
        unknown = await client.get("/conversations/nobody/summary")
        none_yet = await summary_of(client, "tr")

    assert compact.status_code == 400 and "summarize" in compact.json()["error"]["message"]
    assert edit.status_code == 400
    assert empty.status_code == 200 and nothing.status_code == 400
    assert unknown.status_code == 404 and error_code(unknown) == "not_found"
    assert none_yet == {
        "conversation_id": "tr",
        "summary": None,
        "covers": 0,
        "through": None,
        "model": None,
        "updated_at": None,
    }


async def test_a_branch_sends_the_summary_of_its_own_path(start_server):
    server = await start_server(MEMORY="summarize")
    async with server.client() as client:
        one = await ask(client, "tree", "one")
        two = await ask(client, "tree", "two")
        three = await ask(client, "tree", "three")
        compacted = await client.post("/conversations/tree/compact", json={"keep": 1})
        await ask(client, "tree", "after one", parent_id=one["turn_id"])  # a branch from one
        from_branch = last_ask(server.fake)
        on_branch = await summary_of(client, "tree")  # the head is on the branch now
        await ask(client, "tree", "after two", parent_id=two["turn_id"])
        from_two = last_ask(server.fake)
        await client.put("/conversations/tree/head", json={"turn_id": three["turn_id"]})
        await ask(client, "tree", "after three")
        from_three = last_ask(server.fake)

    summary = compacted.json()
    assert summary["through"] == two["turn_id"] and summary["covers"] == 2
    # the summary ends at "two": the branch from "one" does not have it on its path
    assert summary_message(from_branch) is None and on_branch["summary"] is None
    assert texts(from_branch, "user") == ["one", "after one"]
    # a branch below "two" has it, and no raw turn it covers
    assert summary_message(from_two) == summary["summary"]
    assert texts(from_two, "user") == ["after two"]
    assert summary_message(from_three) == summary["summary"]
    assert texts(from_three, "user") == ["three", "after three"]


async def test_a_failing_summary_leaves_asks_working_and_is_tried_again(start_server, backend):
    server = await start_server(MEMORY="summarize", SUMMARY_MODEL="summarizer", **SMALL, **backend)
    await queue_faults(server.fake, {"status": 500, "model": "summarizer"})
    async with server.client() as client:
        with capture_access() as access:
            await ask(client, "flaky", "my secret word is zebra42")
            for number in range(8):
                await ask(client, "flaky", f"filler {number} {FILLER}")
            await wait_until(lambda: len(summary_requests(server.fake)) >= 2, timeout=10)
            found = await wait_for_summary(client, "flaky")
            await ask(client, "flaky", "still there?")
        lines = access.lines

    summaries = [line for line in lines if line["protocol"] == "summary"]
    assert summaries[0]["outcome"] == "upstream_error"  # the first call failed...
    assert any(line["outcome"] == "ok" for line in summaries[1:])  # ...a later turn retried it
    asks = [line for line in lines if line["protocol"] == "http"]
    assert len(asks) == 10 and all(line["outcome"] == "ok" for line in asks)
    assert all(r["body"]["model"] == "summarizer" for r in summary_requests(server.fake))
    assert found["model"] == "summarizer"
    assert "zebra42" in (summary_message(last_ask(server.fake)) or "")


async def test_a_failing_compact_answers_the_error_stores_nothing_and_asks_go_on(
    start_server, backend
):
    server = await start_server(MEMORY="summarize", SUMMARY_MODEL="summarizer", **backend)
    async with server.client() as client:
        for prompt in ("one", "two", "three"):
            await ask(client, "fc", prompt)
        usage_before = (await client.get("/conversations/fc")).json()["usage"]
        await queue_faults(server.fake, {"status": 500, "model": "summarizer"})
        with capture_access() as access:
            failed = await client.post("/conversations/fc/compact", json={"keep": 1})
            line = (await access.wait_for(1))[0]
        after_failure = await summary_of(client, "fc")
        usage_after = (await client.get("/conversations/fc")).json()["usage"]
        await ask(client, "fc", "four")
        sent_after_failure = last_ask(server.fake)
        again = await client.post("/conversations/fc/compact", json={"keep": 1})

    assert failed.status_code == 502, failed.text
    assert error_code(failed) == "upstream_error"
    assert line["protocol"] == "summary" and line["outcome"] == "upstream_error"
    assert after_failure["summary"] is None and after_failure["covers"] == 0
    assert usage_after == usage_before  # a failed call adds no tokens
    # the ask after it sends the turns, with no summary
    assert summary_message(sent_after_failure) is None
    assert texts(sent_after_failure, "user") == ["one", "two", "three", "four"]
    assert again.status_code == 200, again.text
    assert again.json()["covers"] == 3


async def test_a_summary_in_progress_holds_its_conversation_and_no_other(start_server):
    server = await start_server(SUMMARY_MODEL="summarizer", UPSTREAM_IDLE_TIMEOUT="3", **SMALL)
    async with server.client() as client:
        for number in range(8):  # under truncate: turns left out, no summary yet
            await ask(client, "busy", f"filler {number} {FILLER}")
        await queue_faults(server.fake, {"stall_after": 0, "model": "summarizer"})
        summarize = await client.put("/conversations/busy/settings", json={"memory": "summarize"})
        assert summarize.status_code == 200
        await ask(client, "busy", "the turn that makes a summary due")
        # the summary call has started and stalls, holding the conversation
        await wait_until(lambda: any(e["event"] == "stalled" for e in server.fake.events), 10)
        stalled = summary_requests(server.fake)[0]["id"]
        answered = trio.Event()

        async def ask_the_busy_one() -> None:
            await ask(client, "busy", "after the summary")
            answered.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask_the_busy_one)
            # another conversation does not wait for it
            with trio.fail_after(2):
                await ask(client, "other", "hello")
                await ask(client, "other", "again")
            assert not answered.is_set()  # this one waits: the summary had started
            assert [e["event"] for e in server.fake.events if e["id"] == stalled] == [
                "started",
                "stalled",
            ]
            with trio.fail_after(10):
                await answered.wait()  # the summary timed out, the ask went on

    events = [e["event"] for e in server.fake.events if e["id"] == stalled]
    assert events[-1] == "disconnected"  # the summary call was given up before the ask ran


async def test_settings_apply_to_the_asks_of_the_conversation(start_server):
    server = await start_server(**ALLOW_OTHER_MODEL, WS_PORT=str(free_port()))
    async with server.client() as client:
        settings = await client.put(
            "/conversations/own/settings",
            json={"model": OTHER_MODEL, "temperature": 0.1, "system": "Answer in French."},
        )
        assert settings.status_code == 200, settings.text
        await ask(client, "own", "hello")
        await ask(client, "own", "again", temperature=1.5, model=DEFAULT_MODEL)  # per ask wins
        await ask(client, "plain", "hello")
        body = (await client.get("/conversations/own")).json()
        replies = await ws_json_ask(
            server.running.ws_port, {"conversation_id": "own", "prompt": "over the websocket"}
        )
        assert replies[-1]["type"] == "end", replies

    own, override, plain, websocket = (r["body"] for r in server.fake.requests)
    assert (own["model"], own["temperature"]) == (OTHER_MODEL, 0.1)
    assert own["messages"][0] == {"role": "system", "content": "Answer in French."}
    assert (override["model"], override["temperature"]) == (DEFAULT_MODEL, 1.5)
    assert (plain["model"], plain["temperature"]) == (DEFAULT_MODEL, 0.5)
    assert (websocket["model"], websocket["temperature"]) == (OTHER_MODEL, 0.1)
    assert body["settings"] == {
        "model": OTHER_MODEL,
        "temperature": 0.1,
        "max_context_tokens": None,
        "memory": None,
        "system": "Answer in French.",
        "title": None,
        "expires_in": None,
    }
    assert settings.json() == {"conversation_id": "own", "settings": body["settings"]}
    assert body["system_prompt"] == "Answer in French."
    assert [turn["model"] for turn in body["history"]] == [OTHER_MODEL, DEFAULT_MODEL]


async def test_a_conversation_budget_sends_fewer_turns(server):
    async with server.client() as client:
        for number in range(6):
            await ask(client, "small", f"turn {number} {FILLER}")
            await ask(client, "large", f"turn {number} {FILLER}")
        changed = await client.put(
            "/conversations/small/settings", json={"max_context_tokens": 200}
        )
        assert changed.status_code == 200, changed.text
        await ask(client, "small", "last")
        await ask(client, "large", "last")

    small, large = (r["body"]["messages"] for r in server.fake.requests[-2:])
    assert 1 < len(small) < len(large) == 13


async def test_settings_are_a_partial_update_and_checked(server):
    async with server.client() as client:
        created = await client.put("/conversations/set/settings", json={"title": "  My   trip "})
        put = await client.put("/conversations/set/settings", json={"temperature": 0.2})
        cleared = await client.put("/conversations/set/settings", json={"title": None})
        read = (await client.get("/conversations/set")).json()
        refusals = [
            await client.put("/conversations/set/settings", json=body)
            for body in (
                {"max_context_tokens": 4097},  # above MAX_CONTEXT_TOKENS
                {"max_context_tokens": 3},
                {"memory": "forget"},
                {"temperature": 3},
                {"expires_in": -1},
                {"model": OTHER_MODEL},  # not in MODELS
                {"colour": "blue"},
                {"title": "x" * 201},
                {"system": "a\x00b"},
            )
        ]
        after = (await client.get("/conversations/set")).json()

    assert created.status_code == 200 and created.json()["settings"]["title"] == "My trip"
    assert put.json()["settings"]["title"] == "My trip"  # kept: only temperature was sent
    assert put.json()["settings"]["temperature"] == 0.2
    assert cleared.json()["settings"]["title"] is None
    assert read["turns"] == 0 and read["history"] == []  # created empty, as PUT …/system does
    assert [r.status_code for r in refusals] == [400, 400, 400, 400, 400, 403, 400, 400, 400]
    assert error_code(refusals[5]) == "model_not_allowed"
    assert after["settings"] == read["settings"]  # nothing refused was written


async def test_titles_are_set_listed_and_generated_after_the_first_turn(start_server):
    server = await start_server(AUTO_TITLE="true")
    async with server.client() as client:
        given = await client.put("/conversations/named/settings", json={"title": "Given"})
        assert given.status_code == 200
        with capture_access() as access:
            await ask(client, "named", "hello there")
            await ask(client, "untitled", "你好，今天天气怎么样？")
            await wait_until(lambda: len(title_requests(server.fake)) == 1, timeout=10)
            await access.wait_for(3)
            listed = {
                c["conversation_id"]: c["title"]
                for c in (await client.get("/conversations")).json()["conversations"]
            }
            while listed.get("untitled") is None:
                await trio.sleep(0.02)
                listed = {
                    c["conversation_id"]: c["title"]
                    for c in (await client.get("/conversations")).json()["conversations"]
                }
            await ask(client, "untitled", "second turn")
        lines = access.lines

    named = title_requests(server.fake)[0]["body"]
    assert named["messages"][0] == {"role": "system", "content": DEFAULT_TITLE_PROMPT}
    assert named["messages"][1]["content"].startswith("User: 你好，今天天气怎么样？\nAssistant: ")
    assert named["max_tokens"] <= 24
    title = listed["untitled"]
    assert title == echo(2, "User: 你好，今天天气怎么样？") and "\n" not in title
    assert listed["named"] == "Given"  # a title a client set is never replaced
    assert len(title_requests(server.fake)) == 1  # after the first turn only
    assert [line["protocol"] for line in lines].count("title") == 1
