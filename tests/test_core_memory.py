"""Conversation memory: what the upstream receives on each ask (SPEC §3)."""

from __future__ import annotations

from helpers.database import stored_turns
from helpers.upstream import echo, history_of, upstream_messages


async def test_second_ask_carries_first_turn_in_order(server):
    async with server.client() as client:
        first = await client.post("/ask/mem-1", json={"prompt": "my name is Ada"})
        assert first.status_code == 200, first.text
        assert first.json()["response"] == echo(1, "my name is Ada")
        assert first.json()["conversation_id"] == "mem-1"
        assert first.json()["finish_reason"] == "stop"

        second = await client.post("/ask/mem-1", json={"prompt": "what is my name?"})
        assert second.status_code == 200, second.text

    assert upstream_messages(server.fake) == [
        {"role": "user", "content": "my name is Ada"},
        {"role": "assistant", "content": echo(1, "my name is Ada")},
        {"role": "user", "content": "what is my name?"},
    ]
    assert second.json()["response"] == echo(3, "what is my name?")
    turns = stored_turns(server.settings.sqlite_path, "mem-1")
    assert [(t["seq"], t["prompt"], t["answer"]) for t in turns] == [
        (1, "my name is Ada", echo(1, "my name is Ada")),
        (2, "what is my name?", echo(3, "what is my name?")),
    ]


async def test_third_ask_carries_both_turns_oldest_first(server):
    async with server.client() as client:
        for prompt in ("one", "two", "three"):
            response = await client.post("/ask/mem-3", json={"prompt": prompt})
            assert response.status_code == 200, response.text
    assert history_of(upstream_messages(server.fake)) == [
        ("one", echo(1, "one")),
        ("two", echo(3, "two")),
    ]
    assert upstream_messages(server.fake)[-1] == {"role": "user", "content": "three"}
    assert response.json()["response"] == echo(5, "three")


async def test_first_prompt_is_the_first_message_with_role_system(start_server):
    server = await start_server(FIRST_PROMPT="You are a terse pirate.")
    async with server.client() as client:
        for prompt in ("ahoy", "where is the treasure?"):
            response = await client.post("/ask/pirate", json={"prompt": prompt})
            assert response.status_code == 200, response.text

    first, second = (r["body"]["messages"] for r in server.fake.requests)
    assert first == [
        {"role": "system", "content": "You are a terse pirate."},
        {"role": "user", "content": "ahoy"},
    ]
    assert second[0] == {"role": "system", "content": "You are a terse pirate."}
    assert [m["role"] for m in second].count("system") == 1
    assert history_of(second) == [("ahoy", echo(2, "ahoy"))]
    assert response.json()["response"] == echo(4, "where is the treasure?")


async def test_per_ask_system_field_replaces_first_prompt_for_that_turn_only(start_server):
    server = await start_server(FIRST_PROMPT="default system")
    async with server.client() as client:
        response = await client.post("/ask/sys", json={"prompt": "a", "system": "special"})
        assert response.status_code == 200, response.text
        response = await client.post("/ask/sys", json={"prompt": "b"})
        assert response.status_code == 200, response.text
    assert upstream_messages(server.fake, 0)[0] == {"role": "system", "content": "special"}
    assert upstream_messages(server.fake, 1)[0] == {"role": "system", "content": "default system"}


async def test_two_conversations_never_mix(server):
    async with server.client() as client:
        for round_ in range(3):
            for cid in ("left", "right"):
                response = await client.post(f"/ask/{cid}", json={"prompt": f"{cid} {round_}"})
                assert response.status_code == 200, response.text
                assert response.json()["response"] == echo(2 * round_ + 1, f"{cid} {round_}")

    for request in server.fake.requests:
        messages = request["body"]["messages"]
        owner = messages[-1]["content"].split()[0]
        other = "right" if owner == "left" else "left"
        assert all(other not in m["content"] for m in messages), messages

    db = server.settings.sqlite_path
    for cid in ("left", "right"):
        assert [t["prompt"] for t in stored_turns(db, cid)] == [f"{cid} {i}" for i in range(3)]


async def test_multiline_prompt_with_dollars_and_blank_lines_passes_through_unchanged(server):
    prompt = "line 1\n\n$HOME costs $5\n\n\nend $"
    async with server.client() as client:
        response = await client.post("/ask/dollars", json={"prompt": prompt})
        assert response.status_code == 200, response.text
        assert response.json()["response"] == echo(1, prompt)
        follow_up = await client.post("/ask/dollars", json={"prompt": "  \n$ again\n\n"})
        assert follow_up.status_code == 200, follow_up.text
        assert follow_up.json()["response"] == echo(3, "  \n$ again\n\n")

    assert upstream_messages(server.fake, 0) == [{"role": "user", "content": prompt}]
    assert history_of(upstream_messages(server.fake)) == [(prompt, echo(1, prompt))]
    assert [t["prompt"] for t in stored_turns(server.settings.sqlite_path, "dollars")] == [
        prompt,
        "  \n$ again\n\n",
    ]


async def test_strip_blank_lines_option_drops_blank_lines(start_server):
    server = await start_server(STRIP_BLANK_LINES="true")
    async with server.client() as client:
        response = await client.post("/ask/strip", json={"prompt": "a\n\n  \nb $c\n\n"})
        assert response.status_code == 200, response.text
    assert upstream_messages(server.fake) == [{"role": "user", "content": "a\nb $c"}]
