"""Ordering and isolation under concurrency (SPEC §3 "Ordering")."""

from __future__ import annotations

import re

import trio
import trio.testing
from helpers.database import db_rows, stored_turns
from helpers.http import parse_sse
from helpers.upstream import echo, events_of, history_of
from helpers.waiting import wait_until

DELAY = "[[fake:delay=0.01]]"


async def test_concurrent_asks_on_one_conversation_are_stored_once_each_in_order(server):
    answers: dict[str, str] = {}

    async with server.client() as client:

        async def ask(i: int) -> None:
            response = await client.post("/ask/shared", json={"prompt": f"p{i} {DELAY}"})
            assert response.status_code == 200, response.text
            answers[f"p{i}"] = response.json()["response"]

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i in range(10):
                    nursery.start_soon(ask, i)

    # The upstream saw them one at a time: the k-th request carries exactly the k-1 turns
    # answered before it, in that order, each with its real answer.
    requests = [r["body"]["messages"] for r in server.fake.requests]
    assert len(requests) == 10
    order = [messages[-1]["content"].split()[0] for messages in requests]
    assert sorted(order) == sorted(f"p{i}" for i in range(10))
    for k, messages in enumerate(requests):
        assert [prompt.split()[0] for prompt, _ in history_of(messages)] == order[:k]
        assert [answer for _, answer in history_of(messages)] == [answers[p] for p in order[:k]]
        assert answers[order[k]] == echo(2 * k + 1, order[k])

    # The upstream never had two answers in flight for the conversation.
    running = 0
    for event in server.fake.events:
        running += 1 if event["event"] == "started" else -1
        assert running in (0, 1), server.fake.events

    # The database, read directly: seq 1..10, each prompt once, in the upstream's order.
    turns = stored_turns(server.settings.sqlite_path, "shared")
    assert [t["seq"] for t in turns] == list(range(1, 11))
    assert [t["prompt"].split()[0] for t in turns] == order
    assert [t["answer"] for t in turns] == [answers[p] for p in order]
    assert {t["finish_reason"] for t in turns} == {"stop"}
    (conversation,) = db_rows(
        server.settings.sqlite_path,
        "SELECT turn_count FROM conversations WHERE conversation_id = 'shared'",
    )
    assert conversation["turn_count"] == 10


async def test_asks_are_served_in_arrival_order(server):
    # The first answer stalls after one token and holds the conversation; each further ask
    # is sent only once everything is idle again (so it is queued behind the earlier ones),
    # then the first client gives up, which releases the queue.
    stalling = "first [[fake:stall_after=1]]"
    async with server.client() as client:

        async def ask(prompt: str) -> None:
            response = await client.post("/ask/queue", json={"prompt": prompt})
            assert response.status_code == 200, response.text

        async def ask_and_give_up(cancel_scope: trio.CancelScope) -> None:
            with cancel_scope:
                await client.post("/ask/queue", json={"prompt": stalling})

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                first = trio.CancelScope()
                nursery.start_soon(ask_and_give_up, first)
                await wait_until(lambda: "stalled" in events_of(server.fake, "chatcmpl-1"))
                for i in range(5):
                    nursery.start_soon(ask, f"q{i}")
                    await trio.testing.wait_all_tasks_blocked(cushion=0.01)
                    assert len(server.fake.requests) == 1
                first.cancel()

    turns = stored_turns(server.settings.sqlite_path, "queue")
    assert [t["prompt"] for t in turns] == [stalling] + [f"q{i}" for i in range(5)]
    assert [t["finish_reason"] for t in turns] == ["cancelled"] + ["stop"] * 5
    assert turns[0]["answer"] == "echo(1):"


async def test_fifty_conversations_in_parallel_each_get_their_own_answer(server):
    answers: dict[str, str] = {}

    async with server.client() as client:

        async def ask(i: int) -> None:
            response = await client.post(
                f"/ask/conv-{i}", json={"prompt": f"prompt number {i} {DELAY}"}
            )
            assert response.status_code == 200, response.text
            assert response.json()["conversation_id"] == f"conv-{i}"
            answers[f"conv-{i}"] = response.json()["response"]

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i in range(50):
                    nursery.start_soon(ask, i)

    assert answers == {f"conv-{i}": echo(1, f"prompt number {i}") for i in range(50)}
    # they really overlapped upstream
    in_flight, most = 0, 0
    for event in server.fake.events:
        in_flight += 1 if event["event"] == "started" else -1
        most = max(most, in_flight)
    assert most >= 2, server.fake.events
    rows = db_rows(
        server.settings.sqlite_path,
        "SELECT c.conversation_id, t.seq, t.prompt, t.answer FROM turns t"
        " JOIN conversations c ON c.pk = t.conversation_pk",
    )
    assert len(rows) == 50
    for row in rows:
        i = int(re.fullmatch(r"conv-(\d+)", row["conversation_id"])[1])
        assert (row["seq"], row["prompt"]) == (1, f"prompt number {i} {DELAY}")
        assert row["answer"] == echo(1, f"prompt number {i}")


async def test_a_stalled_conversation_does_not_hold_up_the_others(server):
    async with server.client() as client:

        async def stall(cid: str) -> None:
            await client.post(f"/ask/{cid}", json={"prompt": "wait [[fake:stall_after=1]]"})

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i in range(5):
                    nursery.start_soon(stall, f"stalled-{i}")
                # all five are in flight at once, each holding its own conversation
                await wait_until(
                    lambda: sum(e["event"] == "stalled" for e in server.fake.events) == 5
                )
                response = await client.post("/ask/free", json={"prompt": "not blocked"})
                assert response.status_code == 200, response.text
                assert response.json()["response"] == echo(1, "not blocked")
                nursery.cancel_scope.cancel()

    db = server.settings.sqlite_path
    await wait_until(lambda: all(stored_turns(db, f"stalled-{i}") for i in range(5)))
    for i in range(5):
        (turn,) = stored_turns(db, f"stalled-{i}")
        assert (turn["answer"], turn["finish_reason"]) == ("echo(1):", "cancelled")


async def test_client_that_leaves_while_queued_is_never_sent_upstream(server):
    async with server.client() as client:

        async def ask(prompt: str, cancel_scope: trio.CancelScope | None = None) -> None:
            with cancel_scope or trio.CancelScope():
                response = await client.post("/ask/leaver", json={"prompt": prompt})
                assert response.status_code == 200, response.text

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                holder, leaver = trio.CancelScope(), trio.CancelScope()
                nursery.start_soon(ask, "holder [[fake:stall_after=1]]", holder)
                await wait_until(lambda: "stalled" in events_of(server.fake, "chatcmpl-1"))
                nursery.start_soon(ask, "leaver", leaver)
                await trio.testing.wait_all_tasks_blocked(cushion=0.01)
                nursery.start_soon(ask, "stayer")
                await trio.testing.wait_all_tasks_blocked(cushion=0.01)
                leaver.cancel()
                await trio.testing.wait_all_tasks_blocked(cushion=0.01)
                holder.cancel()

    assert [r["body"]["messages"][-1]["content"] for r in server.fake.requests] == [
        "holder [[fake:stall_after=1]]",
        "stayer",
    ]
    turns = stored_turns(server.settings.sqlite_path, "leaver")
    assert [(t["prompt"], t["finish_reason"]) for t in turns] == [
        ("holder [[fake:stall_after=1]]", "cancelled"),
        ("stayer", "stop"),
    ]


async def test_concurrent_streams_on_one_conversation_are_serialised(server):
    texts: dict[str, str] = {}
    async with server.client() as client:

        async def ask(i: int) -> None:
            response = await client.post("/ask/streams/stream", json={"prompt": f"s{i} {DELAY}"})
            events = parse_sse(response.text)
            assert events[-1][0] == "end", events
            texts[f"s{i}"] = "".join(data["text"] for name, data in events if name == "delta")

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(ask, i)

    turns = stored_turns(server.settings.sqlite_path, "streams")
    assert [t["seq"] for t in turns] == list(range(1, 7))
    for k, turn in enumerate(turns):
        prompt = turn["prompt"].split()[0]
        assert turn["answer"] == texts[prompt] == echo(2 * k + 1, prompt)
