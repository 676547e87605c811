"""Conversations as trees over HTTP, SSE and WebSocket JSON (SPEC §12): branches by parent_id,
"root", regenerate, head switches, rollback that deletes nothing, deleting a branch. The tests
that change the tree by a turn's id (regenerate, a cancelled regenerate, head, rollback, delete)
run on both storage backends."""

from __future__ import annotations

import pytest
import trio
from helpers.http import error_code, parse_sse
from helpers.postgres import pg_url
from helpers.upstream import ALLOW_OTHER_MODEL, echo, events_of, history_of, upstream_messages
from helpers.waiting import wait_for, wait_until
from helpers.websocket import ws_json_ask, ws_original_ask


async def ask(client, conversation_id: str, prompt: str, **extra) -> dict:
    reply = await client.post(f"/ask/{conversation_id}", json={"prompt": prompt, **extra})
    assert reply.status_code == 200, reply.text
    return reply.json()


async def conversation(client, conversation_id: str, **params) -> dict:
    reply = await client.get(f"/conversations/{conversation_id}", params=params)
    assert reply.status_code == 200, reply.text
    return reply.json()


# Values of an ask's options that only a lax reading takes (for 1, 1.0, True).
LAX_OPTIONS = [
    {"max_tokens": True},
    {"max_tokens": 1.0},
    {"max_tokens": "3"},
    {"temperature": True},
    {"temperature": "1"},
    {"background": 1},
    {"background": "true"},
]


def prompts(turns: list[dict]) -> list[str]:
    return [turn["messages"][0]["text"] for turn in turns]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request) -> dict[str, str]:
    """The server's database, for a test that starts its own: the SQLite default, or a schema
    of the local PostgreSQL (``backend_server`` is the same for a server with no other setting)."""
    if request.param == "sqlite":
        return {}
    return {"DATABASE_URL": pg_url(request.getfixturevalue("pg_schema"))}


async def test_an_ask_with_parent_id_branches_and_its_context_is_that_path_only(server):
    async with server.client() as client:
        one = await ask(client, "br", "one")
        two = await ask(client, "br", "two")
        await ask(client, "br", "three")
        edited = await ask(client, "br", "two, edited", parent_id=one["turn_id"])
        # the upstream saw the path root -> one only, not the other branch
        assert history_of(upstream_messages(server.fake)) == [("one", echo(1, "one"))]
        assert edited["turn"] == 2 and edited["response"] == echo(3, "two, edited")
        body = await conversation(client, "br")
        # the new turn is the head: the next ask continues from it
        await ask(client, "br", "after the edit")
        assert [prompt for prompt, _ in history_of(upstream_messages(server.fake))] == [
            "one",
            "two, edited",
        ]

    assert body["head"] == edited["turn_id"] and body["turns"] == 2 and body["stored_turns"] == 4
    first, second = body["history"]
    assert prompts(body["history"]) == ["one", "two, edited"]
    assert first["id"] == one["turn_id"] and first["parent_id"] is None
    assert first["siblings"] == [one["turn_id"]]
    assert second["parent_id"] == one["turn_id"] and second["turn"] == 2
    assert second["siblings"] == [two["turn_id"], edited["turn_id"]]  # creation order: ‹ 2/2 ›


async def test_root_starts_a_new_first_turn_and_ids_are_url_safe(server):
    async with server.client() as client:
        first = await ask(client, "rt", "first")
        await ask(client, "rt", "second")
        again = await ask(client, "rt", "first, edited", parent_id="root")
        assert history_of(upstream_messages(server.fake)) == []  # nothing before it
        body = await conversation(client, "rt")
    assert again["turn"] == 1 and body["turns"] == 1
    (only,) = body["history"]
    assert only["id"] == again["turn_id"] and only["parent_id"] is None
    assert only["siblings"] == [first["turn_id"], again["turn_id"]]
    for turn_id in (first["turn_id"], again["turn_id"]):
        assert 1 <= len(turn_id) <= 64 and turn_id.replace("-", "").replace("_", "").isalnum()


async def test_an_unknown_or_malformed_parent_is_refused_before_anything_is_sent_upstream(
    ws_server,
):
    async with ws_server.client() as client:
        await ask(client, "unknown", "hello")
        other = await ask(client, "elsewhere", "a turn of another conversation")
        sent = len(ws_server.fake.requests)
        for path in ("/ask/unknown", "/ask/unknown/stream", "/ask/new-conversation"):
            for parent in ("0123456789abcdef01234567", other["turn_id"]):
                reply = await client.post(path, json={"prompt": "x", "parent_id": parent})
                assert reply.status_code == 404 and error_code(reply) == "not_found", reply.text
            for bad in ("", "not/an id", "x" * 65, 5):
                reply = await client.post(path, json={"prompt": "x", "parent_id": bad})
                assert reply.status_code == 400 and error_code(reply) == "invalid_input", bad
        replies = await ws_json_ask(
            ws_server.running.ws_port,
            {"conversation_id": "unknown", "prompt": "x", "parent_id": other["turn_id"], "id": 7},
        )
        assert replies[-1]["type"] == "error" and replies[-1]["code"] == "not_found"
        assert replies[-1]["id"] == 7
        assert len(ws_server.fake.requests) == sent
        assert (await conversation(client, "unknown"))["stored_turns"] == 1


async def test_the_end_of_every_protocol_carries_the_new_turn_id(ws_server):
    async with ws_server.client() as client:
        plain = await ask(client, "ends", "plain")
        streamed = await client.post("/ask/ends/stream", json={"prompt": "streamed"})
        (name, end) = parse_sse(streamed.text)[-1]
        assert name == "end"
        replies = await ws_json_ask(
            ws_server.running.ws_port, {"conversation_id": "ends", "prompt": "ws"}
        )
        ws_end = replies[-1]
        assert ws_end["type"] == "end"
        body = await conversation(client, "ends")
    ids = [plain["turn_id"], end["turn_id"], ws_end["turn_id"]]
    assert [turn["id"] for turn in body["history"]] == ids
    assert [plain["turn"], end["turn"], ws_end["turn"]] == [1, 2, 3]
    assert body["head"] == ws_end["turn_id"]


async def test_websocket_json_asks_branch_and_regenerate(ws_server):
    async with ws_server.client() as client:
        one = await ask(client, "wsb", "one")
        await ask(client, "wsb", "two")
        branched = await ws_json_ask(
            ws_server.running.ws_port,
            {"conversation_id": "wsb", "prompt": "two, again", "parent_id": one["turn_id"]},
        )
        assert history_of(upstream_messages(ws_server.fake)) == [("one", echo(1, "one"))]
        regenerated = await ws_json_ask(
            ws_server.running.ws_port,
            {"type": "regenerate", "conversation_id": "wsb", "turn_id": one["turn_id"]},
        )
        assert history_of(upstream_messages(ws_server.fake)) == []
        missing = await ws_json_ask(
            ws_server.running.ws_port, {"type": "regenerate", "conversation_id": "wsb"}
        )
        body = await conversation(client, "wsb", view="tree")
    assert branched[-1]["type"] == "end" and regenerated[-1]["type"] == "end"
    assert "".join(r["text"] for r in regenerated if r["type"] == "delta") == echo(1, "one")
    assert missing[-1]["type"] == "error" and missing[-1]["code"] == "invalid_input"
    assert body["head"] == regenerated[-1]["turn_id"] and body["stored_turns"] == 4
    assert body["history"][0]["siblings"] == [one["turn_id"], regenerated[-1]["turn_id"]]


async def test_the_original_text_protocol_has_no_parent_and_continues_from_the_head(ws_server):
    """The original's later ``<|ask|>$conv$parent$prompt`` is not parsed: after the id, all is
    the prompt; branches over WebSocket go through the JSON protocol's parent_id."""
    async with ws_server.client() as client:
        one = await ask(client, "txt", "one")
        await ask(client, "txt", "two")
        prompt = f"{one['turn_id']}$three"
        frames = await ws_original_ask(ws_server.running.ws_port, "txt", prompt)
        body = await conversation(client, "txt")
    assert frames[-1] == "<|end|>"
    assert [p for p, _ in history_of(upstream_messages(ws_server.fake))] == ["one", "two"]
    assert upstream_messages(ws_server.fake)[-1] == {"role": "user", "content": prompt}
    assert prompts(body["history"]) == ["one", "two", prompt] and body["stored_turns"] == 3


async def test_regenerate_answers_the_same_prompt_again_as_a_sibling(start_server, backend):
    server = await start_server(**ALLOW_OTHER_MODEL, **backend)
    async with server.client() as client:
        one = await ask(client, "rg", "one")
        two = await ask(client, "rg", "two")
        await ask(client, "rg", "three")
        # no body at all: the server's settings
        reply = await client.post(f"/conversations/rg/turns/{two['turn_id']}/regenerate")
        assert reply.status_code == 200, reply.text
        again = reply.json()
        assert history_of(upstream_messages(server.fake)) == [("one", echo(1, "one"))]
        assert again["response"] == echo(3, "two") and again["turn"] == 2
        # streamed, with an override
        streamed = await client.post(
            f"/conversations/rg/turns/{two['turn_id']}/regenerate/stream",
            json={"model": "other-model"},
        )
        events = parse_sse(streamed.text)
        assert events[-1][0] == "end" and events[-1][1]["model"] == "other-model"
        assert server.fake.requests[-1]["body"]["model"] == "other-model"
        body = await conversation(client, "rg")
        # regenerating the very first turn: a new first turn, its context empty
        first_again = await client.post(f"/conversations/rg/turns/{one['turn_id']}/regenerate")
        assert first_again.status_code == 200 and history_of(upstream_messages(server.fake)) == []
        sent = len(server.fake.requests)
        unknown = await client.post("/conversations/rg/turns/0123456789abcdef01234567/regenerate")
        malformed = await client.post("/conversations/rg/turns/a.b/regenerate")
        not_json = await client.post(
            f"/conversations/rg/turns/{two['turn_id']}/regenerate", content=b"{nope"
        )
        extra = await client.post(
            f"/conversations/rg/turns/{two['turn_id']}/regenerate", json={"prompt": "no"}
        )
        # the options keep their JSON types, as in the core (and an ask's)
        regenerate = f"/conversations/rg/turns/{two['turn_id']}/regenerate"
        lax = [
            await client.post(path, json={**({"prompt": "x"} if "/ask/" in path else {}), **bad})
            for path in (regenerate, f"{regenerate}/stream", "/ask/rg", "/ask/rg/stream")
            for bad in LAX_OPTIONS
        ]
        assert len(server.fake.requests) == sent

    assert body["head"] == events[-1][1]["turn_id"]
    assert prompts(body["history"]) == ["one", "two"]
    assert body["history"][1]["siblings"] == [two["turn_id"], again["turn_id"], body["head"]]
    assert unknown.status_code == 404 and error_code(unknown) == "not_found"
    assert malformed.status_code == 400 and error_code(malformed) == "invalid_input"
    assert not_json.status_code == 400 and extra.status_code == 400
    assert [(r.status_code, error_code(r)) for r in lax] == [(400, "invalid_input")] * len(lax)


async def test_a_cancelled_regenerate_stores_its_partial_answer_as_a_cancelled_sibling(
    backend_server,
):
    server = backend_server
    async with server.client() as client:
        first = await ask(client, "rgc", "long [[fake:tokens=200]] [[fake:delay=0.02]]")
        received = 0
        async with client.stream(
            "POST", f"/conversations/rgc/turns/{first['turn_id']}/regenerate/stream"
        ) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("event: delta"):
                    received += 1
                    if received == 3:
                        break
        with trio.fail_after(2):
            await wait_until(lambda: "disconnected" in events_of(server.fake, "chatcmpl-2"))

        async def stored_both() -> bool:
            return (await conversation(client, "rgc", view="tree"))["stored_turns"] == 2

        await wait_for(stored_both)
        body = await conversation(client, "rgc")
    (partial,) = body["history"]
    assert partial["finish_reason"] == "cancelled"
    assert (
        partial["siblings"] == [first["turn_id"], partial["id"]] and body["head"] == partial["id"]
    )
    assert first["response"].startswith(partial["messages"][1]["text"])


async def test_head_switches_branch_and_rollback_deletes_nothing(backend_server):
    server = backend_server
    async with server.client() as client:
        one = await ask(client, "hd", "one")
        two = await ask(client, "hd", "two")
        three = await ask(client, "hd", "three")
        rolled = await client.post("/conversations/hd/rollback", json={"turns": 2})
        assert rolled.json() == {
            "conversation_id": "hd",
            "removed": 2,
            "turns": 1,
            "head": one["turn_id"],
        }
        four = await ask(client, "hd", "four")  # a branch beside two
        assert history_of(upstream_messages(server.fake)) == [("one", echo(1, "one"))]
        tree = await conversation(client, "hd", view="tree")
        assert [turn["id"] for turn in tree["tree"]] == [
            one["turn_id"],
            two["turn_id"],
            three["turn_id"],
            four["turn_id"],
        ]
        assert tree["tree"][2]["parent_id"] == two["turn_id"]
        # back to the first branch: the next ask sees one, two, three
        switched = await client.put("/conversations/hd/head", json={"turn_id": three["turn_id"]})
        assert switched.json() == {"conversation_id": "hd", "head": three["turn_id"]}
        await ask(client, "hd", "five")
        assert [p for p, _ in history_of(upstream_messages(server.fake))] == ["one", "two", "three"]
        to_root = await client.put("/conversations/hd/head", json={"turn_id": "root"})
        assert to_root.json() == {"conversation_id": "hd", "head": None}
        assert (await conversation(client, "hd"))["history"] == []
        await ask(client, "hd", "fresh start")
        assert history_of(upstream_messages(server.fake)) == []
        unknown = await client.put("/conversations/hd/head", json={"turn_id": "f" * 24})
        bad = await client.put("/conversations/hd/head", json={"turn_id": "a b"})
        nowhere = await client.put("/conversations/none/head", json={"turn_id": one["turn_id"]})
        # a JSON integer of turns and a JSON string id only, as in the core
        refused = [
            await client.post("/conversations/hd/rollback", json={"turns": turns})
            for turns in (True, 1.0, "1", 0, None)
        ] + [
            await client.put("/conversations/hd/head", json={"turn_id": turn_id})
            for turn_id in (5, True, None, [three["turn_id"]])
        ]
        body = await conversation(client, "hd")
    assert unknown.status_code == 404 and error_code(unknown) == "not_found"
    assert bad.status_code == 400 and nowhere.status_code == 404
    assert [(r.status_code, error_code(r)) for r in refused] == [(400, "invalid_input")] * 9
    assert body["turns"] == 1  # the head stayed at "fresh start"
    assert "tree" not in body and body["stored_turns"] == 6  # the default view: the path only


async def test_deleting_a_turn_deletes_its_branch_and_moves_the_head_up(backend_server):
    server = backend_server
    async with server.client() as client:
        one = await ask(client, "del", "one")
        two = await ask(client, "del", "two")
        await ask(client, "del", "three")
        side = await ask(client, "del", "side", parent_id=one["turn_id"])
        before = await conversation(client, "del")
        # deleting a branch the head is not on leaves the head alone
        await client.put("/conversations/del/head", json={"turn_id": side["turn_id"]})
        kept = await client.delete(f"/conversations/del/turns/{two['turn_id']}")
        assert kept.json() == {"conversation_id": "del", "deleted": 2, "head": side["turn_id"]}
        # deleting the branch holding the head moves the head to the deleted turn's parent
        moved = await client.delete(f"/conversations/del/turns/{side['turn_id']}")
        assert moved.json() == {"conversation_id": "del", "deleted": 1, "head": one["turn_id"]}
        after = await conversation(client, "del", view="tree")
        gone = await client.delete(f"/conversations/del/turns/{two['turn_id']}")
        regenerate_gone = await client.post(f"/conversations/del/turns/{two['turn_id']}/regenerate")
        next_ask = await ask(client, "del", "after the deletes")
    assert [turn["id"] for turn in after["tree"]] == [one["turn_id"]]
    assert after["history"][0]["siblings"] == [one["turn_id"]]
    assert after["usage"] == before["usage"]  # usage totals count every answered turn
    assert after["stored_turns"] == 1 and after["head"] == one["turn_id"]
    assert gone.status_code == 404 and regenerate_gone.status_code == 404
    assert next_ask["turn"] == 2
    assert history_of(upstream_messages(server.fake)) == [("one", echo(1, "one"))]


async def test_asks_on_different_branches_of_one_conversation_run_one_at_a_time(server):
    async with server.client() as client:
        root = await ask(client, "order", "root")
        results: list[dict] = []

        async def branch(i: int) -> None:
            reply = await client.post(
                "/ask/order",
                json={"prompt": f"b{i} [[fake:delay=0.01]]", "parent_id": root["turn_id"]},
            )
            assert reply.status_code == 200, reply.text
            results.append(reply.json())

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(branch, i)
        body = await conversation(client, "order", view="tree")

    answers = [e for e in server.fake.events if e["event"] in ("started", "completed")]
    # started / completed alternate: no answer began before the one before it ended
    assert [e["event"] for e in answers[2:]] == ["started", "completed"] * 4
    assert body["history"][1]["siblings"] == [t["id"] for t in body["tree"][1:]]
    assert len(body["tree"]) == 5 and {r["turn_id"] for r in results} == {
        t["id"] for t in body["tree"][1:]
    }
