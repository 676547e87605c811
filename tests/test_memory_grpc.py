"""Memory beyond the window over gRPC (SPEC §15): SetSettings, the settings and title in
Conversation and ConversationSummary, GetSummary, SetSummary, Compact, with purerpc and grpcio."""

from __future__ import annotations

import purerpc
import trio
from helpers.grpc import as_json, grpcio_call, rpc, rpc_error, status_of
from helpers.memory import summary_message
from helpers.servers import free_port
from helpers.upstream import ALLOW_OTHER_MODEL, OTHER_MODEL

from easybackend.proto_gen import chat_pb2


async def test_set_settings_applies_to_asks_and_reads_as_over_http(start_server):
    server = await start_server(GRPC_PORT=str(free_port()), **ALLOW_OTHER_MODEL)
    settings = chat_pb2.ConversationSettings(
        model=OTHER_MODEL, temperature=0.25, title="Notes", memory="summarize", expires_in=0
    )
    changed = await rpc(
        server, "SetSettings", chat_pb2.SetSettingsRequest(conversation_id="gs", settings=settings)
    )
    await rpc(server, "Ask", chat_pb2.AskRequest(conversation_id="gs", prompt="hello"))
    cleared = await rpc(
        server,
        "SetSettings",
        chat_pb2.SetSettingsRequest(conversation_id="gs", clear=["temperature", "title"]),
    )
    read = await rpc(server, "GetConversation", chat_pb2.ConversationRequest(conversation_id="gs"))
    listed = await rpc(server, "ListConversations", chat_pb2.ListConversationsRequest())
    async with server.client() as client:
        http = (await client.get("/conversations/gs")).json()
        page = (await client.get("/conversations")).json()
    refused = [
        await rpc_error(server, "SetSettings", request)
        for request in (
            chat_pb2.SetSettingsRequest(conversation_id="gs", clear=["colour"]),
            chat_pb2.SetSettingsRequest(
                conversation_id="gs",
                settings=chat_pb2.ConversationSettings(title="x"),
                clear=["title"],
            ),
            chat_pb2.SetSettingsRequest(
                conversation_id="gs", settings=chat_pb2.ConversationSettings(model="nope")
            ),
            chat_pb2.SetSettingsRequest(
                conversation_id="gs", settings=chat_pb2.ConversationSettings(memory="forget")
            ),
        )
    ]

    body = server.fake.requests[0]["body"]
    assert (body["model"], body["temperature"]) == (OTHER_MODEL, 0.25)
    assert changed.settings.title == "Notes" and changed.settings.expires_in == 0
    assert not cleared.settings.HasField("title") and not cleared.settings.HasField("temperature")
    assert cleared.settings.model == OTHER_MODEL and cleared.settings.memory == "summarize"
    assert as_json(read) == {key: value for key, value in http.items() if key != "tree"}
    assert as_json(listed) == page
    assert [status_of(error)[0] for error in refused] == [
        purerpc.StatusCode.INVALID_ARGUMENT,
        purerpc.StatusCode.INVALID_ARGUMENT,
        purerpc.StatusCode.PERMISSION_DENIED,
        purerpc.StatusCode.INVALID_ARGUMENT,
    ]


async def test_summaries_over_grpc_get_set_and_compact(start_server):
    server = await start_server(GRPC_PORT=str(free_port()), MEMORY="summarize")
    request = chat_pb2.ConversationRequest(conversation_id="gsum")
    for prompt in ("one", "two", "three"):
        await rpc(server, "Ask", chat_pb2.AskRequest(conversation_id="gsum", prompt=prompt))
    none_yet = await rpc(server, "GetSummary", request)
    compacted = await rpc(
        server, "Compact", chat_pb2.CompactRequest(conversation_id="gsum", keep=1)
    )
    read = await rpc(server, "GetSummary", request)
    edited = await rpc(
        server, "SetSummary", chat_pb2.SetSummaryRequest(conversation_id="gsum", summary="Edited.")
    )
    await rpc(server, "Ask", chat_pb2.AskRequest(conversation_id="gsum", prompt="four"))
    by_grpcio = await trio.to_thread.run_sync(
        grpcio_call, server.running.grpc_port, "GetSummary", request, chat_pb2.Summary
    )
    empty = await rpc_error(
        server, "SetSummary", chat_pb2.SetSummaryRequest(conversation_id="gsum", summary=" ")
    )
    unknown = await rpc_error(
        server, "GetSummary", chat_pb2.ConversationRequest(conversation_id="nobody")
    )
    async with server.client() as client:
        http = (await client.get("/conversations/gsum/summary")).json()

    assert not none_yet.HasField("summary") and none_yet.covers == 0
    assert compacted.covers == 2 and compacted.summary.startswith("echo(2): Summary so far:")
    assert read == compacted
    assert edited.summary == "Edited." and not edited.HasField("model")
    assert edited.through == compacted.through
    assert summary_message(server.fake.requests[-1]["body"]["messages"]) == "Edited."
    assert by_grpcio == edited
    assert {**as_json(edited), "model": None} == http  # unset model: null over HTTP
    assert status_of(empty)[0] == purerpc.StatusCode.INVALID_ARGUMENT
    assert status_of(unknown)[0] == purerpc.StatusCode.NOT_FOUND
