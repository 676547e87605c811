"""Answers that survive a dropped connection on the native HTTP API (SPEC §18): numbered SSE
frames, background asks, reattach with Last-Event-ID or ?after=, polling, cancel, the webhook,
and a shutdown with background answers in flight."""

from __future__ import annotations

import hashlib
import hmac
import json

import trio
from helpers.database import stored_turns
from helpers.http import error_code, parse_sse, sse_frames
from helpers.logs import capture_access
from helpers.upstream import events_of, full_answer
from helpers.waiting import wait_until
from helpers.webhook_receiver import WebhookReceiver

from easybackend.chat import answers

SLOW = "tell me a long story [[fake:tokens=60]] [[fake:delay=0.02]]"
SLOW_ANSWER = full_answer(1, "tell me a long story", 60)
KEY_A, KEY_B = "sk-resume-alice-0123456789", "sk-resume-bob-0123456789ab"


async def read_frames(response, count: int) -> tuple[list[str], int, str]:
    """Read ``count`` delta frames of an open SSE response: their texts, the last id seen and
    the turn its start frame named."""
    texts: list[str] = []
    seen, event, turn_id = 0, None, ""
    async for line in response.aiter_lines():
        if line.startswith("id: "):
            seen = int(line[4:])
        elif line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
            if event == "start":
                turn_id = data["turn_id"]
            elif event == "delta":
                texts.append(data["text"])
                if len(texts) == count:
                    break
    return texts, seen, turn_id


async def wait_for_events(client, conversation_id: str, turn_id: str, count: int) -> dict:
    """Poll the turn's state until its answer has more than ``count`` events; that state."""
    url = f"/conversations/{conversation_id}/turns/{turn_id}"
    with trio.fail_after(5):
        while (state := (await client.get(url)).json())["events"] <= count:
            await trio.sleep(0.01)
    return state


def deltas(text: str) -> str:
    return "".join(data["text"] for name, data in parse_sse(text) if name == "delta")


async def test_a_stream_numbers_its_frames_and_starts_with_the_turn(server):
    async with server.client() as client:
        response = await client.post(
            "/ask/numbered/stream", json={"prompt": "hi [[fake:tokens=5]]"}
        )
    frames = sse_frames(response.text)
    assert [seq for seq, _, _ in frames] == list(range(1, len(frames) + 1))
    (first, *middle, last) = frames
    assert first[1] == "start" and first[2]["conversation_id"] == "numbered"
    assert {name for _, name, _ in middle} == {"delta"} and last[1] == "end"
    assert last[2]["turn_id"] == first[2]["turn_id"]
    (turn,) = stored_turns(server.settings.sqlite_path, "numbered")
    assert turn["upstream"] == "default"
    assert turn["pieces"] == ",".join(str(len(data["text"])) for _, _, data in middle)


async def test_a_background_answer_goes_on_without_its_client_and_a_reattach_gets_the_rest(
    server,
):
    async with server.client() as client:
        async with client.stream(
            "POST", "/ask/tunnel/stream", json={"prompt": SLOW, "background": True}
        ) as response:
            assert response.status_code == 200
            first, seen, turn_id = await read_frames(response, 3)
        # the client is gone (a tunnel): the answer goes on
        state = await wait_for_events(client, "tunnel", turn_id, seen + 5)
        assert state["status"] == "in_progress"
        async with client.stream(
            "GET",
            f"/conversations/tunnel/turns/{turn_id}/stream",
            headers={"Last-Event-ID": str(seen)},
        ) as again:
            assert again.status_code == 200
            body = "".join([line + "\n" async for line in again.aiter_lines()])
    frames = sse_frames(body)
    assert frames[0][0] == seen + 1  # exactly the frames after the last one seen
    rest = "".join(data["text"] for _, name, data in frames if name == "delta")
    assert "".join(first) + rest == SLOW_ANSWER
    assert frames[-1][1] == "end" and frames[-1][2]["finish_reason"] == "stop"
    assert events_of(server.fake, "chatcmpl-1")[-1] == "completed"  # never cancelled
    (turn,) = stored_turns(server.settings.sqlite_path, "tunnel")
    assert (turn["answer"], turn["finish_reason"]) == (SLOW_ANSWER, "stop")


async def test_a_finished_answer_is_replayed_from_any_event_with_the_same_ids(server):
    async with server.client() as client:
        whole = await client.post("/ask/replayed/stream", json={"prompt": "go [[fake:tokens=8]]"})
        original = sse_frames(whole.text)
        turn_id = original[0][2]["turn_id"]
        url = f"/conversations/replayed/turns/{turn_id}/stream"
        from_start = await client.get(url)
        after_two = await client.get(url, params={"after": "2"})
        by_header = await client.get(url, headers={"Last-Event-ID": "2"})
        after_end = await client.get(url, params={"after": str(len(original))})
        bad = await client.get(url, headers={"Last-Event-ID": "two"})
    assert sse_frames(from_start.text) == original
    assert sse_frames(after_two.text) == original[2:] == sse_frames(by_header.text)
    # nothing after the end: the end once more, without an id (not one of the answer's events)
    assert sse_frames(after_end.text) == [(None, "end", original[-1][2])]
    assert bad.status_code == 400 and error_code(bad) == "invalid_input"


async def test_two_followers_of_one_answer_get_the_same_frames(server):
    async with server.client() as client:
        async with client.stream(
            "POST", "/ask/watched/stream", json={"prompt": SLOW, "background": True}
        ) as response:
            _, _, turn_id = await read_frames(response, 1)
        url = f"/conversations/watched/turns/{turn_id}/stream"
        bodies: dict[int, str] = {}

        async def follow(n: int) -> None:
            bodies[n] = (await client.get(url, params={"after": "1"})).text

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow, 1)
                nursery.start_soon(follow, 2)
    assert bodies[1] == bodies[2]
    assert deltas(bodies[1]) == SLOW_ANSWER  # after=1: every piece, after the start


async def test_polling_shows_the_state_and_the_text_so_far(server):
    async with server.client() as client:
        accepted = await client.post("/ask/polled", json={"prompt": SLOW, "background": True})
        assert accepted.status_code == 202, accepted.text
        state = accepted.json()
        assert (state["status"], state["background"]) == ("in_progress", True)
        url = f"/conversations/polled/turns/{state['turn_id']}"
        during = await wait_for_events(client, "polled", state["turn_id"], 5)
        assert during["status"] == "in_progress" and SLOW_ANSWER.startswith(during["text"])
        assert during["text"] and during["text"] != SLOW_ANSWER
        with trio.fail_after(10):
            while (after := (await client.get(url)).json())["status"] == "in_progress":
                await trio.sleep(0.05)
    assert (after["status"], after["text"], after["finish_reason"]) == (
        "completed",
        SLOW_ANSWER,
        "stop",
    )


async def test_a_background_answer_is_cancelled_by_the_cancel_route(server):
    async with server.client() as client:
        accepted = (
            await client.post("/ask/stopped", json={"prompt": SLOW, "background": True})
        ).json()
        turn = f"/conversations/stopped/turns/{accepted['turn_id']}"
        await wait_for_events(client, "stopped", accepted["turn_id"], 3)
        async with client.stream("GET", turn + "/stream") as live:  # a follower, attached
            lines = live.aiter_lines()
            head = [await anext(lines) for _ in range(4)]  # the start frame and its blank line
            assert head[1] == "event: start", head
            cancelled = await client.post(turn + "/cancel")
            followed = "\n".join(head) + "\n" + "".join([line + "\n" async for line in lines])
        assert cancelled.status_code == 200 and cancelled.json()["cancelled"] is True
        with trio.fail_after(5):
            await wait_until(lambda: bool(stored_turns(server.settings.sqlite_path, "stopped")))
        state = (await client.get(turn)).json()
        again = await client.post(turn + "/cancel")
    assert state["status"] == "cancelled" and SLOW_ANSWER.startswith(state["text"])
    assert state["text"] != SLOW_ANSWER
    assert again.status_code == 404 and error_code(again) == "not_found"
    (stored,) = stored_turns(server.settings.sqlite_path, "stopped")
    assert (stored["answer"], stored["finish_reason"]) == (state["text"], "cancelled")
    assert events_of(server.fake, "chatcmpl-1")[-1] == "disconnected"
    # a client following it live got its end, as a replay gives it
    frames = sse_frames(followed)
    assert frames[-1][1] == "end" and frames[-1][2]["finish_reason"] == "cancelled"
    assert deltas(followed) == stored["answer"]


async def test_another_keys_turn_and_an_unknown_turn_are_not_found(start_server):
    server = await start_server(API_KEYS=f"alice:{KEY_A},bob:{KEY_B}")
    alice = {"Authorization": f"Bearer {KEY_A}"}
    bob = {"Authorization": f"Bearer {KEY_B}"}
    async with server.client() as client:
        ask = await client.post("/ask/mine/stream", json={"prompt": "hi"}, headers=alice)
        turn_id = sse_frames(ask.text)[0][2]["turn_id"]
        url = f"/conversations/mine/turns/{turn_id}"
        own = await client.get(url + "/stream", headers=alice)
        for response in (
            await client.get(url + "/stream", headers=bob),
            await client.get(url, headers=bob),
            await client.post(url + "/cancel", headers=bob),
            await client.get("/conversations/mine/turns/0123456789abcdef01234567", headers=alice),
        ):
            assert response.status_code == 404 and error_code(response) == "not_found"
    assert sse_frames(own.text) == sse_frames(ask.text)


async def test_the_webhook_is_told_signed_when_a_background_answer_ends(start_server):
    receiver = WebhookReceiver()
    secret = "whsec-resume-0123456789"
    async with trio.open_nursery() as nursery:
        await nursery.start(receiver.serve)
        server = await start_server(
            WEBHOOK_URL=receiver.url(), WEBHOOK_SECRET=secret, API_KEYS=f"alice:{KEY_A}"
        )
        async with server.client(headers={"Authorization": f"Bearer {KEY_A}"}) as client:
            accepted = await client.post(
                "/ask/hooked", json={"prompt": "hook [[fake:tokens=6]]", "background": True}
            )
            plain = await client.post("/ask/hooked", json={"prompt": "not in the background"})
        (delivery,) = await receiver.wait_for(1)
        nursery.cancel_scope.cancel()
    assert accepted.status_code == 202 and plain.status_code == 200
    stamp = delivery.headers["x-easybackend-timestamp"]
    expected = hmac.new(secret.encode(), stamp.encode() + b"." + delivery.body, hashlib.sha256)
    assert delivery.headers["x-easybackend-signature"] == "sha256=" + expected.hexdigest()
    event = json.loads(delivery.body)
    assert event["type"] == "answer.completed" and event["status"] == "completed"
    assert event["key"] == "alice"  # whose conversation "hooked" it is
    assert event["turn_id"] == accepted.json()["turn_id"]
    assert event["text"] == full_answer(1, "hook", 6) and event["finish_reason"] == "stop"
    assert event["usage"]["completion_tokens"] == 6


async def test_shutdown_gives_background_answers_the_grace_then_stores_them_cancelled(
    start_server,
):
    # the short answer (0.4 s) ends well within the grace, the long one (8 s) well after it
    server = await start_server(SHUTDOWN_GRACE="3")
    long = "a very long story [[fake:tokens=400]] [[fake:delay=0.02]]"
    short = "a short one [[fake:tokens=20]] [[fake:delay=0.02]]"
    async with server.client() as client:
        for conversation_id, prompt in (("cut", long), ("done", short)):
            response = await client.post(
                f"/ask/{conversation_id}", json={"prompt": prompt, "background": True}
            )
            assert response.status_code == 202
    server.shutdown.set()  # the clients are long gone: only the background answers remain
    with trio.fail_after(10):
        await server.stopped.wait()
    db = server.settings.sqlite_path
    (done,) = stored_turns(db, "done")
    assert (done["answer"], done["finish_reason"]) == (full_answer(1, "a short one", 20), "stop")
    (cut,) = stored_turns(db, "cut")
    assert cut["finish_reason"] == "cancelled" and cut["answer"]
    assert full_answer(1, "a very long story", 400).startswith(cut["answer"])


async def test_a_background_ask_refused_for_too_many_background_answers_is_accounted(
    server, monkeypatch
):
    monkeypatch.setattr(answers, "MAX_BACKGROUND", 0)
    with capture_access() as access:
        async with server.client() as client:
            response = await client.post(
                "/ask/full", json={"prompt": "hi", "background": True},
                headers={"X-Request-Id": "too-many-1"},
            )  # fmt: skip
        (line,) = access.by_request_id("too-many-1")
    assert response.status_code == 429 and error_code(response) == "too_many_requests"
    assert (line["outcome"], line["conversation_id"]) == ("too_many_requests", "full")
    assert server.fake.requests == []


async def test_a_follower_of_an_answer_cancelled_before_its_first_piece_gets_how_it_ended(server):
    async with server.client() as client:
        async with client.stream(
            "POST",
            "/ask/nothing/stream",
            json={"prompt": "wait [[fake:stall_after=0]]", "background": True},
        ) as response:
            lines = response.aiter_lines()
            head = [await anext(lines) for _ in range(4)]  # the start frame and its blank line
            turn_id = json.loads(head[2].removeprefix("data: "))["turn_id"]
            cancelled = await client.post(f"/conversations/nothing/turns/{turn_id}/cancel")
            rest = "".join([line + "\n" async for line in lines])
        state = (await client.get(f"/conversations/nothing/turns/{turn_id}")).json()
    assert cancelled.status_code == 200
    ended = {"conversation_id": "nothing", "turn_id": turn_id, "finish_reason": "cancelled"}
    assert sse_frames(rest) == [(None, "end", ended)]  # unnumbered: not one of its events
    assert (state["status"], state["text"]) == ("cancelled", "")
    assert stored_turns(server.settings.sqlite_path, "nothing") == []


async def test_a_conversation_is_read_while_its_background_answer_runs(server):
    """A read of a conversation waits for an answer in progress on it for a moment only
    (one just ended is stored by then): during a long background answer it shows the stored
    turns at once, and the answer once it is stored."""
    long = "a very long story [[fake:tokens=400]] [[fake:delay=0.02]]"  # 8 s
    async with server.client() as client:
        first = await client.post("/ask/reading", json={"prompt": "first"})
        accepted = (
            await client.post("/ask/reading", json={"prompt": long, "background": True})
        ).json()
        turn = f"/conversations/reading/turns/{accepted['turn_id']}"
        await wait_for_events(client, "reading", accepted["turn_id"], 3)
        with trio.fail_after(5):  # well before the answer ends
            during = await client.get("/conversations/reading")
            missing = await client.get(turn)  # its state, from the answer's log
        assert (await client.post(turn + "/cancel")).status_code == 200
        await wait_until(lambda: bool(stored_turns(server.settings.sqlite_path, "reading")[1:]))
        after = (await client.get("/conversations/reading")).json()
    assert during.status_code == 200
    assert [t["id"] for t in during.json()["history"]] == [first.json()["turn_id"]]
    assert missing.json()["status"] == "in_progress"
    assert [t["id"] for t in after["history"]] == [first.json()["turn_id"], accepted["turn_id"]]
