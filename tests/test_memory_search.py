"""Full-text search over the caller's conversations (SPEC §15), on SQLite and PostgreSQL, HTTP
and gRPC: prompts, answers and titles, English and Chinese, ranked and paginated."""

from __future__ import annotations

import pytest
import trio
from helpers.database import LinearConversation, sample_turn, write_linear_sqlite
from helpers.grpc import rpc
from helpers.http import bearer, error_code
from helpers.postgres import pg_url
from helpers.servers import free_port
from helpers.waiting import wait_until

from easybackend.chat.memory import INDEX_BATCH
from easybackend.chat.service import ChatService
from easybackend.chat.tokens import TokenCounter, encoding_name_for, load_encoding
from easybackend.metrics import Metrics
from easybackend.proto_gen import chat_pb2
from easybackend.settings import load_settings
from easybackend.storage import ConversationRef, open_url


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request) -> dict[str, str]:
    if request.param == "sqlite":
        return {}
    return {"DATABASE_URL": pg_url(request.getfixturevalue("pg_schema"))}


async def ask(client, conversation_id: str, prompt: str) -> None:
    reply = await client.post(f"/ask/{conversation_id}", json={"prompt": prompt})
    assert reply.status_code == 200, reply.text


async def search(client, q: str, **params) -> list[str]:
    reply = await client.get("/conversations", params={"q": q, **params})
    assert reply.status_code == 200, reply.text
    return [c["conversation_id"] for c in reply.json()["conversations"]]


async def test_search_finds_words_in_prompts_answers_and_titles_in_english_and_chinese(
    start_server, backend
):
    server = await start_server(**backend)
    async with server.client() as client:
        await ask(client, "fox", "The quick brown fox jumps over the lazy dog")
        await ask(client, "rain", "今天的天气预报说会下雨，我们还去公园吗？")
        await ask(client, "plain", "nothing to see here")
        titled = await client.put(
            "/conversations/trip/settings", json={"title": "Kyoto Trip 京都之旅"}
        )
        assert titled.status_code == 200
        results = {
            q: await search(client, q)
            for q in (
                "brown",  # a word of a prompt
                "BROWN FOX",  # case-insensitive, every word, in any order
                "fox dog",
                "天气预报",  # a Chinese word inside a sentence
                "天气",  # two characters: shorter than a trigram
                "公园吗",
                "echo(1)",  # the fake's answers are searched too
                "kyoto",  # a title
                "京都",
                "brown 天气",  # no one turn holds both
                "zebra",
                "100%",  # LIKE's own characters are taken literally
                "%",
                "_",
            )
        }

    assert results == {
        "brown": ["fox"],
        "BROWN FOX": ["fox"],
        "fox dog": ["fox"],
        "天气预报": ["rain"],
        "天气": ["rain"],
        "公园吗": ["rain"],
        "echo(1)": results["echo(1)"],
        "kyoto": ["trip"],
        "京都": ["trip"],
        "brown 天气": [],
        "zebra": [],
        "100%": [],
        "%": [],
        "_": [],
    }
    assert sorted(results["echo(1)"]) == ["fox", "plain", "rain"]


async def test_search_ranks_and_pages_like_the_listing(start_server, backend):
    server = await start_server(**backend)
    async with server.client() as client:
        await ask(client, "once", "a walrus appears")
        for number in range(3):
            await ask(client, "thrice", f"walrus number {number}")
        await ask(client, "never", "a seal appears")
        titled = await client.put("/conversations/named/settings", json={"title": "Walrus notes"})
        assert titled.status_code == 200
        ranked = await search(client, "walrus")
        pages, cursor = [], None
        while True:
            params = {"q": "walrus", "limit": 1, **({"cursor": cursor} if cursor else {})}
            page = (await client.get("/conversations", params=params)).json()
            pages.append([c["conversation_id"] for c in page["conversations"]])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        listing_cursor = (await client.get("/conversations", params={"limit": 1})).json()
        mixed = await client.get(
            "/conversations", params={"q": "walrus", "cursor": listing_cursor["next_cursor"]}
        )
        bad = [
            await client.get("/conversations", params={"q": q})
            for q in ("", " ", "x" * 201, " ".join("w" * 3 for _ in range(11)))
        ]

    assert set(ranked) == {"once", "thrice", "named"}
    assert ranked.index("thrice") < ranked.index("once")  # more matching turns rank higher
    assert [item for page in pages for item in page] == ranked
    assert pages[-1] == [] or len(pages[-1]) == 1
    assert mixed.status_code == 400 and error_code(mixed) == "invalid_input"  # not a search cursor
    assert [reply.status_code for reply in bad] == [400, 400, 400, 400]


async def test_search_sees_only_the_callers_conversations(start_server, backend):
    server = await start_server(API_KEYS="alice:alice-SECRET-1,bob:bob-SECRET-2", **backend)
    async with server.client(headers=bearer("alice-SECRET-1")) as alice:
        await ask(alice, "mine", "the password is swordfish")
        await ask(alice, "other", "nothing here")
        own = await search(alice, "swordfish")
    async with server.client(headers=bearer("bob-SECRET-2")) as bob:
        await ask(bob, "his", "swordfish for dinner")
        await ask(bob, "more", "nothing here either")
        others = await search(bob, "swordfish")

    assert own == ["mine"] and others == ["his"]


async def test_list_conversations_over_grpc_takes_a_query(start_server, backend):
    server = await start_server(GRPC_PORT=str(free_port()), **backend)
    async with server.client() as client:
        await ask(client, "g1", "今天的天气预报说会下雨")
        await ask(client, "g2", "hello world")
        http = (await client.get("/conversations", params={"q": "天气预报"})).json()
    found = await rpc(
        server, "ListConversations", chat_pb2.ListConversationsRequest(query="天气预报")
    )
    listed = await rpc(server, "ListConversations", chat_pb2.ListConversationsRequest())

    assert [c.conversation_id for c in found.conversations] == ["g1"]
    assert [c["conversation_id"] for c in http["conversations"]] == ["g1"]
    assert {c.conversation_id for c in listed.conversations} == {"g1", "g2"}


async def test_turns_stored_before_the_upgrade_are_found(start_server, tmp_path):
    path = tmp_path / "conversations" / "easybackend.sqlite3"
    path.parent.mkdir(parents=True)
    write_linear_sqlite(
        path,
        [
            LinearConversation("", "legacy", ("the old zeppelin story",)),
            LinearConversation("", "other", ("a story of boats",)),
        ],
    )
    server = await start_server()
    async with server.client() as client:
        assert await search(client, "zeppelin") == ["legacy"]
        await ask(client, "legacy", "a new turn")
        assert await search(client, "zeppelin") == ["legacy"]
        deleted = await client.delete("/conversations/legacy")
        assert deleted.status_code == 204
        assert await search(client, "zeppelin") == []


@pytest.mark.parametrize("word", ["walrus", "万里长城", "长城"])
async def test_a_title_match_ranks_first_then_more_matching_turns(start_server, backend, word):
    server = await start_server(**backend)
    async with server.client() as client:
        await ask(client, "one", f"just one {word} here, 一次")
        for number in range(3):
            await ask(client, "many", f"again {word} number {number}, 再一次")
        await ask(client, "titled", "nothing to find in this turn")
        titled = await client.put(
            "/conversations/titled/settings", json={"title": f"Notes: {word}"}
        )
        assert titled.status_code == 200, titled.text
        await ask(client, "latest", "the most recent conversation, without the word")
        ranked = await search(client, word)

    assert ranked == ["titled", "many", "one"]


async def test_a_backlog_of_turns_is_indexed_in_batches_with_a_pause_for_the_asks(tmp_path):
    """Turns stored from outside the server (an import, a copied database) are indexed in the
    background in batches, each followed by a pause as long as it took, so that the asks'
    own writes come first; and then every one of them is found."""
    settings = load_settings(
        {"OPENAI_API_KEY": "unused", "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}"},
        environ={},
        env_file=None,
    )
    store = await open_url(settings.database, settings)
    try:
        ref = ConversationRef("", "backlog")
        turns = [(sample_turn(f"needle{i} hay"), None, None) for i in range(INDEX_BATCH * 4)]
        await store.append_turns(ref, turns, None)
        counter = TokenCounter(load_encoding(encoding_name_for(settings.model)))
        service = ChatService(settings, store, None, counter, Metrics())  # type: ignore[arg-type]
        batches: list[tuple[float, float]] = []
        indexed: list[int] = []
        index_pending = store.index_pending

        async def timed(owner, limit):
            started = trio.current_time()
            try:
                done = await index_pending(owner, limit)
                indexed.append(done)
                return done
            finally:
                batches.append((started, trio.current_time()))

        store.index_pending = timed  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.memory.index_forever)
            await wait_until(lambda: len(batches) >= 5)  # four full batches, then the rest
            nursery.cancel_scope.cancel()
    finally:
        await store.close()
    for (start, end), (following, _) in zip(batches[:4], batches[1:5], strict=True):
        assert following - end >= end - start, batches  # the pause is as long as the batch
    assert indexed[:5] == [INDEX_BATCH] * 4 + [0]  # every turn, by the background alone
