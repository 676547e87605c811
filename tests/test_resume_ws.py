"""Answers that survive a dropped connection on the WebSocket JSON protocol (SPEC §18): numbered
messages with a start, background asks, ``resume`` after the last seq seen, ``cancel`` naming a
turn, over real sockets (trio-websocket) against the fake upstream."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from helpers.database import stored_turns
from helpers.one_piece_upstream import serve_one_piece
from helpers.postgres import pg_url
from helpers.servers import Server, StartServer, free_port
from helpers.upstream import full_answer
from helpers.websocket import original_frames
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    connect_websocket_url,
    open_websocket_url,
)

SLOW = "tell me a long story [[fake:tokens=60]] [[fake:delay=0.02]]"
SLOW_ANSWER = full_answer(1, "tell me a long story", 60)
KEY_A, KEY_B = "sk-resume-ws-alice-0123456789", "sk-resume-ws-bob-0123456789ab"
TIMEOUT = 15.0
LIMIT = 16384  # MAX_BODY_BYTES where a piece is cut
HUGE_PIECE = 'ab"\n é中😀' * 2000  # ~2 limits in one piece, escapes and every UTF-8 width


def url(server: Server) -> str:
    return f"ws://127.0.0.1:{server.running.ws_port}"


def auth(key: str) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", f"Bearer {key}".encode())]


async def receive(ws: WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(TIMEOUT):
        return json.loads(await ws.get_message())


async def until_end(ws: WebSocketConnection) -> list[dict[str, Any]]:
    """The messages up to and including an ``end`` or an ``error``."""
    replies = []
    for _ in range(10_000):
        replies.append(await receive(ws))
        if replies[-1]["type"] in ("end", "error"):
            return replies
    raise AssertionError("no end")


async def start_of(ws: WebSocketConnection, message: dict[str, Any]) -> dict[str, Any]:
    """Send ``message``; its first reply, which must be the start."""
    await ws.send_message(json.dumps(message))
    start = await receive(ws)
    assert start["type"] == "start", start
    return start


async def deltas_up_to(ws: WebSocketConnection, seq: int) -> list[dict[str, Any]]:
    """The delta messages up to the one numbered ``seq``."""
    seen: list[dict[str, Any]] = []
    while not seen or seen[-1]["seq"] < seq:
        seen.append(await receive(ws))
        assert seen[-1]["type"] == "delta", seen[-1]
    return seen


def text_of(replies: list[dict[str, Any]]) -> str:
    return "".join(reply["text"] for reply in replies if reply["type"] == "delta")


def without_ids(replies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in reply.items() if k not in ("id", "request_id")} for reply in replies]


async def test_a_json_answer_starts_with_its_turn_and_numbers_every_message(ws_server):
    async with open_websocket_url(url(ws_server)) as ws:
        message = {"type": "ask", "conversation_id": "n1", "prompt": "hi [[fake:tokens=6]]"}
        start = await start_of(ws, {**message, "id": "a1"})
        rest = await until_end(ws)
        await ws.send_message("<|ask|>$n2$plain")
        frames = await original_frames(ws)
    assert start == {
        "type": "start",
        "conversation_id": "n1",
        "turn_id": start["turn_id"],
        "seq": 1,
        "id": "a1",
    }
    *deltas, end = rest
    assert [reply["seq"] for reply in rest] == list(range(2, len(rest) + 2))
    assert {reply["type"] for reply in deltas} == {"delta"} and end["type"] == "end"
    assert end["turn_id"] == start["turn_id"] and end["id"] == "a1"
    assert text_of(deltas) == full_answer(1, "hi", 6)
    # the original text protocol is as it was: text frames, then <|end|>, nothing numbered
    assert frames[-1] == "<|end|>" and "".join(frames[:-1]) == "echo(1): plain"


async def test_a_background_answer_survives_a_closed_socket_and_a_resume_gets_the_rest(
    ws_server,
):
    async with open_websocket_url(url(ws_server)) as ws:  # the uninterrupted answer, to compare
        await ws.send_message(json.dumps({"type": "ask", "conversation_id": "u", "prompt": SLOW}))
        uninterrupted = text_of(await until_end(ws))
    assert uninterrupted == SLOW_ANSWER
    ask = {"type": "ask", "conversation_id": "tunnel", "prompt": SLOW, "background": True}
    async with open_websocket_url(url(ws_server)) as ws:
        start = await start_of(ws, ask)
        before = await deltas_up_to(ws, 5)
    # the socket is closed mid-answer; the answer goes on
    resume = {"conversation_id": "tunnel", "turn_id": start["turn_id"], "after": before[-1]["seq"]}
    async with open_websocket_url(url(ws_server)) as ws:
        await ws.send_message(json.dumps({"type": "resume", "id": 7, **resume}))
        after = await until_end(ws)
    assert after[0]["seq"] == before[-1]["seq"] + 1 and after[0]["id"] == 7
    assert [reply["seq"] for reply in after] == list(range(after[0]["seq"], after[-1]["seq"] + 1))
    assert after[-1]["type"] == "end" and after[-1]["finish_reason"] == "stop"
    assert text_of(before) + text_of(after) == uninterrupted
    (turn,) = stored_turns(ws_server.settings.sqlite_path, "tunnel")
    assert (turn["answer"], turn["finish_reason"]) == (uninterrupted, "stop")


async def test_a_finished_answer_is_replayed_from_any_seq(ws_server):
    async with open_websocket_url(url(ws_server)) as ws:
        ask = {"type": "ask", "conversation_id": "done", "prompt": "replay [[fake:tokens=8]]"}
        start = await start_of(ws, ask)
        first = [start, *await until_end(ws)]
    resume = {"type": "resume", "conversation_id": "done", "turn_id": start["turn_id"]}
    async with open_websocket_url(url(ws_server)) as ws:
        await ws.send_message(json.dumps(resume))  # no "after": from the start
        whole = [await receive(ws), *await until_end(ws)]
        await ws.send_message(json.dumps({**resume, "after": 4}))
        from_four = await until_end(ws)
        await ws.send_message(json.dumps({**resume, "after": 1000}))
        (beyond,) = await until_end(ws)
    assert without_ids(whole) == without_ids(first)
    assert without_ids(from_four) == without_ids(first[4:])
    assert text_of(first[:4]) + text_of(from_four) == full_answer(1, "replay", 8)
    # nothing after the end: an end that tells how the answer ended, not numbered
    assert (beyond["type"], beyond["finish_reason"], beyond["turn_id"]) == (
        "end",
        "stop",
        start["turn_id"],
    )
    assert "seq" not in beyond


async def test_two_followers_of_one_answer_get_the_same_messages(ws_server):
    ask = {"type": "ask", "conversation_id": "pair", "prompt": SLOW, "background": True}
    async with (
        open_websocket_url(url(ws_server)) as asker,
        open_websocket_url(url(ws_server)) as other,
    ):
        start = await start_of(asker, ask)
        resume = {"type": "resume", "conversation_id": "pair", "turn_id": start["turn_id"]}
        await other.send_message(json.dumps({**resume, "after": 0}))
        followed: dict[str, list[dict[str, Any]]] = {}

        async def follow(name: str, ws: WebSocketConnection, first: list[dict[str, Any]]) -> None:
            followed[name] = [*first, *await until_end(ws)]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow, "asker", asker, [start])
            nursery.start_soon(follow, "other", other, [])
    assert without_ids(followed["asker"]) == without_ids(followed["other"])
    assert followed["asker"][-1]["finish_reason"] == "stop"
    assert text_of(followed["other"]) == SLOW_ANSWER


async def test_a_cancel_naming_the_turn_stops_a_background_answer(ws_server):
    ask = {"type": "ask", "conversation_id": "stop", "prompt": SLOW, "background": True}
    async with (
        open_websocket_url(url(ws_server)) as asker,
        open_websocket_url(url(ws_server)) as other,
    ):
        start = await start_of(asker, ask)
        seen = await deltas_up_to(asker, 3)
        cancel = {"type": "cancel", "conversation_id": "stop", "turn_id": start["turn_id"]}
        await other.send_message(json.dumps({**cancel, "id": "c"}))
        assert await receive(other) == {
            "type": "cancelled",
            "conversation_id": "stop",
            "turn_id": start["turn_id"],
            "id": "c",
        }
        rest = await until_end(asker)
        await other.send_message(json.dumps(cancel))  # nothing is in progress any more
        again = await receive(other)
    assert rest[-1]["type"] == "end" and rest[-1]["finish_reason"] == "cancelled"
    assert rest[-1]["seq"] == (rest[-2] if len(rest) > 1 else seen[-1])["seq"] + 1
    assert again["type"] == "error" and again["code"] == "not_found" and "seq" not in again
    (turn,) = stored_turns(ws_server.settings.sqlite_path, "stop")
    assert turn["finish_reason"] == "cancelled"
    assert turn["answer"] == text_of(seen + rest) and SLOW_ANSWER.startswith(turn["answer"])
    assert len(turn["answer"]) < len(SLOW_ANSWER)


async def test_a_plain_cancel_stops_the_sockets_background_answer(ws_server):
    ask = {"type": "ask", "conversation_id": "plain", "prompt": SLOW, "background": True}
    async with open_websocket_url(url(ws_server)) as ws:
        start = await start_of(ws, ask)
        seen = await deltas_up_to(ws, 3)
        await ws.send_message(json.dumps({"type": "cancel"}))
        rest = await until_end(ws)
        assert rest[-1]["finish_reason"] == "cancelled"
        assert rest[-1]["seq"] == [*seen, *rest][-2]["seq"] + 1  # numbered, as stored
        resume = {"type": "resume", "conversation_id": "plain", "turn_id": start["turn_id"]}
        await ws.send_message(json.dumps(resume))  # follows it to its stored end
        replayed = [await receive(ws), *await until_end(ws)]
    assert without_ids(replayed) == without_ids([start, *seen, *rest])  # the same numbers
    (turn,) = stored_turns(ws_server.settings.sqlite_path, "plain")
    assert turn["finish_reason"] == "cancelled" and turn["answer"] == text_of(replayed)


async def test_a_background_answer_outlives_a_crashed_client_and_is_stored_whole(ws_server):
    ask = {"type": "ask", "conversation_id": "crash", "prompt": SLOW, "background": True}
    async with trio.open_nursery() as nursery:
        ws = await connect_websocket_url(nursery, url(ws_server))
        try:
            start = await start_of(ws, ask)
            await deltas_up_to(ws, 4)
        finally:  # the client dies: its TCP connection is closed without a close frame
            await trio.aclose_forcefully(ws._stream)
            nursery.cancel_scope.cancel()
    resume = {"type": "resume", "conversation_id": "crash", "turn_id": start["turn_id"]}
    async with open_websocket_url(url(ws_server)) as ws2:
        await ws2.send_message(json.dumps({**resume, "after": 1}))
        rest = await until_end(ws2)  # live, then the end once the turn is stored
    assert rest[-1]["finish_reason"] == "stop" and text_of(rest) == SLOW_ANSWER
    (turn,) = stored_turns(ws_server.settings.sqlite_path, "crash")
    assert (turn["answer"], turn["finish_reason"]) == (SLOW_ANSWER, "stop")
    assert [e["event"] for e in ws_server.fake.events][-1] == "completed"


async def test_a_piece_cut_across_messages_keeps_one_seq(nursery, start_server: StartServer):
    port = await nursery.start(serve_one_piece, HUGE_PIECE)
    server = await start_server(
        OPENAI_BASE_URL=f"http://127.0.0.1:{port}/v1",
        MAX_BODY_BYTES=str(LIMIT),
        WS_PORT=str(free_port()),
        HTTP_PORT="off",
    )
    async with open_websocket_url(url(server)) as ws:
        message = {"type": "ask", "conversation_id": "cut", "prompt": "hi"}
        start = await start_of(ws, message)
        first = [start, *await until_end(ws)]
        resume = {"type": "resume", "conversation_id": "cut", "turn_id": start["turn_id"]}
        await ws.send_message(json.dumps({**resume, "after": 1}))
        replayed = await until_end(ws)
    *parts, end = first[1:]
    assert len(parts) > 1 and {part["seq"] for part in parts} == {2}  # one event, cut
    assert [part.get("more", False) for part in parts] == [True] * (len(parts) - 1) + [False]
    assert all(len(json.dumps(reply, ensure_ascii=False).encode()) <= LIMIT for reply in first)
    assert text_of(parts) == HUGE_PIECE and end["seq"] == 3
    assert without_ids(replayed) == without_ids(
        first[1:]
    )  # after 1: the whole event 2 again, cut the same way, then 3


@pytest.mark.parametrize("background", [False, True])
async def test_unknown_turns_and_another_keys_turns_are_not_found(
    start_server: StartServer, background: bool
):
    server = await start_server(
        WS_PORT=str(free_port()), API_KEYS=f"alice:{KEY_A},bob:{KEY_B}", HTTP_PORT="off"
    )
    ask = {"type": "ask", "conversation_id": "mine", "prompt": "hello", "background": background}
    async with open_websocket_url(url(server), extra_headers=auth(KEY_A)) as alice:
        start = await start_of(alice, ask)
        await until_end(alice)
    turn = {"conversation_id": "mine", "turn_id": start["turn_id"]}
    async with open_websocket_url(url(server), extra_headers=auth(KEY_B)) as bob:
        replies = []
        for message in (
            {"type": "resume", **turn, "after": 0},
            {"type": "resume", "conversation_id": "mine", "turn_id": "no-such-turn"},
            {"type": "cancel", **turn},
        ):
            await bob.send_message(json.dumps({**message, "id": message["type"]}))
            replies.append(await receive(bob))
        await bob.send_message(json.dumps({"type": "resume", **turn, "after": -1}))
        replies.append(await receive(bob))
    assert [(reply["type"], reply["code"], reply["id"]) for reply in replies[:3]] == [
        ("error", "not_found", "resume"),
        ("error", "not_found", "resume"),
        ("error", "not_found", "cancel"),
    ]
    assert replies[3]["code"] == "invalid_input"
    assert all("seq" not in reply for reply in replies)
    async with open_websocket_url(url(server), extra_headers=auth(KEY_A)) as alice:
        await alice.send_message(json.dumps({"type": "resume", **turn}))
        assert (await receive(alice))["type"] == "start"  # the owner still reaches it


async def test_a_shutdown_lets_a_followed_background_answer_finish_then_closes(
    start_server: StartServer,
):
    server = await start_server(WS_PORT=str(free_port()), SHUTDOWN_GRACE="10", HTTP_PORT="off")
    ask = {"type": "ask", "conversation_id": "bye", "prompt": SLOW, "background": True}
    async with open_websocket_url(url(server)) as ws:
        start = await start_of(ws, ask)
        server.shutdown.set()  # within the grace: the answer and its following go on
        rest = await until_end(ws)
        with pytest.raises(ConnectionClosed) as closed, trio.fail_after(TIMEOUT):
            await ws.get_message()
    assert closed.value.reason.code == 1001
    assert rest[-1]["finish_reason"] == "stop" and rest[-1]["turn_id"] == start["turn_id"]
    assert text_of(rest) == SLOW_ANSWER
    with trio.fail_after(TIMEOUT):
        await server.stopped.wait()
    (turn,) = stored_turns(server.settings.sqlite_path, "bye")
    assert (turn["answer"], turn["finish_reason"]) == (SLOW_ANSWER, "stop")


async def test_a_resume_on_another_instance_follows_the_answer_while_it_runs(
    start_server: StartServer, pg_schema
):
    """Two servers on one PostgreSQL database: a background answer asked on one is followed
    on the other's WebSocket while it runs (from what the generator writes on its mark),
    with the generator's numbers, up to its end."""
    url_of_db = pg_url(pg_schema)
    generator = await start_server(DATABASE_URL=url_of_db, WS_PORT=str(free_port()))
    other = await start_server(DATABASE_URL=url_of_db, WS_PORT=str(free_port()))
    long = "a long story [[fake:tokens=250]] [[fake:delay=0.02]]"  # five seconds: it outlasts
    # the resume's first poll of the generator's mark (half a second) by far
    async with open_websocket_url(url(generator)) as asking:
        ask = {"type": "ask", "conversation_id": "roam", "prompt": long, "background": True}
        start = await start_of(asking, ask)
        first = await deltas_up_to(asking, 3)
    resume = {"type": "resume", "conversation_id": "roam", "turn_id": start["turn_id"], "after": 3}
    async with open_websocket_url(url(other)) as elsewhere:
        await elsewhere.send_message(json.dumps(resume))
        followed = [await receive(elsewhere)]
        assert generator.running.service.answer_logs.find("", start["turn_id"]) is not None
        followed += await until_end(elsewhere)  # ^ the first piece came while it still ran
    assert [reply["seq"] for reply in followed] == list(range(4, len(followed) + 4))
    assert followed[-1]["type"] == "end" and followed[-1]["finish_reason"] == "stop"
    assert text_of(first) + text_of(followed) == full_answer(1, "a long story", 250)
