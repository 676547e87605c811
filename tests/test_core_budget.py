"""The context budget: MAX_CONTEXT_TOKENS, MAX_RESPONSE_TOKENS and prompt_too_long (SPEC §3)."""

from __future__ import annotations

import tiktoken
from helpers.database import stored_turns
from helpers.http import error_code
from helpers.upstream import history_of, upstream_messages

from easybackend.chat.tokens import load_encoding

# Counted independently of the server: tiktoken's own o200k_base (the encoding of the
# default model) and the chat framing the budget rule is written in (4 per message, 3 to
# prime the reply).
load_encoding("o200k_base")  # puts the bundled vocabulary where tiktoken looks: no download
ENCODING = tiktoken.get_encoding("o200k_base")
PER_MESSAGE, PRIMING = 4, 3


def cost(messages: list[dict[str, str]]) -> int:
    return sum(len(ENCODING.encode(m["content"])) + PER_MESSAGE for m in messages) + PRIMING


def turn_cost(prompt: str, answer: str) -> int:
    return len(ENCODING.encode(prompt)) + len(ENCODING.encode(answer)) + 2 * PER_MESSAGE


def prompt_of(i: int) -> str:
    return f"turn {i}: the quick brown fox jumps over the lazy dog number {i}"


async def ask_turns(server, cid: str, count: int, **fields) -> list[str]:
    prompts = [prompt_of(i) for i in range(count)]
    async with server.client() as client:
        for prompt in prompts:
            response = await client.post(f"/ask/{cid}", json={"prompt": prompt, **fields})
            assert response.status_code == 200, response.text
    return prompts


def check_newest_turns_that_fit(server, cid: str, available: int) -> int:
    """The last request holds the newest whole turns that fit, and no more; returns how many."""
    messages = upstream_messages(server.fake)
    kept = history_of(messages)
    stored = [(t["prompt"], t["answer"]) for t in stored_turns(server.settings.sqlite_path, cid)]
    previous = stored[:-1]  # the turns that existed when the last ask was sent
    assert kept == previous[len(previous) - len(kept) :], "not the newest turns, in order"
    assert cost(messages) <= available
    if len(kept) < len(previous):
        older = previous[len(previous) - len(kept) - 1]
        assert cost(messages) + turn_cost(*older) > available, "an older turn would still fit"
    return len(kept)


async def test_oldest_whole_turns_are_dropped_first(start_server):
    server = await start_server(MAX_CONTEXT_TOKENS="200")
    prompts = await ask_turns(server, "budget", 8)

    messages = upstream_messages(server.fake)
    assert messages[-1] == {"role": "user", "content": prompts[-1]}
    kept = check_newest_turns_that_fit(server, "budget", 200)
    assert 1 <= kept < 7, kept
    # every request along the way respected the budget and kept whole pairs
    for request in server.fake.requests:
        assert cost(request["body"]["messages"]) <= 200
        history_of(request["body"]["messages"])
    # nothing is forgotten in storage: only the request is trimmed
    assert len(stored_turns(server.settings.sqlite_path, "budget")) == 8


async def test_system_prompt_is_never_dropped(start_server):
    system = "You answer in exactly one short sentence and never use emoji."
    server = await start_server(MAX_CONTEXT_TOKENS="200", FIRST_PROMPT=system)
    await ask_turns(server, "budget-sys", 8)

    for request in server.fake.requests:
        assert request["body"]["messages"][0] == {"role": "system", "content": system}
    kept = check_newest_turns_that_fit(server, "budget-sys", 200)
    assert kept >= 1
    # the system prompt takes room: fewer turns fit than without it
    plain = await start_server(MAX_CONTEXT_TOKENS="200")
    await ask_turns(plain, "budget-plain", 8)
    assert kept < check_newest_turns_that_fit(plain, "budget-plain", 200)


async def test_max_response_tokens_reduces_the_budget(start_server):
    server = await start_server(MAX_CONTEXT_TOKENS="200", MAX_RESPONSE_TOKENS="80")
    await ask_turns(server, "budget-resp", 8)
    assert server.fake.requests[-1]["body"]["max_tokens"] == 80
    kept_reserved = check_newest_turns_that_fit(server, "budget-resp", 200 - 80)

    plain = await start_server(MAX_CONTEXT_TOKENS="200")
    await ask_turns(plain, "budget-plain", 8)
    assert "max_tokens" not in plain.fake.requests[-1]["body"]
    assert kept_reserved < check_newest_turns_that_fit(plain, "budget-plain", 200)


async def test_max_tokens_field_reserves_room_for_this_answer(start_server):
    server = await start_server(MAX_CONTEXT_TOKENS="200")
    await ask_turns(server, "budget-field", 7)
    async with server.client() as client:
        response = await client.post(
            "/ask/budget-field", json={"prompt": prompt_of(7), "max_tokens": 90}
        )
        assert response.status_code == 200, response.text
    assert server.fake.requests[-1]["body"]["max_tokens"] == 90
    check_newest_turns_that_fit(server, "budget-field", 200 - 90)


async def test_prompt_that_cannot_fit_alone_is_rejected_and_nothing_is_stored(start_server):
    server = await start_server(MAX_CONTEXT_TOKENS="200")
    huge = " ".join(f"word{i}" for i in range(150))
    assert cost([{"role": "user", "content": huge}]) > 200
    async with server.client() as client:
        response = await client.post("/ask/too-long", json={"prompt": huge})
        assert response.status_code == 413, response.text
        assert error_code(response) == "prompt_too_long"
        assert not server.fake.requests
        assert stored_turns(server.settings.sqlite_path, "too-long") == []

        # on a conversation with history, the history is untouched
        ok = await client.post("/ask/too-long", json={"prompt": "short"})
        assert ok.status_code == 200, ok.text
        again = await client.post("/ask/too-long", json={"prompt": huge})
        assert again.status_code == 413 and error_code(again) == "prompt_too_long"
        after = await client.post("/ask/too-long", json={"prompt": "still here?"})
        assert after.status_code == 200, after.text

    assert len(server.fake.requests) == 2
    assert history_of(upstream_messages(server.fake)) == [("short", "echo(1): short")]
    assert [t["prompt"] for t in stored_turns(server.settings.sqlite_path, "too-long")] == [
        "short",
        "still here?",
    ]


async def test_prompt_that_fits_only_without_reserved_answer_tokens_is_rejected(start_server):
    prompt = " ".join(f"w{i}" for i in range(60))
    needed = cost([{"role": "user", "content": prompt}])
    assert 120 < needed <= 200, needed
    reserved = await start_server(MAX_CONTEXT_TOKENS="200", MAX_RESPONSE_TOKENS="80")
    plain = await start_server(MAX_CONTEXT_TOKENS="200")
    async with reserved.client() as client:
        response = await client.post("/ask/fit", json={"prompt": prompt})
        assert response.status_code == 413 and error_code(response) == "prompt_too_long"
    assert stored_turns(reserved.settings.sqlite_path, "fit") == []
    async with plain.client() as client:
        response = await client.post("/ask/fit", json={"prompt": prompt})
        assert response.status_code == 200, response.text


async def test_system_prompt_counts_against_a_prompt_that_would_fit_alone(start_server):
    system = " ".join(f"rule{i}" for i in range(40))
    prompt = " ".join(f"w{i}" for i in range(60))
    assert cost([{"role": "user", "content": prompt}]) <= 200
    assert cost([{"role": "system", "content": system}, {"role": "user", "content": prompt}]) > 200
    server = await start_server(MAX_CONTEXT_TOKENS="200", FIRST_PROMPT=system)
    async with server.client() as client:
        response = await client.post("/ask/fit-sys", json={"prompt": prompt})
        assert response.status_code == 413 and error_code(response) == "prompt_too_long"
    assert not server.fake.requests
