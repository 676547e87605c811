"""Answers that survive a dropped connection on gRPC (SPEC §18): numbered AskResponses with a
start, ``background`` asks, the ``Resume`` and ``CancelAnswer`` RPCs, over real sockets with
purerpc and grpcio clients against the fake upstream."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio
import grpc
import purerpc
import pytest
import trio
from helpers.database import stored_turns
from helpers.grpc import CALL_TIMEOUT, grpcio_stream, rpc, rpc_error, status_of
from helpers.http import bearer
from helpers.one_piece_upstream import serve_one_piece
from helpers.postgres import pg_url
from helpers.servers import Server, StartServer, free_port
from helpers.upstream import full_answer

from easybackend.proto_gen import chat_grpc, chat_pb2

SLOW = "tell me a long story [[fake:tokens=60]] [[fake:delay=0.02]]"
SLOW_ANSWER = full_answer(1, "tell me a long story", 60)
KEY_A, KEY_B = "sk-resume-grpc-alice-0123456789", "sk-resume-grpc-bob-0123456789ab"
LIMIT = 65536  # MAX_BODY_BYTES where a piece is cut
HUGE_PIECE = 'ab"\n é中😀' * 12_000  # ~2.5 limits of UTF-8 in one piece


def ask(conversation_id: str, prompt: str = SLOW, **fields: Any) -> chat_pb2.AskRequest:
    return chat_pb2.AskRequest(conversation_id=conversation_id, prompt=prompt, **fields)


def resume(conversation_id: str, turn_id: str, after: int = 0) -> chat_pb2.ResumeRequest:
    return chat_pb2.ResumeRequest(conversation_id=conversation_id, turn_id=turn_id, after=after)


def text_of(replies: list[chat_pb2.AskResponse]) -> str:
    return "".join(reply.response for reply in replies)


def stored(server: Server, conversation_id: str, owner: str = "") -> tuple[str, str]:
    (turn,) = stored_turns(server.settings.sqlite_path, conversation_id, owner)
    return turn["answer"], turn["finish_reason"]


async def first_messages(
    server: Server,
    request: chat_pb2.AskRequest,
    count: int,
    *,
    metadata: Mapping[str, str] | None = None,
    crash: bool = False,
) -> list[chat_pb2.AskResponse]:
    """Ask with purerpc and read ``count`` messages, then leave: the call is cancelled (its
    stream reset) or, with ``crash``, the connection is closed under the call, as when the
    client dies."""
    replies: list[chat_pb2.AskResponse] = []
    channel = purerpc.insecure_channel("127.0.0.1", server.running.grpc_port)
    with trio.fail_after(CALL_TIMEOUT):
        try:
            async with channel:
                stub = chat_grpc.ChatStub(channel)
                sent = list(metadata.items()) if metadata else None
                async for reply in stub.Ask(request, metadata=sent):
                    replies.append(reply)
                    if len(replies) == count:
                        if crash:
                            await anyio.aclose_forcefully(channel._grpc_socket._socket._stream)
                        break
        except* (trio.ClosedResourceError, anyio.ClosedResourceError, anyio.BrokenResourceError):
            assert crash  # the channel's own tasks find their socket gone
        finally:  # purerpc leaves its TCP connection open
            if channel._grpc_socket is not None:
                await anyio.aclose_forcefully(channel._grpc_socket._socket._stream)
    return replies


async def test_an_answer_starts_with_its_turn_and_numbers_every_message(grpc_server: Server):
    purerpc_replies = await rpc(grpc_server, "Ask", ask("pure", "hi [[fake:tokens=6]]"))
    grpcio = await grpcio_stream(
        grpc_server.running.grpc_port, "Ask", ask("io", "hi [[fake:tokens=6]]")
    )
    assert grpcio.code == grpc.StatusCode.OK, grpcio.details
    for replies in (purerpc_replies, grpcio.replies):
        start, *pieces, last = replies
        assert (start.response, start.seq, start.finish_reason) == ("", 1, "")
        assert start.turn_id and start.turn_id == last.turn_id
        assert [reply.seq for reply in replies] == list(range(1, len(replies) + 1))
        assert not any(reply.more for reply in replies)
        assert text_of(pieces) == full_answer(1, "hi", 6) and last.finish_reason == "stop"


async def test_a_background_answer_survives_a_cancelled_call_and_a_resume_gets_the_rest(
    grpc_server: Server,
):
    port = grpc_server.running.grpc_port
    uninterrupted = await rpc(grpc_server, "Ask", ask("whole"))
    assert text_of(uninterrupted) == SLOW_ANSWER
    # grpcio: the client cancels the call after 5 messages (the start and 4 pieces)
    before = await grpcio_stream(port, "Ask", ask("tunnel", background=True), cancel_after=5)
    assert before.code == grpc.StatusCode.CANCELLED and len(before.replies) == 5
    turn_id, last_seen = before.replies[0].turn_id, before.replies[-1].seq
    # purerpc reattaches after the last message it saw
    after = await rpc(grpc_server, "Resume", resume("tunnel", turn_id, last_seen))
    assert [reply.seq for reply in after] == list(range(last_seen + 1, after[-1].seq + 1))
    assert after[-1].finish_reason == "stop" and after[-1].turn_id == turn_id
    assert text_of(before.replies) + text_of(after) == text_of(uninterrupted)
    assert stored(grpc_server, "tunnel") == (SLOW_ANSWER, "stop")


async def test_a_finished_answer_is_replayed_from_any_seq(grpc_server: Server):
    first = await rpc(grpc_server, "Ask", ask("done", "replay [[fake:tokens=8]]"))
    turn_id = first[0].turn_id
    whole = await rpc(grpc_server, "Resume", resume("done", turn_id))
    from_four = await grpcio_stream(
        grpc_server.running.grpc_port, "Resume", resume("done", turn_id, 4)
    )
    assert whole == first
    assert from_four.code == grpc.StatusCode.OK and from_four.replies == first[4:]
    (beyond,) = await rpc(grpc_server, "Resume", resume("done", turn_id, 1000))
    # nothing after the end: a last message tells how the answer ended, not numbered
    assert (beyond.finish_reason, beyond.seq, beyond.turn_id) == ("stop", 0, turn_id)


async def test_two_followers_of_one_answer_get_the_same_messages(grpc_server: Server):
    followed: dict[str, list[chat_pb2.AskResponse]] = {}
    started = trio.Event()
    turn: list[str] = []

    async def asker() -> None:
        async with purerpc.insecure_channel("127.0.0.1", grpc_server.running.grpc_port) as ch:
            replies = []
            async for reply in chat_grpc.ChatStub(ch).Ask(ask("pair", background=True)):
                replies.append(reply)
                if len(replies) == 1:
                    turn.append(reply.turn_id)
                    started.set()
            followed["asker"] = replies

    async def follower() -> None:
        await started.wait()
        followed["other"] = await rpc(grpc_server, "Resume", resume("pair", turn[0]))

    with trio.fail_after(CALL_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(asker)
            nursery.start_soon(follower)
    assert followed["asker"] == followed["other"]
    assert followed["other"][-1].finish_reason == "stop"
    assert text_of(followed["other"]) == SLOW_ANSWER


async def test_cancel_answer_stops_a_background_answer_stored_as_cancelled(grpc_server: Server):
    port = grpc_server.running.grpc_port
    sink: list[chat_pb2.AskResponse] = []
    result: list[Any] = []

    async def follow() -> None:
        result.append(await grpcio_stream(port, "Ask", ask("stop", background=True), sink=sink))

    with trio.fail_after(CALL_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            while len(sink) < 4:  # the start and 3 pieces
                await trio.sleep(0.01)
            request = chat_pb2.CancelAnswerRequest(conversation_id="stop", turn_id=sink[0].turn_id)
            reply = await rpc(grpc_server, "CancelAnswer", request)
    assert (reply.turn_id, reply.cancelled) == (sink[0].turn_id, True)
    (followed,) = result
    assert followed.code == grpc.StatusCode.OK, followed.details
    last = followed.replies[-1]
    assert (last.finish_reason, last.turn_id) == ("cancelled", sink[0].turn_id)
    assert [reply.seq for reply in followed.replies] == list(range(1, len(followed.replies) + 1))
    answer, finish_reason = stored(grpc_server, "stop")
    assert finish_reason == "cancelled" and answer == text_of(followed.replies)
    assert SLOW_ANSWER.startswith(answer) and len(answer) < len(SLOW_ANSWER)
    again = await rpc_error(grpc_server, "CancelAnswer", request)
    assert status_of(again)[0] == purerpc.StatusCode.NOT_FOUND
    replayed = await rpc(grpc_server, "Resume", resume("stop", sink[0].turn_id))
    assert text_of(replayed) == answer and replayed[-1].finish_reason == "cancelled"


async def test_a_background_answer_outlives_a_crashed_client_and_is_stored_whole(
    grpc_server: Server,
):
    before = await first_messages(grpc_server, ask("crash", background=True), 4, crash=True)
    turn_id = before[0].turn_id
    rest = await rpc(grpc_server, "Resume", resume("crash", turn_id, before[-1].seq))
    assert rest[-1].finish_reason == "stop"
    assert text_of(before) + text_of(rest) == SLOW_ANSWER
    assert stored(grpc_server, "crash") == (SLOW_ANSWER, "stop")
    assert [event["event"] for event in grpc_server.fake.events][-1] == "completed"


async def test_without_background_a_gone_client_still_cancels_the_answer(grpc_server: Server):
    before = await first_messages(grpc_server, ask("gone"), 4, crash=True)
    with trio.fail_after(5):
        while not stored_turns(grpc_server.settings.sqlite_path, "gone"):
            await trio.sleep(0.01)
    answer, finish_reason = stored(grpc_server, "gone")
    assert finish_reason == "cancelled" and answer.startswith(text_of(before))


async def test_a_piece_cut_across_messages_keeps_one_seq(nursery, start_server: StartServer):
    port = await nursery.start(serve_one_piece, HUGE_PIECE)
    server = await start_server(
        OPENAI_BASE_URL=f"http://127.0.0.1:{port}/v1",
        MAX_BODY_BYTES=str(LIMIT),
        GRPC_PORT=str(free_port()),
        HTTP_PORT="off",
        SHUTDOWN_GRACE="2",
    )
    first = await rpc(server, "Ask", ask("cut", "hi"))
    start, *parts, end = first
    assert len(parts) > 2 and {part.seq for part in parts} == {2}  # one event, cut
    assert [part.more for part in parts] == [True] * (len(parts) - 1) + [False]
    assert all(reply.ByteSize() <= LIMIT for reply in first)
    assert text_of(parts) == HUGE_PIECE and (start.seq, end.seq) == (1, 3)
    replayed = await rpc(server, "Resume", resume("cut", start.turn_id, 1))
    assert replayed == first[1:]  # the whole event 2 again, cut the same way, then 3


@pytest.mark.parametrize("background", [False, True])
async def test_unknown_turns_and_another_keys_turns_are_not_found(
    start_server: StartServer, background: bool
):
    server = await start_server(
        GRPC_PORT=str(free_port()),
        HTTP_PORT="off",
        SHUTDOWN_GRACE="2",
        API_KEYS=f"alice:{KEY_A},bob:{KEY_B}",
    )
    alice, bob = bearer(KEY_A), bearer(KEY_B)
    replies = await rpc(server, "Ask", ask("mine", "hi", background=background), metadata=alice)
    turn_id = replies[0].turn_id
    cancel = chat_pb2.CancelAnswerRequest(conversation_id="mine", turn_id=turn_id)
    for method, request, metadata in (
        ("Resume", resume("mine", turn_id), bob),
        ("Resume", resume("mine", "no-such-turn"), alice),
        ("CancelAnswer", cancel, bob),
        ("CancelAnswer", cancel, alice),  # it has ended
    ):
        error = await rpc_error(server, method, request, metadata=metadata)
        assert status_of(error)[0] == purerpc.StatusCode.NOT_FOUND, (method, status_of(error))
    grpcio = await grpcio_stream(
        server.running.grpc_port, "Resume", resume("mine", turn_id), api_key=KEY_B
    )
    assert grpcio.code == grpc.StatusCode.NOT_FOUND and grpcio.replies == []
    error = await rpc_error(server, "Resume", resume("mine", turn_id, -1), metadata=alice)
    assert status_of(error)[0] == purerpc.StatusCode.INVALID_ARGUMENT
    assert await rpc(server, "Resume", resume("mine", turn_id), metadata=alice) == replies


async def test_a_shutdown_cuts_a_background_answer_at_the_end_of_its_grace(
    start_server: StartServer,
):
    server = await start_server(GRPC_PORT=str(free_port()), HTTP_PORT="off", SHUTDOWN_GRACE="0.3")
    sink: list[chat_pb2.AskResponse] = []
    result: list[Any] = []

    async def follow() -> None:
        request = ask("cut-short", background=True)
        result.append(await grpcio_stream(server.running.grpc_port, "Ask", request, sink=sink))

    with trio.fail_after(CALL_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            while not sink:  # the start: the answer is under way
                await trio.sleep(0.01)
            server.shutdown.set()  # a 0.3 s grace for a 1.2 s answer
        await server.stopped.wait()
    (followed,) = result
    assert followed.code == grpc.StatusCode.UNAVAILABLE and "shutting down" in followed.details
    answer, finish_reason = stored(server, "cut-short")
    assert finish_reason == "cancelled" and SLOW_ANSWER.startswith(answer)
    assert len(answer) < len(SLOW_ANSWER)  # cut, and stored as far as it went
    assert text_of(followed.replies) == answer[: len(text_of(followed.replies))]


async def test_a_resume_on_another_instance_follows_the_answer_while_it_runs(
    start_server: StartServer, pg_schema
):
    """Two servers on one PostgreSQL database: a background answer asked on one is followed
    by a purerpc ``Resume`` on the other while it runs, with the generator's numbers."""
    url = pg_url(pg_schema)
    generator = await start_server(DATABASE_URL=url, GRPC_PORT=str(free_port()))
    other = await start_server(DATABASE_URL=url, GRPC_PORT=str(free_port()))
    long = "a long story [[fake:tokens=250]] [[fake:delay=0.02]]"  # five seconds: it outlasts
    # the resume's first poll of the generator's mark (half a second) by far
    before = await grpcio_stream(
        generator.running.grpc_port, "Ask", ask("roam", long, background=True), cancel_after=3
    )
    turn_id = before.replies[0].turn_id
    followed: list[chat_pb2.AskResponse] = []
    running_at_first: list[bool] = []
    channel = purerpc.insecure_channel("127.0.0.1", other.running.grpc_port)
    with trio.fail_after(CALL_TIMEOUT):
        try:
            async with channel:
                stub = chat_grpc.ChatStub(channel)
                async for reply in stub.Resume(resume("roam", turn_id, 3)):
                    if not followed:  # the first piece came while the generator still answers
                        log = generator.running.service.answer_logs.find("", turn_id)
                        running_at_first.append(log is not None and not log.ended)
                    followed.append(reply)
        finally:  # purerpc leaves its TCP connection open
            if channel._grpc_socket is not None:
                await anyio.aclose_forcefully(channel._grpc_socket._socket._stream)
    assert running_at_first == [True]
    assert [reply.seq for reply in followed] == list(range(4, len(followed) + 4))
    assert followed[-1].finish_reason == "stop" and followed[-1].turn_id == turn_id
    assert text_of(before.replies) + text_of(followed) == full_answer(1, "a long story", 250)
