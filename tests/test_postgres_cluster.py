"""Several EasyBackend processes on one PostgreSQL database (SPEC §3 "Ordering", §9 "Scale-out").

Every test gets a PostgreSQL schema of its own on the local server (the URL
sets ``search_path``), dropped afterwards even when the test fails. Servers
are real ``python run.py`` processes answering from the fake upstream served
in the test; the database is read with a connection of the test's own.
Conversations are trees (SPEC §12): concurrent asks through several instances
grow one chain, and head switches and subtree deletes mixed with asks never
leave the tree unsound. Also here: a database outage and its recovery (through a TCP proxy the test
cuts and restores), and ``easybackend migrate-storage`` both ways.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx2
import psycopg
import pytest
import trio
from helpers.http import bearer, error_code, sse_frames
from helpers.postgres import PG_PORT, pg_url
from helpers.servers import ServerProcess, clean_env, free_port, run_cli
from helpers.upstream import UPSTREAM_KEY, echo, full_answer, history_of, upstream_messages
from helpers.waiting import wait_until

from easybackend.chat.views import conversation_detail
from easybackend.fake_upstream import FakeUpstream
from easybackend.governance import keys
from easybackend.settings import DEFAULT_MODEL, load_settings
from easybackend.storage import ConversationRef, NewTurn, Storage, open_url
from easybackend.storage.legacy_json import import_directory

STORE_SETTINGS = load_settings(
    {"PG_POOL_TIMEOUT": "2"}, environ={}, env_file=None, need_api_key=False
)


async def pg_rows(schema: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """One read query on the test's schema, with a connection of the test's own."""

    def query() -> list[tuple[Any, ...]]:
        with psycopg.connect(pg_url(schema), connect_timeout=5) as connection:
            return connection.execute(sql, params).fetchall()

    return await trio.to_thread.run_sync(query)


async def whole_turns(
    schema: str, conversation_id: str, owner: str = ""
) -> list[tuple[int, str, str]]:
    """(seq, prompt, answer) of the conversation, checking that the store holds only whole turns
    and that they form one chain: each the child of the turn before, the head the last one."""
    rows = await pg_rows(
        schema,
        "SELECT t.seq, t.prompt, t.answer, t.parent_seq, t.depth, c.head_seq, c.last_seq"
        " FROM turns t JOIN conversations c ON c.pk = t.conversation_pk"
        " WHERE c.owner = %s AND c.conversation_id = %s ORDER BY t.seq",
        (owner, conversation_id),
    )
    turns = [(seq, prompt, answer) for seq, prompt, answer, *_ in rows]
    assert [seq for seq, _, _ in turns] == list(range(1, len(turns) + 1))
    assert all(prompt and answer for _, prompt, answer in turns), turns
    assert [(parent, depth) for _, _, _, parent, depth, _, _ in rows] == [
        (seq - 1 or None, seq) for seq, _, _ in turns
    ]
    assert {(head, last) for *_, head, last in rows} <= {(len(turns), len(turns))}
    count = await pg_rows(
        schema,
        "SELECT turn_count FROM conversations WHERE owner = %s AND conversation_id = %s",
        (owner, conversation_id),
    )
    assert count == [(len(turns),)]
    orphans = (
        "SELECT count(*) FROM turns WHERE conversation_pk NOT IN (SELECT pk FROM conversations)"
    )
    assert await pg_rows(schema, orphans) == [(0,)]
    return turns


# Every way a conversation's tree could be broken, each counted over the whole schema in one
# statement (one snapshot): a head naming no turn, a parent that is gone, a depth that is not
# its parent's plus one, a turn id given twice, a seq beyond the conversation's last.
BROKEN_TREES = """
    SELECT
        (SELECT count(*) FROM conversations c WHERE c.head_seq IS NOT NULL AND NOT EXISTS
            (SELECT 1 FROM turns t WHERE t.conversation_pk = c.pk AND t.seq = c.head_seq)),
        (SELECT count(*) FROM turns t WHERE t.parent_seq IS NOT NULL AND NOT EXISTS
            (SELECT 1 FROM turns p WHERE p.conversation_pk = t.conversation_pk
             AND p.seq = t.parent_seq)),
        (SELECT count(*) FROM turns t LEFT JOIN turns p ON p.conversation_pk = t.conversation_pk
            AND p.seq = t.parent_seq WHERE t.depth <> coalesce(p.depth, 0) + 1),
        (SELECT count(*) - count(DISTINCT turn_id) FROM turns),
        (SELECT count(*) FROM turns t JOIN conversations c ON c.pk = t.conversation_pk
            WHERE t.seq > c.last_seq)
"""


async def broken_trees(schema: str) -> dict[str, int]:
    """The counts of BROKEN_TREES that are not zero (so an empty dict is a sound store)."""
    (counts,) = await pg_rows(schema, BROKEN_TREES)
    names = ("dangling heads", "orphans", "wrong depths", "duplicate ids", "seqs past last_seq")
    return {name: count for name, count in zip(names, counts, strict=True) if count}


# -- the upstream's view ------------------------------------------------------------------------


def last_user_text(request: dict[str, Any]) -> str:
    return request["body"]["messages"][-1]["content"]


def outcome(fake: FakeUpstream, request_id: str) -> str | None:
    """How the fake saw a completion request end (completed, disconnected, failed), or None."""
    ends = [
        e["event"]
        for e in fake.events
        if e["id"] == request_id and e["event"] in ("completed", "disconnected", "failed")
    ]
    return ends[-1] if ends else None


def completed(fake: FakeUpstream) -> int:
    return sum(e["event"] == "completed" for e in fake.events)


def check_serialised(fake: FakeUpstream, turns: list[tuple[int, str, str]]) -> None:
    """Each stored turn came from one upstream request carrying exactly the turns before it.

    So no two answers on the conversation overlapped, whichever instance gave them: each
    started after the one before had been stored.
    """
    by_prompt = {
        last_user_text(r): r for r in fake.requests if outcome(fake, r["id"]) == "completed"
    }
    previous_end = 0.0
    for index, (_, prompt, _) in enumerate(turns):
        request = by_prompt[prompt]
        assert history_of(request["body"]["messages"]) == [(p, a) for _, p, a in turns[:index]]
        times = {e["event"]: e["time"] for e in fake.events if e["id"] == request["id"]}
        assert times["started"] >= previous_end, f"turn {index + 1} overlapped the one before"
        previous_end = times["completed"]


# -- servers ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Instance:
    name: str
    process: ServerProcess
    port: int

    def client(self, timeout: float = 30) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", timeout=timeout)


StartInstance = Callable[..., Awaitable[Instance]]


@pytest.fixture
async def start_instance(
    fake: FakeUpstream, tmp_path: Path, pg_schema: str
) -> AsyncIterator[StartInstance]:
    """Start ``python run.py`` processes on the test's schema; killed at teardown.

    Keyword arguments are environment variables (``DATABASE_URL`` defaults to the schema).
    """
    started: list[ServerProcess] = []

    async def start(name: str, **env: str) -> Instance:
        port = free_port()
        workdir = tmp_path / name
        await trio.Path(workdir).mkdir()
        variables = {
            "OPENAI_API_KEY": UPSTREAM_KEY,
            "OPENAI_BASE_URL": fake.base_url(),
            "HOST": "127.0.0.1",
            "HTTP_PORT": str(port),
            "GRPC_PORT": "off",
            "WS_PORT": "off",
            "CONVERSATIONS_DIR": str(workdir / "data"),
            "DATABASE_URL": pg_url(pg_schema),
            "UPSTREAM_RETRIES": "0",
            **env,
        }
        process = ServerProcess(workdir, clean_env(**variables))
        started.append(process)
        await process.start()
        await process.wait_healthy(port)
        return Instance(name, process, port)

    yield start
    for process in started:
        if process.process is not None and process.process.returncode is None:
            await process.kill()
    for process in started:
        assert UPSTREAM_KEY not in process.output


async def start_together(start: StartInstance, *names: str) -> list[Instance]:
    """Start one instance per name at the same time (so they also migrate together)."""
    instances: dict[str, Instance] = {}

    async def one(name: str) -> None:
        instances[name] = await start(name)

    async with trio.open_nursery() as nursery:
        for name in names:
            nursery.start_soon(one, name)
    return [instances[name] for name in names]


async def start_pair(start: StartInstance) -> tuple[Instance, Instance]:
    a, b = await start_together(start, "a", "b")
    return a, b


# -- two instances, one database ----------------------------------------------------------------


async def test_a_conversation_started_on_one_instance_continues_on_the_other(
    fake, start_instance, pg_schema
):
    a, b = await start_pair(start_instance)
    async with a.client() as on_a, b.client() as on_b:
        first = await on_a.post("/ask/shared", json={"prompt": "first, on a"})
        assert first.status_code == 200, first.text
        second = await on_b.post("/ask/shared", json={"prompt": "second, on b"})
        assert second.status_code == 200, second.text
        assert history_of(upstream_messages(fake)) == [("first, on a", echo(1, "first, on a"))]
        assert second.json()["response"] == echo(3, "second, on b")

        third = await on_a.post("/ask/shared", json={"prompt": "third, on a"})
        assert third.status_code == 200, third.text
        assert [p for p, _ in history_of(upstream_messages(fake))] == [
            "first, on a",
            "second, on b",
        ]
        seen_from_a = (await on_a.get("/conversations/shared")).json()
        seen_from_b = (await on_b.get("/conversations/shared")).json()
    assert seen_from_a == seen_from_b
    assert seen_from_a["turns"] == 3
    assert [t["turn"] for t in seen_from_a["history"]] == [1, 2, 3]
    assert [seq for seq, _, _ in await whole_turns(pg_schema, "shared")] == [1, 2, 3]


async def test_a_background_answer_is_followed_live_from_another_instance(fake, start_instance):
    """The instance generating a background answer writes it on its mark every half second:
    on another instance a poll shows the text so far and a reattach follows it while it runs,
    then ends from the stored turn, with the generator's event ids."""
    a, b = await start_pair(start_instance)
    prompt = "far away [[fake:tokens=200]] [[fake:delay=0.03]]"  # six seconds
    async with a.client() as on_a, b.client() as on_b:
        accepted = await on_a.post("/ask/roaming", json={"prompt": prompt, "background": True})
        assert accepted.status_code == 202, accepted.text
        turn = f"/conversations/roaming/turns/{accepted.json()['turn_id']}"
        with trio.fail_after(5):
            while not (elsewhere := (await on_b.get(turn)).json())["text"]:
                await trio.sleep(0.1)
        assert elsewhere["status"] == "in_progress"
        lines: list[str] = []
        with trio.fail_after(10):
            async with on_b.stream("GET", turn + "/stream", params={"after": "1"}) as followed:
                async for line in followed.aiter_lines():
                    lines.append(line)
                    if line == "event: delta" and len(lines) < 3:  # the first piece, live:
                        generating = (await on_a.get(turn)).json()  # the answer goes on
                        assert generating["status"] == "in_progress", generating
                        assert (await on_b.post(turn + "/cancel")).status_code == 200
        on_the_generator = await on_a.get(turn + "/stream")
        finished = (await on_b.get(turn)).json()
    frames = sse_frames("\n".join(lines) + "\n")
    assert frames == sse_frames(on_the_generator.text)[1:]  # the same events, the same ids
    text = "".join(data["text"] for _, name, data in frames if name == "delta")
    assert text == finished["text"] and full_answer(1, "far away", 200).startswith(text)
    assert frames[-1][1] == "end" and finished["status"] == "cancelled"


async def test_a_cancel_on_another_instance_stops_a_background_answer(fake, start_instance):
    """The cancel route on the instance that does not generate the answer notes the cancel on
    the answer's mark; the generator stops it within a poll and stores what it had."""
    a, b = await start_pair(start_instance)
    prompt = "stop me [[fake:tokens=200]] [[fake:delay=0.03]]"  # six seconds if nothing stops it
    async with a.client() as on_a, b.client() as on_b:
        accepted = await on_a.post("/ask/far", json={"prompt": prompt, "background": True})
        assert accepted.status_code == 202, accepted.text
        turn_id = accepted.json()["turn_id"]
        turn = f"/conversations/far/turns/{turn_id}"
        unknown = await on_b.post("/conversations/far/turns/0123456789abcdef01234567/cancel")
        cancelled = await on_b.post(turn + "/cancel")
        with trio.fail_after(5):  # a poll of half a second, then the partial turn is stored
            while (state := (await on_b.get(turn)).json())["status"] == "in_progress":
                await trio.sleep(0.1)
        followed = await on_a.get(turn + "/stream")
    assert (unknown.status_code, error_code(unknown)) == (404, "not_found")
    assert cancelled.status_code == 200 and cancelled.json()["cancelled"] is True
    assert state["status"] == "cancelled"
    assert 0 < len(state["text"]) < len(full_answer(1, "stop me", 200))
    assert sse_frames(followed.text)[-1][2]["finish_reason"] == "cancelled"


async def test_concurrent_asks_split_across_instances_are_answered_one_at_a_time(
    fake, start_instance, pg_schema
):
    a, b = await start_pair(start_instance)
    fake.token_delay = 0.01  # every answer takes a while, so the asks overlap
    prompts = [f"ask {i} via {'ab'[i % 2]}" for i in range(20)]
    answers: dict[str, str] = {}
    async with a.client() as on_a, b.client() as on_b:

        async def ask(client: httpx2.AsyncClient, prompt: str) -> None:
            response = await client.post("/ask/burst", json={"prompt": prompt})
            assert response.status_code == 200, response.text
            answers[prompt] = response.json()["response"]

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i, prompt in enumerate(prompts):
                    nursery.start_soon(ask, (on_a, on_b)[i % 2], prompt)

    turns = await whole_turns(pg_schema, "burst")
    assert [seq for seq, _, _ in turns] == list(range(1, 21))
    assert sorted(prompt for _, prompt, _ in turns) == sorted(prompts)  # each prompt once
    assert {prompt: answer for _, prompt, answer in turns} == answers
    assert len(fake.requests) == 20
    check_serialised(fake, turns)
    for index, (_, prompt, answer) in enumerate(turns):
        assert answer == echo(2 * index + 1, prompt)  # the whole history went up every time


async def test_concurrent_asks_through_three_instances_grow_one_chain(
    fake, start_instance, pg_schema
):
    """Each instance reads the head under the conversation's lock and moves it with the insert,
    so concurrent asks through different instances each continue from the turn stored just
    before: one chain, never two turns on one parent."""
    instances = await start_together(start_instance, "a", "b", "c")
    fake.token_delay = 0.01  # every answer takes a while, so the asks overlap
    prompts = [f"ask {i} via {instances[i % 3].name}" for i in range(12)]
    ends: dict[str, dict[str, Any]] = {}
    clients = [instance.client() for instance in instances]
    try:

        async def ask(client: httpx2.AsyncClient, prompt: str) -> None:
            response = await client.post("/ask/chain", json={"prompt": prompt})
            assert response.status_code == 200, response.text
            ends[prompt] = response.json()

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i, prompt in enumerate(prompts):
                    nursery.start_soon(ask, clients[i % 3], prompt)
        seen = [(await client.get("/conversations/chain")).json() for client in clients]
    finally:
        for client in clients:
            await client.aclose()

    turns = await whole_turns(pg_schema, "chain")  # seqs 1..12, each the child of the one before
    assert sorted(prompt for _, prompt, _ in turns) == sorted(prompts)
    ids = await pg_rows(
        pg_schema,
        "SELECT t.prompt, t.turn_id, t.depth FROM turns t JOIN conversations c"
        " ON c.pk = t.conversation_pk WHERE c.conversation_id = 'chain'",
    )
    assert {prompt: (end["turn_id"], end["turn"]) for prompt, end in ends.items()} == {
        prompt: (turn_id, depth) for prompt, turn_id, depth in ids
    }
    check_serialised(fake, turns)  # each upstream context held every turn before it
    assert seen[0] == seen[1] == seen[2]
    assert seen[0]["head"] == ends[turns[-1][1]]["turn_id"]
    assert [t["parent_id"] for t in seen[0]["history"]] == [
        None,
        *(t["id"] for t in seen[0]["history"][:-1]),
    ]
    assert all(len(t["siblings"]) == 1 for t in seen[0]["history"])
    assert await broken_trees(pg_schema) == {}


async def test_head_switches_deletes_and_asks_mixed_across_instances_keep_the_tree_sound(
    fake, start_instance, pg_schema
):
    """PUT head, DELETE of a subtree and asks (at the head or at a named parent), all at once
    through three instances: a watcher reading the database throughout never sees a head
    naming a missing turn (nor an orphan); every stored turn was answered from exactly the path
    to its parent; an ask naming a deleted parent is refused before the model is called."""
    instances = await start_together(start_instance, "a", "b", "c")
    clients = [instance.client() for instance in instances]
    fake.token_delay = 0.005
    statuses: dict[str, int] = {}
    try:
        on_a = clients[0]
        seed: dict[str, str] = {}
        for name, parent in (("s1", None), ("s2", "s1"), ("s3", "s2"), ("b2", "s1")):
            body = {"prompt": name} | ({"parent_id": seed[parent]} if parent else {})
            response = await on_a.post("/ask/mix", json=body)
            assert response.status_code == 200, response.text
            seed[name] = response.json()["turn_id"]
        seeded_requests = len(fake.requests)

        operations: list[tuple[str, str, dict[str, Any] | None]] = []  # (label, path, body)
        for i in range(9):
            operations.append((f"ask {i}", "POST /ask/mix", {"prompt": f"ask {i}"}))
        for i, parent in enumerate(("s1", "s3", "b2")):
            body = {"prompt": f"branch {i} from {parent}", "parent_id": seed[parent]}
            operations.append((f"branch {i}", "POST /ask/mix", body))
        for i, target in enumerate(("s3", "b2", "root", "s2", "s3", "s1")):
            turn_id = seed.get(target, target)
            operations.append(
                (f"head {i} {target}", "PUT /conversations/mix/head", {"turn_id": turn_id})
            )
        operations.append(("delete s2", f"DELETE /conversations/mix/turns/{seed['s2']}", None))

        async def run(index: int, label: str, request: str, body: dict[str, Any] | None) -> None:
            method, path = request.split(" ")
            client = clients[index % 3]
            response = await client.request(method, path, json=body)
            statuses[label] = response.status_code
            if response.status_code != 200:
                assert error_code(response) == "not_found", response.text

        seen_broken: list[dict[str, int]] = []
        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                mixing = trio.Event()

                async def watch() -> None:
                    while not mixing.is_set():
                        seen_broken.append(await broken_trees(pg_schema))
                    seen_broken.append(await broken_trees(pg_schema))

                nursery.start_soon(watch)
                async with trio.open_nursery() as operations_nursery:
                    for index, operation in enumerate(operations):
                        operations_nursery.start_soon(run, index, *operation)
                mixing.set()
    finally:
        for client in clients:
            await client.aclose()

    assert len(seen_broken) > 1 and all(broken == {} for broken in seen_broken), seen_broken
    # what cannot be refused: asks at the head, anything naming s1, b2 or "root" (never
    # deleted), the one delete of s2; what names s2 or s3 is refused once s2 is gone
    must_succeed = [f"ask {i}" for i in range(9)] + ["branch 0", "branch 2", "delete s2"]
    must_succeed += ["head 1 b2", "head 2 root", "head 5 s1"]
    assert all(statuses[label] == 200 for label in must_succeed), statuses
    assert set(statuses.values()) <= {200, 404}, statuses

    answered = [label for label in statuses if label.startswith(("ask", "branch"))]
    answered = [label for label in answered if statuses[label] == 200]
    assert len(fake.requests) == seeded_requests + len(answered)  # refused: nothing sent up
    rows = await pg_rows(
        pg_schema,
        "SELECT t.seq, t.parent_seq, t.prompt, t.answer FROM turns t JOIN conversations c"
        " ON c.pk = t.conversation_pk WHERE c.conversation_id = 'mix' ORDER BY t.seq",
    )
    by_seq = {seq: (parent, prompt, answer) for seq, parent, prompt, answer in rows}

    def path_to(seq: int | None) -> list[tuple[str, str]]:
        path = []
        while seq is not None:
            parent, prompt, answer = by_seq[seq]
            path.append((prompt, answer))
            seq = parent
        return path[::-1]

    requests = {last_user_text(r): r for r in fake.requests}
    for _, parent, prompt, _ in rows:
        assert history_of(requests[prompt]["body"]["messages"]) == path_to(parent), prompt
    stored = {prompt for _, _, prompt, _ in rows}
    assert {"s1", "b2"} <= stored and not {"s2", "s3"} & stored  # the delete took s2's subtree
    prompts = {label: body["prompt"] for label, _, body in operations if body and "prompt" in body}
    for label in answered:  # each answer is stored, unless it was below s2 when s2 went
        prompt = prompts[label]
        context = [p for p, _ in history_of(requests[prompt]["body"]["messages"])]
        assert prompt in stored or "s2" in context, (prompt, context)
    (head,) = await pg_rows(pg_schema, "SELECT head_seq FROM conversations")
    assert head[0] is None or head[0] in by_seq


async def active_asks(client: httpx2.AsyncClient) -> float:
    """The instance's asks in progress (answering or waiting for the conversation), from /metrics."""
    text = (await client.get("/metrics")).text
    found = re.search(r'^easybackend_active_streams\{protocol="http"\} (\S+)$', text, re.M)
    return float(found[1]) if found else 0.0


async def test_kill_minus_nine_of_one_instance_mid_burst(fake, start_instance, pg_schema):
    a, b = await start_pair(start_instance)
    fake.token_delay = 0.01
    victim = "a, killed mid-answer [[fake:stall_after=2]]"
    on_a = [f"a{i}" for i in range(6)]
    on_b = [f"b{i}" for i in range(6)]
    late_on_b = [f"b, late {i}" for i in range(3)]
    status: dict[str, int | str] = {}
    async with a.client() as client_a, b.client() as client_b:

        async def ask(client: httpx2.AsyncClient, prompt: str) -> None:
            try:
                response = await client.post("/ask/crash", json={"prompt": prompt})
                status[prompt] = response.status_code
            except httpx2.TransportError:
                status[prompt] = "connection lost"

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(ask, client_a, on_a[i])
                    nursery.start_soon(ask, client_b, on_b[i])
                await wait_until(lambda: completed(fake) >= 2, timeout=20)
                # joins a's queue; streaming (and holding the conversation) when a is killed
                nursery.start_soon(ask, client_a, victim)
                await wait_until(
                    lambda: any(e["event"] == "stalled" for e in fake.events), timeout=20
                )
                # more asks reach b, and wait there for the conversation a holds
                for prompt in late_on_b:
                    nursery.start_soon(ask, client_b, prompt)
                while await active_asks(client_b) != len(
                    [p for p in on_b + late_on_b if p not in status]
                ):
                    await trio.sleep(0.01)
                await a.process.kill()

            # b kept serving: every ask it had succeeded, those waiting at the kill too
            assert all(status[p] == 200 for p in on_b + late_on_b), status
            after = await client_b.post("/ask/crash", json={"prompt": "b, after the kill"})
            assert after.status_code == 200, after.text

    (stalled,) = [r for r in fake.requests if last_user_text(r) == victim]
    await wait_until(lambda: outcome(fake, stalled["id"]) == "disconnected")
    turns = await whole_turns(pg_schema, "crash")
    stored = [prompt for _, prompt, _ in turns]
    assert len(stored) == len(set(stored))
    assert victim not in stored  # killed mid-answer: nothing of it was stored
    answered = {p for p, s in status.items() if s == 200} | {"b, after the kill"}
    assert answered <= set(stored)
    assert set(stored) - answered <= set(on_a)  # stored by a, whose reply was lost in the kill
    assert set(stored[-4:-1]) == set(late_on_b) and stored[-1] == "b, after the kill"
    check_serialised(fake, turns)


# -- a database outage --------------------------------------------------------------------------


class TcpProxy:
    """A loopback TCP forwarder to PostgreSQL that the test can cut and restore on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._scope: trio.CancelScope | None = None
        self.connections = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        try:
            with trio.CancelScope() as self._scope:
                task_status.started()
                await trio.serve_listeners(self._forward, listeners)
        finally:
            for listener in listeners:
                listener.socket.close()

    def cut(self) -> None:
        """Close the listener and every connection through it."""
        assert self._scope is not None
        self._scope.cancel()

    async def _forward(self, client: trio.SocketStream) -> None:
        self.connections += 1
        async with client:
            try:
                server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            except OSError:
                return
            async with server, trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
                nursery.start_soon(self._pump, server, client, nursery.cancel_scope)

    @staticmethod
    async def _pump(
        source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()


async def test_a_database_outage_gives_503_and_recovers_without_a_restart(
    fake, start_instance, pg_schema, nursery
):
    proxy = TcpProxy(PG_PORT)
    await nursery.start(proxy.serve)
    server = await start_instance(
        "a", DATABASE_URL=pg_url(pg_schema, proxy.port), PG_POOL_TIMEOUT="1"
    )
    pid = server.process.process.pid
    async with server.client(timeout=15) as client:
        assert (await client.get("/readyz")).status_code == 200
        before = await client.post("/ask/outage", json={"prompt": "before the outage"})
        assert before.status_code == 200, before.text
        requests_before = len(fake.requests)

        proxy.cut()
        started = time.monotonic()
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert error_code(ready) == "storage_unavailable"
        during = await client.post("/ask/outage", json={"prompt": "during the outage"})
        assert during.status_code == 503, during.text
        assert error_code(during) == "storage_unavailable"
        assert time.monotonic() - started < 6  # each within about PG_POOL_TIMEOUT
        assert len(fake.requests) == requests_before  # the model was not called
        assert (await client.get("/healthz")).status_code == 200  # alive, only not ready

        await nursery.start(proxy.serve)  # the database is back, on the same address
        with trio.fail_after(20):
            while (await client.get("/readyz")).status_code != 200:
                await trio.sleep(0.1)
        after = await client.post("/ask/outage", json={"prompt": "after the outage"})
        assert after.status_code == 200, after.text
    assert server.process.process.returncode is None and server.process.process.pid == pid
    assert history_of(upstream_messages(fake)) == [
        ("before the outage", echo(1, "before the outage"))
    ]
    turns = await whole_turns(pg_schema, "outage")
    assert [prompt for _, prompt, _ in turns] == ["before the outage", "after the outage"]


# -- migrate-storage ----------------------------------------------------------------------------


def new_turn(prompt: str, at: float, usage: int = 7) -> NewTurn:
    return NewTurn(
        prompt=prompt,
        prompt_tokens=len(prompt.split()),
        answer=f"answer to {prompt}",
        answer_tokens=3 + len(prompt.split()),
        model="gpt-test",
        finish_reason="stop",
        usage_prompt_tokens=usage,
        usage_completion_tokens=usage + 1,
        created_at=at,
        finished_at=at + 0.25,
        upstream="",
        pieces="",
    )


async def fill(store: Storage, legacy: Path) -> None:
    """Conversations of two owners, a system prompt, branches, a head off the newest turn, a
    deleted turn (so the last seq given is past every stored one), a rollback, unicode, and a
    legacy import."""
    plain = ConversationRef("", "plain")
    turns = []
    for i in range(3):
        parent = turns[-1] if turns else None
        turns.append(await store.append_turn(plain, new_turn(f"plain {i}", 1000.5 + i), parent))
    await store.append_turn(plain, new_turn("plain 1, edited", 1010), turns[0])  # a branch
    doomed = await store.append_turn(plain, new_turn("plain 3, deleted", 1020), turns[2])
    assert await store.delete_turn(plain, doomed.turn_id) == (1, turns[2])  # back to "plain 2"
    await store.set_system_prompt(plain, "Answer in haiku.", 4)
    alice = ConversationRef("alice", "plain")
    parent = None
    for i in range(4):
        parent = await store.append_turn(alice, new_turn(f"ålice {i} 🙂", 2000 + i), parent)
    # a rollback moves the head back and keeps the turns; their usage stays in the totals
    await store.rollback(alice, 2)
    await store.set_system_prompt(ConversationRef("bob", "empty"), "Only a system prompt.", 5)
    await trio.Path(legacy).mkdir()
    await trio.Path(legacy / "old-1.json").write_text(
        '["User: hi\\n\\n\\nChatGPT: hello<|im_end|>\\n",'
        ' "User: again\\n\\n\\nChatGPT: sure<|im_end|>\\n"]',
        encoding="utf-8",
    )
    report = await import_directory(legacy, store, lambda text: len(text.split()))
    assert report.turns == 2


async def contents(url: str) -> tuple[list[Any], dict[tuple[str, str], dict[str, object]]]:
    """Everything a store holds (as export_all gives it) and each conversation as the API shows it."""
    store = await open_url(url, STORE_SETTINGS)
    try:
        exported = [conversation async for conversation in store.export_all()]
        shown = {}
        for conversation in exported:
            detail = await store.get_conversation(conversation.ref)
            shown[conversation.ref.owner, conversation.ref.conversation_id] = conversation_detail(
                detail, tree=True
            )
    finally:
        await store.close()
    return exported, shown


async def migrate(workdir: Path, *args: str, **env: str):
    result = await run_cli(workdir, clean_env(**env), ["migrate-storage", *args])
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_migrate_storage_from_sqlite_to_postgresql_and_back(
    fake, tmp_path, pg_schema, start_server
):
    original = f"sqlite:///{tmp_path / 'original.sqlite3'}"
    store = await open_url(original, STORE_SETTINGS)
    try:
        await fill(store, tmp_path / "legacy")
    finally:
        await store.close()
    before, shown_before = await contents(original)
    assert len(before) == 4 and sum(len(c.turns) for c in before) == 10
    plain = next(c for c in before if c.ref == ConversationRef("", "plain"))
    assert (plain.head_seq, plain.last_seq, [t.seq for t in plain.turns]) == (3, 5, [1, 2, 3, 4])
    assert [t.parent_seq for t in plain.turns] == [None, 1, 2, 1]
    shown = shown_before["", "plain"]
    assert [t["messages"][0]["text"] for t in shown["history"]] == ["plain 0", "plain 1", "plain 2"]
    assert len(shown["tree"]) == 4 and shown["history"][1]["siblings"] == [
        plain.turns[1].turn_id,
        plain.turns[3].turn_id,
    ]

    code, out, err = await migrate(tmp_path, "--from", original, "--to", pg_url(pg_schema))
    assert code == 0, err
    assert err == ""
    assert out.count("\n") == 1 and out.startswith("copied 4 conversations with 10 turns"), out
    # ids, parents, depths, heads and last seqs exactly as they were: the same tree
    on_postgres, shown_on_postgres = await contents(pg_url(pg_schema))
    assert on_postgres == before
    assert shown_on_postgres == shown_before
    assert await pg_rows(
        pg_schema, "SELECT owner, conversation_id, source, entries FROM legacy_imports"
    ) == [("", "old-1", "old-1.json", 2)]
    (system,) = await pg_rows(
        pg_schema,
        "SELECT system_tokens FROM conversations WHERE owner = '' AND conversation_id = 'plain'",
    )
    assert system == (4,)

    # a non-empty target is refused without --force, and left as it was
    code, out, err = await migrate(tmp_path, "--from", original, "--to", pg_url(pg_schema))
    assert code == 1 and out == ""
    assert err.startswith("easybackend: error: ") and err.count("\n") == 1, err
    assert "already holds 4 conversations" in err and "--force" in err
    assert (await contents(pg_url(pg_schema)))[0] == before
    code, out, err = await migrate(
        tmp_path, "--from", original, "--to", pg_url(pg_schema), "--force"
    )
    assert code == 0, err
    assert (await contents(pg_url(pg_schema)))[0] == before  # replaced, not duplicated

    # and back into a new SQLite file
    back = f"sqlite:///{tmp_path / 'back' / 'easybackend.sqlite3'}"
    code, out, err = await migrate(tmp_path, "--from", pg_url(pg_schema), "--to", back)
    assert code == 0, err
    assert out.startswith("copied 4 conversations with 10 turns (1 legacy import records)"), out
    assert await contents(back) == (before, shown_before)

    # the migrated store serves on: the history goes upstream, import-json adds nothing twice
    store = await open_url(pg_url(pg_schema), STORE_SETTINGS)
    try:
        again = await import_directory(tmp_path / "legacy", store, lambda text: len(text.split()))
        assert (again.turns, again.unchanged) == (0, 1)
    finally:
        await store.close()
    # on either side of the copy the next ask continues from the same head, with the next seq
    head_id = plain.turns[2].turn_id
    for url in (pg_url(pg_schema), back):
        server = await start_server(DATABASE_URL=url)
        async with server.client() as client:
            response = await client.post("/ask/plain", json={"prompt": "and now?"})
            assert response.status_code == 200, response.text
            shown = (await client.get("/conversations/plain")).json()
        server.shutdown.set()
        messages = upstream_messages(fake)
        assert messages[0] == {"role": "system", "content": "Answer in haiku."}
        assert [p for p, _ in history_of(messages)] == ["plain 0", "plain 1", "plain 2"]
        assert response.json()["turn"] == 4
        assert [t["id"] for t in shown["history"]][:3] == [t.turn_id for t in plain.turns[:3]]
        assert shown["history"][-1]["parent_id"] == head_id
        assert shown["head"] == response.json()["turn_id"]
        store = await open_url(url, STORE_SETTINGS)
        try:
            new = await store.find_turn(ConversationRef("", "plain"), response.json()["turn_id"])
        finally:
            await store.close()
        assert (new.seq, new.parent_seq, new.depth) == (6, 3, 4)  # seq 5 was given (and deleted)


async def test_migrate_storage_errors_are_one_line_without_the_password(tmp_path, pg_schema):
    source = tmp_path / "source.sqlite3"
    store = await open_url(f"sqlite:///{source}", STORE_SETTINGS)
    await store.close()
    closed = free_port()
    cases = [
        # (--from, --to, what the line must say)
        (f"sqlite:///{tmp_path / 'missing.sqlite3'}", pg_url(pg_schema), "no such database file"),
        ("mysql://root:PASSWORD-SECRET@db/x", pg_url(pg_schema), "not a supported database URL"),
        (f"sqlite:///{source}", f"sqlite:///{source}", "the same database"),
        (
            f"sqlite:///{source}",
            f"postgresql://postgres:PASSWORD-SECRET@127.0.0.1:{closed}/test",
            "Connection refused",
        ),
        (
            f"sqlite:///{source}",
            f"postgresql://postgres:PASSWORD-SECRET%zz@127.0.0.1:{PG_PORT}/test",
            "cannot connect",
        ),
    ]
    results: dict[int, tuple[int, str, str]] = {}

    async def run(index: int, source_url: str, target_url: str) -> None:
        results[index] = await migrate(
            tmp_path, "--from", source_url, "--to", target_url, PG_POOL_TIMEOUT="1"
        )

    async with trio.open_nursery() as nursery:
        for index, (source_url, target_url, _) in enumerate(cases):
            nursery.start_soon(run, index, source_url, target_url)
    for index, (_, _, reason) in enumerate(cases):
        code, out, err = results[index]
        assert code == 1 and out == "", (cases[index], out, err)
        assert err.startswith("easybackend: error: ") and err.count("\n") == 1, err
        assert reason in err, err
        assert "PASSWORD-SECRET" not in err, err


async def test_migrate_storage_carries_keys_and_usage_and_copies_nothing_twice(
    tmp_path, pg_schema, start_server
):
    """The stored keys (digests: the same secrets keep working; a revoked one stays revoked)
    and the usage go across with the conversations; a second run (--force) doubles nothing."""
    original = f"sqlite:///{tmp_path / 'keys.sqlite3'}"
    store = await open_url(original, STORE_SETTINGS)
    try:
        secret, _ = await keys.create_key(store, "bot", {"rpm": 5, "models": [DEFAULT_MODEL]})
        gone, _ = await keys.create_key(store, "old", {})
        await keys.revoke_key(store, "old")
        usage = [("bot", "2026-11-30", DEFAULT_MODEL, 3, 100, 50), ("", "2026-11-29", "m", 1, 7, 2)]
        await store.add_usage(usage)
        before = await store.keys()
    finally:
        await store.close()

    code, out, err = await migrate(tmp_path, "--from", original, "--to", pg_url(pg_schema))
    assert code == 0, err
    assert "2 keys and 2 usage rows" in out, out
    code, out, err = await migrate(
        tmp_path, "--from", original, "--to", pg_url(pg_schema), "--force"
    )
    assert code == 0, err
    assert "0 keys, 2 kept as the target had them and 0 usage rows" in out, out
    store = await open_url(pg_url(pg_schema), STORE_SETTINGS)
    try:
        assert await store.keys() == before
        assert await store.usage_rows(None, "2026-01-01", "2026-12-31") == sorted(usage)
    finally:
        await store.close()

    server = await start_server(DATABASE_URL=pg_url(pg_schema), API_KEYS="")
    async with server.client() as client:
        own = await client.get(
            "/usage", params={"from": "2026-11-01", "to": "2026-11-30"}, headers=bearer(secret)
        )
        refused = await client.get("/conversations", headers=bearer(gone))
    assert own.status_code == 200, own.text
    assert own.json()["total"]["requests"] == 3, own.json()
    assert (refused.status_code, error_code(refused)) == (401, "unauthenticated")
