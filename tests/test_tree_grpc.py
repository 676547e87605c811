"""Conversations as trees over gRPC (SPEC §12), with purerpc and grpcio clients on real sockets.

``AskRequest.parent_id`` (field 3, as in the original's later proto) branches,
``"root"`` starts a new first turn, an unknown parent is NOT_FOUND before the
model is called; ``GetConversation`` shows the active path or, with ``view``
"tree", every turn; ``SetHead``, ``DeleteTurn``, ``Rollback`` (which deletes
nothing) and ``Regenerate`` (an ask, streamed, accounted and cancelled like
``Ask``). The original's newer client (``tests/protos/original_chat_b1d2923.proto``,
compiled for grpcio at test time) branches with its field 3 instead of
changing the model, and its older one (no field 3) continues from the head.
The tests that change the tree by a turn's id run on both storage backends.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import purerpc
import pytest
import trio
from google.protobuf import descriptor_pb2
from helpers.grpc import (
    CALL_TIMEOUT,
    as_json,
    compile_for_grpcio,
    grpcio_call,
    grpcio_stream,
    rpc,
    rpc_error,
    status_of,
)
from helpers.logs import capture_access, metric
from helpers.postgres import pg_url
from helpers.servers import Server, StartServer, free_port
from helpers.upstream import ALLOW_OTHER_MODEL, echo, events_of, history_of, upstream_messages
from helpers.waiting import wait_for, wait_until

from easybackend.proto_gen import chat_pb2

PROTOS = Path(__file__).resolve().parent / "protos"
UNKNOWN_TURN = "0123456789abcdef01234567"  # well-formed, names no turn
ALICE, BOB = "sk-alice-SECRET-0001", "sk-bob-SECRET-0002"


@pytest.fixture(scope="module")
def newer_original(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The original's proto at its commit b1d2923 (askrequest field 3 is parent_id), for grpcio."""
    out = tmp_path_factory.mktemp("original_b1d2923")
    return compile_for_grpcio(PROTOS / "original_chat_b1d2923.proto", out, "original_chat_b1d2923")


@pytest.fixture(scope="module")
def older_original(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The original's proto of its README (no field 3), for grpcio."""
    out = tmp_path_factory.mktemp("original")
    return compile_for_grpcio(PROTOS / "original_chat.proto", out, "original_chat_readme")


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> dict[str, str]:
    """The server's database: the SQLite default, or a schema of the local PostgreSQL."""
    if request.param == "sqlite":
        return {}
    return {"DATABASE_URL": pg_url(request.getfixturevalue("pg_schema"))}


@pytest.fixture
async def grpc_backend_server(start_server: StartServer, backend: dict[str, str]) -> Server:
    """``grpc_server`` on each storage backend."""
    return await start_server(GRPC_PORT=str(free_port()), SHUTDOWN_GRACE="2", **backend)


async def ask(server: Server, conversation_id: str, prompt: str, **fields: Any):
    """Ask with purerpc; returns the last message (the answer must have finished)."""
    request = chat_pb2.AskRequest(conversation_id=conversation_id, prompt=prompt, **fields)
    *_, last = await rpc(server, "Ask", request)
    assert last.finish_reason and last.turn_id, last
    return last


async def regenerate(server: Server, conversation_id: str, turn_id: str, **fields: Any):
    """Regenerate with purerpc; returns (the answer's text, the last message)."""
    request = chat_pb2.RegenerateRequest(conversation_id=conversation_id, turn_id=turn_id, **fields)
    *pieces, last = await rpc(server, "Regenerate", request)
    assert last.finish_reason and last.turn_id, last
    return "".join(piece.response for piece in pieces), last


async def get(server: Server, conversation_id: str, view: str = "") -> chat_pb2.Conversation:
    request = chat_pb2.ConversationRequest(conversation_id=conversation_id, view=view)
    return await rpc(server, "GetConversation", request)


def prompts(turns: Any) -> list[str]:
    return [turn.messages[0].text for turn in turns]


def refused_before_upstream(server: Server, sent: int) -> None:
    assert len(server.fake.requests) == sent, "a refused ask reached the model"


# --------------------------------------------------------------------------- asking on a branch


async def test_parent_id_branches_and_the_model_sees_that_path_only(grpc_server: Server):
    one = await ask(grpc_server, "br", "one")
    two = await ask(grpc_server, "br", "two")
    await ask(grpc_server, "br", "three")

    edited = await ask(grpc_server, "br", "two, edited", parent_id=one.turn_id)

    # the context is the path root -> one: not two, not three
    assert history_of(upstream_messages(grpc_server.fake)) == [("one", echo(1, "one"))]
    assert edited.turn == 2 and edited.model == grpc_server.settings.model
    conversation = await get(grpc_server, "br")
    assert conversation.HasField("head") and conversation.head == edited.turn_id
    assert (conversation.turns, conversation.stored_turns) == (2, 4)
    first, second = conversation.history
    assert prompts(conversation.history) == ["one", "two, edited"]
    assert first.id == one.turn_id and not first.HasField("parent_id")
    assert list(first.siblings) == [one.turn_id]
    assert (second.id, second.parent_id, second.turn) == (edited.turn_id, one.turn_id, 2)
    assert list(second.siblings) == [two.turn_id, edited.turn_id]  # creation order: 2/2
    # the new turn is the head: the next ask continues from it
    await ask(grpc_server, "br", "after the edit")
    assert [p for p, _ in history_of(upstream_messages(grpc_server.fake))] == [
        "one",
        "two, edited",
    ]


async def test_root_starts_a_new_first_turn(grpc_server: Server):
    first = await ask(grpc_server, "rt", "first")
    await ask(grpc_server, "rt", "second")

    again = await ask(grpc_server, "rt", "first, edited", parent_id="root")

    assert history_of(upstream_messages(grpc_server.fake)) == []  # nothing before it
    assert again.turn == 1
    conversation = await get(grpc_server, "rt")
    (only,) = conversation.history
    assert only.id == again.turn_id and not only.HasField("parent_id")
    assert list(only.siblings) == [first.turn_id, again.turn_id]
    assert (conversation.turns, conversation.stored_turns) == (1, 3)


async def test_an_unknown_or_malformed_parent_is_refused_before_the_model_is_called(
    grpc_server: Server,
):
    await ask(grpc_server, "unknown", "hello")
    elsewhere = await ask(grpc_server, "elsewhere", "a turn of another conversation")
    sent = len(grpc_server.fake.requests)

    for parent in (UNKNOWN_TURN, elsewhere.turn_id, "other-model"):
        for conversation_id in ("unknown", "new-conversation"):
            request = chat_pb2.AskRequest(
                conversation_id=conversation_id, prompt="x", parent_id=parent
            )
            code, message = status_of(await rpc_error(grpc_server, "Ask", request))
            assert code == purerpc.StatusCode.NOT_FOUND and parent in message, message
    # what a client generated from the previous proto sends as its model (field 3)
    for bad in ("gpt-4.1-mini", "not/an id", "x" * 65):
        request = chat_pb2.AskRequest(conversation_id="unknown", prompt="x", parent_id=bad)
        code, message = status_of(await rpc_error(grpc_server, "Ask", request))
        assert code == purerpc.StatusCode.INVALID_ARGUMENT and "parent_id" in message, message
    # grpcio sees the same
    request = chat_pb2.AskRequest(conversation_id="unknown", prompt="x", parent_id=UNKNOWN_TURN)
    failed = await grpcio_stream(grpc_server.running.grpc_port, "Ask", request)
    assert failed.code == grpc.StatusCode.NOT_FOUND and not failed.replies

    refused_before_upstream(grpc_server, sent)
    assert (await get(grpc_server, "unknown")).stored_turns == 1
    listing = await rpc(grpc_server, "ListConversations", chat_pb2.ListConversationsRequest())
    assert sorted(c.conversation_id for c in listing.conversations) == ["elsewhere", "unknown"]


async def test_the_last_message_carries_the_turn_id_that_get_conversation_shows_as_head(
    grpc_server: Server,
):
    port = grpc_server.running.grpc_port
    request = chat_pb2.AskRequest(conversation_id="ends", prompt="over grpcio")
    first = await grpcio_stream(port, "Ask", request)
    assert first.code == grpc.StatusCode.OK, first.details
    start, *pieces, end = first.replies
    assert all(not piece.turn_id and not piece.turn for piece in pieces)  # the start, the last
    assert end.turn == 1 and end.turn_id and start.turn_id == end.turn_id and not start.turn
    after_first = await trio.to_thread.run_sync(
        lambda: grpcio_call(
            port,
            "GetConversation",
            chat_pb2.ConversationRequest(conversation_id="ends"),
            chat_pb2.Conversation,
        )
    )
    second = await ask(grpc_server, "ends", "over purerpc")

    conversation = await get(grpc_server, "ends")
    assert after_first.head == end.turn_id
    assert conversation.head == second.turn_id and second.turn == 2
    assert [turn.id for turn in conversation.history] == [end.turn_id, second.turn_id]
    assert conversation.history[1].parent_id == end.turn_id


# --------------------------------------------------------------------------- reading


async def test_get_conversation_path_and_tree_views_are_the_http_forms(grpc_server: Server):
    one = await ask(grpc_server, "views", "one")
    two = await ask(grpc_server, "views", "two")
    side = await ask(grpc_server, "views", "side", parent_id=one.turn_id)

    path = await get(grpc_server, "views")
    also_path = await get(grpc_server, "views", view="path")
    tree = await get(grpc_server, "views", view="tree")
    async with grpc_server.client() as client:
        http_path = (await client.get("/conversations/views")).json()
        http_tree = (await client.get("/conversations/views", params={"view": "tree"})).json()
    code, message = status_of(
        await rpc_error(
            grpc_server,
            "GetConversation",
            chat_pb2.ConversationRequest(conversation_id="views", view="everything"),
        )
    )

    assert [turn.id for turn in path.history] == [one.turn_id, side.turn_id]
    assert list(path.tree) == [] and path == also_path
    assert [turn.id for turn in tree.history] == [one.turn_id, side.turn_id]
    assert [turn.id for turn in tree.tree] == [one.turn_id, two.turn_id, side.turn_id]
    assert [turn.turn for turn in tree.tree] == [1, 2, 2]  # the position on each turn's path
    assert tree.tree[1].parent_id == tree.tree[2].parent_id == one.turn_id
    assert list(tree.tree[1].siblings) == [two.turn_id, side.turn_id]
    assert as_json(path) == http_path  # every field the same, times included
    assert as_json(tree, tree=True) == http_tree
    # a Conversation still decodes as a ConversationSummary (same numbers)
    summary = chat_pb2.ConversationSummary.FromString(tree.SerializeToString())
    assert (summary.head, summary.stored_turns, summary.turns) == (side.turn_id, 3, 2)
    listing = await rpc(grpc_server, "ListConversations", chat_pb2.ListConversationsRequest())
    assert (listing.conversations[0].head, listing.conversations[0].stored_turns) == (
        side.turn_id,
        3,
    )
    assert code == purerpc.StatusCode.INVALID_ARGUMENT and "view" in message


# --------------------------------------------------------------------------- the head


async def test_set_head_switches_branch_and_rollback_deletes_nothing(grpc_backend_server: Server):
    grpc_server = grpc_backend_server
    one = await ask(grpc_server, "hd", "one")
    await ask(grpc_server, "hd", "two")
    three = await ask(grpc_server, "hd", "three")

    rolled = await rpc(
        grpc_server, "Rollback", chat_pb2.RollbackRequest(conversation_id="hd", turns=2)
    )
    assert (rolled.removed, rolled.turns, rolled.head) == (2, 1, one.turn_id)
    await ask(grpc_server, "hd", "four")  # a branch beside two
    assert history_of(upstream_messages(grpc_server.fake)) == [("one", echo(1, "one"))]
    assert (await get(grpc_server, "hd", view="tree")).stored_turns == 4  # nothing deleted

    switched = await rpc(
        grpc_server, "SetHead", chat_pb2.SetHeadRequest(conversation_id="hd", turn_id=three.turn_id)
    )
    assert (switched.conversation_id, switched.head) == ("hd", three.turn_id)
    await ask(grpc_server, "hd", "five")  # continues from three
    assert [p for p, _ in history_of(upstream_messages(grpc_server.fake))] == [
        "one",
        "two",
        "three",
    ]

    to_root = await rpc(
        grpc_server, "SetHead", chat_pb2.SetHeadRequest(conversation_id="hd", turn_id="root")
    )
    assert not to_root.HasField("head")
    assert list((await get(grpc_server, "hd")).history) == []
    fresh = await ask(grpc_server, "hd", "fresh start")
    assert history_of(upstream_messages(grpc_server.fake)) == [] and fresh.turn == 1
    rolled = await rpc(
        grpc_server, "Rollback", chat_pb2.RollbackRequest(conversation_id="hd", turns=5)
    )
    assert (rolled.removed, rolled.turns, rolled.HasField("head")) == (1, 0, False)

    for conversation_id, turn_id, expected in (
        ("hd", UNKNOWN_TURN, purerpc.StatusCode.NOT_FOUND),
        ("nowhere", one.turn_id, purerpc.StatusCode.NOT_FOUND),
        ("hd", "a b", purerpc.StatusCode.INVALID_ARGUMENT),
        ("hd", "", purerpc.StatusCode.INVALID_ARGUMENT),
        ("bad id", one.turn_id, purerpc.StatusCode.INVALID_ARGUMENT),
    ):
        request = chat_pb2.SetHeadRequest(conversation_id=conversation_id, turn_id=turn_id)
        code, _ = status_of(await rpc_error(grpc_server, "SetHead", request))
        assert code == expected, (conversation_id, turn_id)
    assert (await get(grpc_server, "hd")).stored_turns == 6


async def test_delete_turn_deletes_its_branch_and_moves_the_head_up(grpc_backend_server: Server):
    grpc_server = grpc_backend_server
    one = await ask(grpc_server, "del", "one")
    two = await ask(grpc_server, "del", "two")
    await ask(grpc_server, "del", "three")
    side = await ask(grpc_server, "del", "side", parent_id=one.turn_id)
    before = await get(grpc_server, "del")

    def delete(turn_id: str) -> chat_pb2.DeleteTurnRequest:
        return chat_pb2.DeleteTurnRequest(conversation_id="del", turn_id=turn_id)

    # a branch the head is not on: the head stays
    kept = await rpc(grpc_server, "DeleteTurn", delete(two.turn_id))
    assert (kept.conversation_id, kept.deleted, kept.head) == ("del", 2, side.turn_id)
    # the branch holding the head: the head moves to the deleted turn's parent
    moved = await rpc(grpc_server, "DeleteTurn", delete(side.turn_id))
    assert (moved.deleted, moved.head) == (1, one.turn_id)
    after = await get(grpc_server, "del", view="tree")
    gone = await rpc_error(grpc_server, "DeleteTurn", delete(two.turn_id))
    malformed = await rpc_error(grpc_server, "DeleteTurn", delete("a.b"))
    regenerate_gone = await rpc_error(
        grpc_server,
        "Regenerate",
        chat_pb2.RegenerateRequest(conversation_id="del", turn_id=two.turn_id),
    )
    last = await rpc(grpc_server, "DeleteTurn", delete(one.turn_id))
    emptied = await get(grpc_server, "del")

    assert [turn.id for turn in after.tree] == [one.turn_id]
    assert list(after.history[0].siblings) == [one.turn_id]
    assert (after.stored_turns, after.head) == (1, one.turn_id)
    assert after.usage == before.usage  # the totals count every answered turn
    assert status_of(gone)[0] == purerpc.StatusCode.NOT_FOUND
    assert status_of(malformed)[0] == purerpc.StatusCode.INVALID_ARGUMENT
    assert status_of(regenerate_gone)[0] == purerpc.StatusCode.NOT_FOUND
    assert (last.deleted, last.HasField("head")) == (1, False)
    assert (emptied.stored_turns, emptied.HasField("head")) == (0, False)


# --------------------------------------------------------------------------- regenerate


async def test_regenerate_answers_the_prompt_again_as_a_sibling_that_becomes_the_head(
    start_server: StartServer, backend: dict[str, str]
):
    grpc_server = await start_server(
        GRPC_PORT=str(free_port()), SHUTDOWN_GRACE="2", **ALLOW_OTHER_MODEL, **backend
    )
    one = await ask(grpc_server, "rg", "one")
    two = await ask(grpc_server, "rg", "two")
    await ask(grpc_server, "rg", "three")

    text, again = await regenerate(grpc_server, "rg", two.turn_id)

    # the same prompt, with the context of the regenerated turn: the path to its parent
    assert history_of(upstream_messages(grpc_server.fake)) == [("one", echo(1, "one"))]
    assert upstream_messages(grpc_server.fake)[-1] == {"role": "user", "content": "two"}
    assert text == echo(3, "two") and again.turn == 2
    conversation = await get(grpc_server, "rg")
    assert conversation.head == again.turn_id
    assert prompts(conversation.history) == ["one", "two"]
    assert list(conversation.history[1].siblings) == [two.turn_id, again.turn_id]
    # the overrides are the AskRequest's (fields 16-19), over grpcio too
    request = chat_pb2.RegenerateRequest(
        conversation_id="rg", turn_id=two.turn_id, model="other-model", max_tokens=1
    )
    streamed = await grpcio_stream(grpc_server.running.grpc_port, "Regenerate", request)
    assert streamed.code == grpc.StatusCode.OK, streamed.details
    end = streamed.replies[-1]
    assert (end.model, end.finish_reason, end.turn) == ("other-model", "length", 2)
    body = grpc_server.fake.requests[-1]["body"]
    assert body["model"] == "other-model"
    assert body.get("max_tokens", body.get("max_completion_tokens")) == 1
    # the very first turn: a new first turn, its context empty
    _, first_again = await regenerate(grpc_server, "rg", one.turn_id)
    assert history_of(upstream_messages(grpc_server.fake)) == [] and first_again.turn == 1
    tree = await get(grpc_server, "rg", view="tree")
    assert [t.id for t in tree.tree if t.turn == 2] == [two.turn_id, again.turn_id, end.turn_id]
    assert tree.head == first_again.turn_id and tree.stored_turns == 6

    sent = len(grpc_server.fake.requests)
    for turn_id, expected in (
        (UNKNOWN_TURN, purerpc.StatusCode.NOT_FOUND),
        ("a.b", purerpc.StatusCode.INVALID_ARGUMENT),
        ("", purerpc.StatusCode.INVALID_ARGUMENT),
        ("root", purerpc.StatusCode.NOT_FOUND),  # no turn is "root": no sibling of it
    ):
        request = chat_pb2.RegenerateRequest(conversation_id="rg", turn_id=turn_id)
        code, _ = status_of(await rpc_error(grpc_server, "Regenerate", request))
        assert code == expected, turn_id
    request = chat_pb2.RegenerateRequest(conversation_id="rg", turn_id=two.turn_id, temperature=7)
    code, message = status_of(await rpc_error(grpc_server, "Regenerate", request))
    assert code == purerpc.StatusCode.INVALID_ARGUMENT and "temperature" in message
    refused_before_upstream(grpc_server, sent)


async def test_a_cancelled_regenerate_stores_its_partial_answer_as_a_cancelled_sibling(
    grpc_backend_server: Server,
):
    grpc_server = grpc_backend_server
    first = await ask(grpc_server, "rgc", "long [[fake:tokens=200]] [[fake:delay=0.02]]")
    request = chat_pb2.RegenerateRequest(conversation_id="rgc", turn_id=first.turn_id)

    cancelled = await grpcio_stream(
        grpc_server.running.grpc_port, "Regenerate", request, cancel_after=3
    )

    assert cancelled.code == grpc.StatusCode.CANCELLED
    await wait_until(lambda: "disconnected" in events_of(grpc_server.fake, "chatcmpl-2"))

    async def stored_both() -> bool:
        return (await get(grpc_server, "rgc", view="tree")).stored_turns == 2

    await wait_for(stored_both)
    conversation = await get(grpc_server, "rgc")
    (partial,) = conversation.history
    assert partial.finish_reason == "cancelled"
    assert list(partial.siblings) == [first.turn_id, partial.id]
    assert conversation.head == partial.id and not partial.HasField("parent_id")
    answer = partial.messages[1].text
    assert answer.startswith(cancelled.text) and len(answer) < 200
    assert partial.messages[0].text.startswith("long")  # the regenerated turn's prompt


async def test_regenerate_is_an_ask_for_keys_access_lines_and_metrics(start_server: StartServer):
    server = await start_server(
        GRPC_PORT=str(free_port()), HTTP_PORT="off", API_KEYS=f"alice:{ALICE},bob:{BOB}"
    )
    alice = {"authorization": f"Bearer {ALICE}"}
    *_, first = await rpc(
        server, "Ask", chat_pb2.AskRequest(conversation_id="k", prompt="hi"), metadata=alice
    )
    request = chat_pb2.RegenerateRequest(conversation_id="k", turn_id=first.turn_id)
    port = server.running.grpc_port

    with capture_access() as access:
        wrong = await grpcio_stream(
            port, "Regenerate", request, api_key="nope-SECRET", request_id="rg-1"
        )
        other_key = await grpcio_stream(port, "Regenerate", request, api_key=BOB, request_id="rg-2")
        right = await grpcio_stream(port, "Regenerate", request, api_key=ALICE, request_id="rg-3")
        lines = await access.wait_for(3)

    assert wrong.code == grpc.StatusCode.UNAUTHENTICATED
    assert other_key.code == grpc.StatusCode.NOT_FOUND  # bob's conversation "k" has no such turn
    assert right.code == grpc.StatusCode.OK and right.replies[-1].turn_id
    assert [(line["request_id"], line["outcome"], line["key"]) for line in lines] == [
        ("rg-1", "unauthenticated", "-"),
        ("rg-2", "not_found", "bob"),
        ("rg-3", "ok", "alice"),
    ]
    assert {(line["protocol"], line["conversation_id"]) for line in lines} == {("grpc", "k")}
    text = server.running.service.metrics.render().decode()
    counted = "easybackend_asks_total"
    assert metric(text, counted, protocol="grpc", outcome="unauthenticated") == 1
    assert metric(text, counted, protocol="grpc", outcome="ok") == 2
    assert len(server.fake.requests) == 2  # the refused regenerates never reached the model


# --------------------------------------------------------------------------- the original's clients


def original_ask(server: Server, proto: SimpleNamespace, **fields: str) -> list[str]:
    """Ask with one of the original's grpcio clients (blocking); the response texts."""
    with grpc.insecure_channel(f"127.0.0.1:{server.running.grpc_port}") as channel:
        replies = proto.grpc.ChatStub(channel).Ask(
            proto.pb2.askrequest(**fields), timeout=CALL_TIMEOUT
        )
        return [reply.response for reply in replies]


async def test_the_originals_newer_client_branches_with_parent_id_instead_of_changing_the_model(
    grpc_server: Server, newer_original: SimpleNamespace
):
    def run(**fields: str) -> list[str]:
        return original_ask(grpc_server, newer_original, conversation_id="orig", **fields)

    await trio.to_thread.run_sync(lambda: run(prompt="one"))
    await trio.to_thread.run_sync(lambda: run(prompt="two"))
    one, two = (await get(grpc_server, "orig")).history

    # what `grpc_client.py --parent_id <id>` sends: field 3
    replies = await trio.to_thread.run_sync(lambda: run(prompt="two, again", parent_id=one.id))

    assert "".join(replies) == echo(3, "two, again")
    body = grpc_server.fake.requests[-1]["body"]
    assert body["model"] == grpc_server.settings.model  # not the parent's id
    assert history_of(body["messages"]) == [("one", echo(1, "one"))]
    conversation = await get(grpc_server, "orig")
    new = conversation.history[-1]
    assert (new.parent_id, new.model, conversation.head) == (
        one.id,
        grpc_server.settings.model,
        new.id,
    )
    assert list(new.siblings) == [two.id, new.id]

    def unknown() -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as failed:
            run(prompt="x", parent_id=UNKNOWN_TURN)
        return failed.value

    sent = len(grpc_server.fake.requests)
    error = await trio.to_thread.run_sync(unknown)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    refused_before_upstream(grpc_server, sent)


async def test_the_originals_older_client_still_continues_from_the_head(
    grpc_server: Server, older_original: SimpleNamespace
):
    def run(prompt: str) -> list[str]:
        return original_ask(grpc_server, older_original, conversation_id="old", prompt=prompt)

    await trio.to_thread.run_sync(lambda: run("one"))
    replies = await trio.to_thread.run_sync(lambda: run("two"))

    assert "".join(replies) == echo(3, "two")
    assert history_of(upstream_messages(grpc_server.fake)) == [("one", echo(1, "one"))]
    assert grpc_server.fake.requests[-1]["body"]["model"] == grpc_server.settings.model
    conversation = await get(grpc_server, "old")
    one, two = conversation.history
    assert (two.parent_id, conversation.head) == (one.id, two.id)


def _fields(message: Any) -> dict[int, tuple[str, int]]:
    """A message's fields by number: (name, type)."""
    return {field.number: (field.name, field.type) for field in message.DESCRIPTOR.fields}


def test_field_numbers_keep_to_the_originals_and_never_collide(
    newer_original: SimpleNamespace,
):
    ours = _fields(chat_pb2.AskRequest)
    for number, (name, kind) in _fields(newer_original.pb2.askrequest).items():
        assert ours[number] == (name, kind), number  # prompt, conversation_id, parent_id
    string = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
    assert ours[3] == ("parent_id", string)
    # the per-turn overrides, and the end user the ask is for (USER_RPM)
    overrides = {16: "model", 17: "temperature", 18: "max_tokens", 19: "system", 20: "user"}
    # and a background ask (SPEC §18), in both requests too
    assert {number: name for number, (name, _) in ours.items() if number > 3} == {
        **overrides,
        21: "background",
    }
    assert (
        _fields(chat_pb2.RegenerateRequest).items() >= {n: ours[n] for n in overrides}.items()
    )  # the same overrides at the same numbers
    # AskResponse: the original's 1, our 2-4 from before, nothing else below 16
    response = _fields(chat_pb2.AskResponse)
    assert sorted(response) == [1, 2, 3, 4, 16, 17, 18, 19]
    assert response[16] == ("turn_id", string)
    assert (response[18][0], response[19][0]) == ("seq", "more")
    # a Conversation decodes as a ConversationSummary
    summary, conversation = _fields(chat_pb2.ConversationSummary), _fields(chat_pb2.Conversation)
    assert all(conversation[number] == field for number, field in summary.items())
