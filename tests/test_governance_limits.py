"""Limits of a key (SPEC §14): requests and tokens per minute (GCRA windows), token budgets per
UTC day and month, requests per minute of each end user (``USER_RPM``); refused before any
upstream call on every protocol with when to retry; in the process with SQLite, shared by every
instance with PostgreSQL (two instances never exceed a key's rpm by more than one request).

Windows and budgets are checked against a clock the tests move (``helpers.limits``), so a window
fills and refills, and a UTC day turns, when the test says.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import httpx2
import openai
import psycopg
import purerpc
import pytest
import trio
import trio.testing
from helpers.grpc import grpcio_stream, rpc_error, status_of
from helpers.http import bearer, error_code
from helpers.keys import ADMIN_KEY, admin_call, create_key, wait_for_status
from helpers.limits import Clock, freeze, utc
from helpers.logs import capture_access, metric, scrape
from helpers.openai_sdk import async_client
from helpers.postgres import pg_url
from helpers.servers import Server, ServerProcess, StartServer, free_port, server_env
from helpers.waiting import wait_until
from helpers.websocket import original_frames, ws_url
from trio_websocket import open_websocket_url

from easybackend import errors
from easybackend.governance.keys import Grant
from easybackend.governance.limits import Limits, checked_user, next_day, next_month
from easybackend.metrics import Metrics
from easybackend.proto_gen import chat_pb2
from easybackend.settings import DEFAULT_MODEL, load_settings
from easybackend.storage import open_url

STORE_SETTINGS = load_settings(
    {"PG_POOL_TIMEOUT": "2"}, environ={}, env_file=None, need_api_key=False
)
START = utc("2026-12-01T12:00:00")


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh SQLite file or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'limits.sqlite3'}"
        return
    yield pg_url(request.getfixturevalue("pg_schema"))


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[object]:
    opened = await open_url(store_url, STORE_SETTINGS)
    try:
        yield opened
    finally:
        await opened.close()


def limits_on(store: object, url: str, clock: Clock, user_rpm: int | None = None) -> Limits:
    """The limits of one instance on ``store`` (shared on PostgreSQL, as a server's are)."""
    limits = Limits(store, Metrics(), user_rpm=user_rpm, shared=url.startswith("postgresql"))  # type: ignore[arg-type]
    limits.clock = clock
    return limits


async def refusal(
    limits: Limits, grant: Grant | None, user: str | None = None
) -> errors.RateLimited:
    with pytest.raises(errors.RateLimited) as caught:
        await limits.admit(grant, grant.name if grant else None, user)
    return caught.value


# -- the windows and budgets, on both stores ----------------------------------------------------


async def test_rpm_is_a_burst_of_rpm_then_one_every_60_over_rpm_seconds(store, store_url):
    clock = Clock(START)
    limits = limits_on(store, store_url, clock)
    grant = Grant("bot", stored=True, rpm=3)
    for _ in range(3):
        await limits.admit(grant, "bot", None)
    refused = await refusal(limits, grant)
    assert type(refused) is errors.RateLimited and refused.code == "rate_limited"
    assert refused.limit == "rpm" and refused.retry_after == pytest.approx(20)
    assert refused.retry_after_seconds == 20
    assert "3 requests per minute" in refused.message
    clock.advance(19.5)
    assert (await refusal(limits, grant)).retry_after == pytest.approx(0.5)
    clock.advance(0.5)
    await limits.admit(grant, "bot", None)  # one more, 20 s after the burst
    await refusal(limits, grant)
    clock.advance(60)
    for _ in range(3):  # a quiet minute refills the whole burst, no more
        await limits.admit(grant, "bot", None)
    await refusal(limits, grant)
    # another key's window is its own; a key without limits has none
    await limits.admit(Grant("other", stored=True, rpm=1), "other", None)
    for _ in range(10):
        await limits.admit(Grant("free"), "free", None)


async def test_a_refused_ask_takes_no_window_and_users_are_counted_apart(store, store_url):
    clock = Clock(START)
    limits = limits_on(store, store_url, clock, user_rpm=1)
    grant = Grant("bot", stored=True, rpm=2)
    await limits.admit(grant, "bot", "alice")
    refused = await refusal(limits, grant, "alice")
    assert refused.limit == "user_rpm" and refused.retry_after == pytest.approx(60)
    assert "alice" not in refused.message and "USER_RPM" in refused.message
    await limits.admit(grant, "bot", "bob")  # the key's rpm was not taken by alice's refusal
    refused = await refusal(limits, grant, "carol")  # the key's rpm is spent now
    assert refused.limit == "rpm"
    clock.advance(30)
    await limits.admit(grant, "bot", "carol")  # carol's refusal took no window of hers either
    # the same user under another key, and without keys, is another user
    await limits.admit(Grant("bot2", stored=True), "bot2", "alice")
    await limits.admit(None, None, "alice")
    assert (await refusal(limits, None, "alice")).limit == "user_rpm"
    await limits.admit(None, None, None)  # no user: USER_RPM does not apply


async def test_tpm_takes_an_ask_while_there_is_room_and_its_tokens_when_it_ends(store, store_url):
    clock = Clock(START)
    limits = limits_on(store, store_url, clock)
    grant = Grant("bot", stored=True, tpm=100)
    ticket = await limits.admit(grant, "bot", None)
    second = await limits.admit(grant, "bot", None)  # nothing counted yet
    await limits.charge(ticket, "m", 200, 50)  # one answer overdraws the minute
    await limits.charge(second, "m", 0, 0)
    refused = await refusal(limits, grant)
    # 250 tokens of 0.6 s each: the bucket is 150 s deep, 90 s past full, plus one token
    assert refused.limit == "tpm" and refused.retry_after == pytest.approx(90.6)
    assert "100 tokens per minute" in refused.message
    clock.advance(90.6)
    await limits.admit(grant, "bot", None)


async def test_budgets_count_utc_days_and_months_and_say_when_they_turn(store, store_url):
    clock = Clock(utc("2026-12-31T23:59:00"))
    limits = limits_on(store, store_url, clock)
    daily = Grant("daily", stored=True, tokens_per_day=100)
    ticket = await limits.admit(daily, "daily", None)
    await limits.charge(ticket, "m", 60, 30)
    ticket = await limits.admit(daily, "daily", None)  # 90 of 100: still under
    await limits.charge(ticket, "m", 30, 30)  # the answer in progress finishes: 150
    refused = await refusal(limits, daily)
    assert type(refused) is errors.BudgetExhausted and refused.code == "budget_exhausted"
    assert refused.limit == "tokens_per_day" and refused.retry_after == pytest.approx(60)
    assert "100 tokens this UTC day" in refused.message
    clock.advance(60)  # 2027-01-01: a new day
    await limits.admit(daily, "daily", None)

    monthly = Grant("monthly", stored=True, tokens_per_month=100, tokens_per_day=1000)
    clock.now = utc("2027-01-30T10:00:00")
    await limits.charge(await limits.admit(monthly, "monthly", None), "m", 100, 0)
    clock.advance(86400)  # the next day: the month's budget holds
    refused = await refusal(limits, monthly)
    assert type(refused) is errors.BudgetExhausted and refused.limit == "tokens_per_month"
    assert refused.retry_after == pytest.approx(utc("2027-02-01T00:00:00") - clock.now)
    clock.now = utc("2027-02-01T00:00:00")
    await limits.admit(monthly, "monthly", None)


async def test_emptied_windows_are_forgotten(store, store_url):
    """Windows of end users come and go: one that has emptied is dropped (kept in the process,
    or a row of the database), so they take no room for ever; dropped, it reads as empty."""
    clock = Clock(START)
    limits = limits_on(store, store_url, clock, user_rpm=1)
    for user in ("a", "b", "c"):
        await limits.admit(None, None, user)

    async def sweep() -> int:
        """Windows dropped by the sweep (the background task's, once a minute)."""
        if limits.shared:
            return await store.prune_windows(clock())
        before = len(limits._tat)
        await limits._prune(clock())
        return before - len(limits._tat)

    clock.advance(59)
    assert await sweep() == 0  # each still holds a request
    clock.advance(1)
    assert await sweep() == 3
    await limits.admit(None, None, "a")


def test_the_periods_and_the_user_ids():
    assert next_day(utc("2026-12-31T23:59:59")) == utc("2027-01-01T00:00:00")
    assert next_month(utc("2026-12-15T00:00:00")) == utc("2027-01-01T00:00:00")
    assert next_month(utc("2027-02-28T23:00:00")) == utc("2027-03-01T00:00:00")
    assert checked_user(None) is None and checked_user("user-42") == "user-42"
    for bad in ("", "x" * 513, "a\nb", 7, ["a"]):
        with pytest.raises(errors.InvalidInput) as caught:
            checked_user(bad)
        assert caught.value.param == "user"


async def test_the_budgets_are_read_back_from_the_usage(store, store_url):
    """An instance that starts later (or another instance, on PostgreSQL) counts what was spent."""
    clock = Clock(START)
    first = limits_on(store, store_url, clock)
    grant = Grant("bot", stored=True, tokens_per_day=50)
    await first.charge(await first.admit(grant, "bot", None), "m", 40, 20)
    if not first.shared:
        await first.flush()  # SQLite: the usage is written in batches (and at shutdown)
    later = limits_on(store, store_url, clock)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(later.run)
            refused = await refusal(later, grant)
            nursery.cancel_scope.cancel()
    assert refused.code == "budget_exhausted"
    assert await later.spent_now("bot") == (60, 60)


async def test_what_a_key_spent_counts_its_usage_not_yet_written_in_the_day_and_the_month(
    store, store_url
):
    clock = Clock(START + 86400)  # 2 December: 1 December is in the month, not in the day
    limits = limits_on(store, store_url, clock)
    ticket = await limits.admit(Grant("bot", stored=True), "bot", None)  # no limit: batched
    clock.advance(-86400)
    await limits.charge(ticket, "m", 3, 4)
    clock.advance(86400)
    await limits.charge(ticket, "m", 10, 20)
    assert await limits.spent_now("bot") == (30, 37)  # kept in this process, not yet written
    await limits.flush()
    assert await limits.spent_now("bot") == (30, 37)  # written now: still counted once
    assert await limits.spent_now("other") == (0, 0)


async def test_windows_of_the_database_are_shared_by_instances(pg_schema):
    """Two instances on one PostgreSQL database, taking one key's window at once."""
    url = pg_url(pg_schema)
    stores = [await open_url(url, STORE_SETTINGS) for _ in range(2)]
    try:
        clock = Clock(START)
        instances = [limits_on(store, url, clock) for store in stores]
        grant = Grant("bot", stored=True, rpm=10)
        taken: list[bool] = []

        async def ask(limits: Limits) -> None:
            try:
                await limits.admit(grant, "bot", None)
                taken.append(True)
            except errors.RateLimited:
                taken.append(False)

        async with trio.open_nursery() as nursery:
            for index in range(40):
                nursery.start_soon(ask, instances[index % 2])
        assert taken.count(True) == 10  # the clock stands still: exactly the burst
        assert (await refusal(instances[1], grant)).limit == "rpm"
    finally:
        for store in stores:
            await store.close()


# -- refusals on every protocol -----------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def database_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The server's store: its own SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return {}
    return {"DATABASE_URL": pg_url(request.getfixturevalue("pg_schema"))}


async def every_protocol_server(start_server: StartServer, **env: str) -> Server:
    return await start_server(
        WS_PORT=str(free_port()), GRPC_PORT=str(free_port()), ADMIN_KEY=ADMIN_KEY, **env
    )


async def refusals_everywhere(server: Server, secret: str, code: str, retry: int) -> None:
    """Every kind of ask by ``secret``'s key is refused with ``code``, saying ``retry`` (s)."""
    headers = bearer(secret)
    async with server.client(headers=headers) as client:
        for path in ("/ask/c1", "/ask/c1/stream", "/ask/c2"):
            response = await client.post(path, json={"prompt": "hi"})
            assert response.status_code == 429, response.text
            assert error_code(response) == code
            assert response.headers["Retry-After"] == str(retry)
            assert response.json()["error"]["retry_after"] == retry
            assert secret not in response.text
        turn_id = (await client.get("/conversations/c1")).json()["history"][0]["id"]
        for path in ("regenerate", "regenerate/stream"):
            response = await client.post(f"/conversations/c1/turns/{turn_id}/{path}")
            assert (response.status_code, error_code(response)) == (429, code), response.text

    ws_headers = [(b"Authorization", f"Bearer {secret}".encode())]
    with trio.fail_after(15):
        async with open_websocket_url(
            ws_url(server.running.ws_port), extra_headers=ws_headers
        ) as ws:
            await ws.send_message(
                json.dumps({"type": "ask", "conversation_id": "c1", "prompt": "hi", "id": 1})
            )
            error = json.loads(await ws.get_message())
            assert (error["type"], error["code"], error["retry_after"], error["id"]) == (
                "error",
                code,
                retry,
                1,
            )
            await ws.send_message("<|ask|>$c1$hi")
            [frame] = await original_frames(ws)
            assert frame.startswith("<|err|>$this key") and f"retry in {retry}" in frame

    request = chat_pb2.AskRequest(conversation_id="c1", prompt="hi")
    failure = await rpc_error(server, "Ask", request, metadata=headers)
    assert status_of(failure)[0] == purerpc.StatusCode.RESOURCE_EXHAUSTED
    streamed = await grpcio_stream(server.running.grpc_port, "Ask", request, api_key=secret)
    assert streamed.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not streamed.replies
    assert streamed.trailing["retry-after"] == str(retry)
    regenerate = chat_pb2.RegenerateRequest(conversation_id="c1", turn_id=turn_id)
    regenerated = await grpcio_stream(
        server.running.grpc_port, "Regenerate", regenerate, api_key=secret
    )
    assert regenerated.code == grpc.StatusCode.RESOURCE_EXHAUSTED

    messages = [{"role": "user", "content": "hi"}]
    async with async_client(server, secret) as sdk:
        calls = [
            lambda: sdk.chat.completions.create(model=server.settings.model, messages=messages),
            lambda: sdk.chat.completions.create(
                model=server.settings.model, messages=messages, stream=True
            ),
            lambda: sdk.chat.completions.create(
                model=server.settings.model, messages=messages, extra_body={"conversation": "c1"}
            ),
            lambda: sdk.responses.create(model=server.settings.model, input="hi"),
            lambda: sdk.responses.create(model=server.settings.model, input="hi", stream=True),
        ]
        for call in calls:
            with pytest.raises(openai.RateLimitError) as caught:
                await call()
            assert caught.value.code == code
            assert caught.value.response.headers["retry-after"] == str(retry)
            expected_type = (
                "insufficient_quota" if code == "budget_exhausted" else "rate_limit_error"
            )
            assert caught.value.type == expected_type


# The asks refusals_everywhere makes, by protocol.
REFUSED = {"http": 3, "sse": 2, "ws": 2, "grpc": 3, "openai": 5}


async def test_an_ask_over_the_keys_rpm_is_refused_on_every_protocol_before_the_model(
    start_server: StartServer, database_env: dict[str, str]
):
    server = await every_protocol_server(start_server, **database_env)
    clock = freeze(server, START)
    secret = await create_key(server.http_url, "limited", rpm=1)
    async with server.client(headers=bearer(secret)) as client:
        assert (await client.post("/ask/c1", json={"prompt": "hi"})).status_code == 200
    asked = len(server.fake.requests)
    with capture_access() as access:
        await refusals_everywhere(server, secret, "rate_limited", 60)
    assert len(server.fake.requests) == asked  # none reached the model
    outcomes = [line["outcome"] for line in access.lines]
    assert outcomes == ["rate_limited"] * sum(REFUSED.values())
    assert {line["key"] for line in access.lines} == {"limited"}
    async with server.client(headers=bearer(secret)) as client:
        text = await scrape(client)
        for protocol, count in REFUSED.items():
            assert (
                metric(text, "easybackend_asks_total", protocol=protocol, outcome="rate_limited")
                == count
            )
        assert metric(text, "easybackend_limit_refusals_total", key="limited", limit="rpm") == sum(
            REFUSED.values()
        )
        assert secret not in text
        clock.advance(60)  # the window refilled
        assert (await client.post("/ask/c1", json={"prompt": "again"})).status_code == 200


async def test_an_ask_over_the_keys_budget_is_refused_on_every_protocol_until_the_day_turns(
    start_server: StartServer, database_env: dict[str, str]
):
    server = await every_protocol_server(start_server, **database_env)
    clock = freeze(server, START)  # noon UTC: the day turns in 43200 s
    secret = await create_key(server.http_url, "thrifty", tokens_per_day=5)
    async with server.client(headers=bearer(secret)) as client:
        first = await client.post("/ask/c1", json={"prompt": "one two three four five six"})
        assert first.status_code == 200  # under the budget when it began: it finishes
        assert first.json()["usage"]["total_tokens"] > 5
    asked = len(server.fake.requests)
    await refusals_everywhere(server, secret, "budget_exhausted", 43200)
    assert len(server.fake.requests) == asked
    async with server.client(headers=bearer(secret)) as client:
        text = await scrape(client)
        refused = metric(
            text, "easybackend_limit_refusals_total", key="thrifty", limit="tokens_per_day"
        )
        assert refused == sum(REFUSED.values())
        clock.now = next_day(clock.now)
        assert (await client.post("/ask/c1", json={"prompt": "a new day"})).status_code == 200


async def test_an_ask_over_the_keys_tpm_is_refused_on_every_protocol_until_it_drains(
    start_server: StartServer, database_env: dict[str, str]
):
    server = await every_protocol_server(start_server, **database_env)
    clock = freeze(server, START)
    secret = await create_key(server.http_url, "wordy", tpm=30)  # a token costs 2 s
    async with server.client(headers=bearer(secret)) as client:
        big = await client.post("/ask/c1", json={"prompt": "[[fake:tokens=40]] hi"})
        assert big.status_code == 200, big.text  # the bucket had room: it overdraws it
        spent = big.json()["usage"]["total_tokens"]
    wait = spent * 2 + 2 - 60  # its tokens' seconds past the minute, and one more token's
    asked = len(server.fake.requests)
    await refusals_everywhere(server, secret, "rate_limited", wait)
    assert len(server.fake.requests) == asked
    async with server.client(headers=bearer(secret)) as client:
        text = await scrape(client)
        refused = metric(text, "easybackend_limit_refusals_total", key="wordy", limit="tpm")
        assert refused == sum(REFUSED.values())
        clock.advance(wait - 1)
        still = await client.post("/ask/c1", json={"prompt": "hi"})
        assert (still.status_code, still.json()["error"]["retry_after"]) == (429, 1)
        clock.advance(1)
        assert (await client.post("/ask/c1", json={"prompt": "drained"})).status_code == 200


async def test_an_ask_over_the_keys_monthly_budget_is_refused_on_every_protocol_until_it_turns(
    start_server: StartServer, database_env: dict[str, str]
):
    server = await every_protocol_server(start_server, **database_env)
    clock = freeze(server, START)  # 1 December, noon UTC
    secret = await create_key(server.http_url, "monthly", tokens_per_month=5)
    async with server.client(headers=bearer(secret)) as client:
        first = await client.post("/ask/c1", json={"prompt": "one two three four five six"})
        assert first.status_code == 200 and first.json()["usage"]["total_tokens"] > 5
    asked = len(server.fake.requests)
    month = int(next_month(START) - START)
    await refusals_everywhere(server, secret, "budget_exhausted", month)
    assert len(server.fake.requests) == asked
    async with server.client(headers=bearer(secret)) as client:
        text = await scrape(client)
        refused = metric(
            text, "easybackend_limit_refusals_total", key="monthly", limit="tokens_per_month"
        )
        assert refused == sum(REFUSED.values())
        clock.now = next_day(START)  # a new day of the same month: still spent
        tomorrow = await client.post("/ask/c1", json={"prompt": "hi"})
        assert (tomorrow.status_code, error_code(tomorrow)) == (429, "budget_exhausted")
        assert tomorrow.json()["error"]["retry_after"] == next_month(START) - next_day(START)
        clock.now = next_month(START)
        assert (await client.post("/ask/c1", json={"prompt": "a new month"})).status_code == 200


async def test_an_ask_refused_for_its_conversations_model_takes_no_window(
    start_server: StartServer, database_env: dict[str, str]
):
    """A conversation's stored model that the key may no longer use, or a parent turn that does
    not exist, refuses the ask before the key's windows are taken: the key's one request of the
    minute is still there."""
    server = await start_server(
        ADMIN_KEY=ADMIN_KEY, MODELS=f"{DEFAULT_MODEL},other-model", **database_env
    )
    freeze(server, START)
    secret = await create_key(server.http_url, "bot", rpm=1)
    async with server.client(headers=bearer(secret)) as client:
        stored = await client.put("/conversations/m/settings", json={"model": "other-model"})
        assert stored.status_code == 200, stored.text
        narrowed = await admin_call(
            server.http_url, "PATCH", "/admin/keys/bot", {"models": [DEFAULT_MODEL]}
        )
        assert narrowed.status_code == 200, narrowed.text
        asked = len(server.fake.requests)
        refused = await client.post("/ask/m", json={"prompt": "hi"})
        assert (refused.status_code, error_code(refused)) == (403, "model_not_allowed")
        unknown = await client.post("/ask/m", json={"prompt": "hi", "parent_id": "no-such-turn"})
        assert (unknown.status_code, error_code(unknown)) == (404, "not_found")  # no window either
        assert len(server.fake.requests) == asked
        answered = await client.post("/ask/m", json={"prompt": "hi", "model": DEFAULT_MODEL})
        assert answered.status_code == 200, answered.text  # the minute's one request
        spent = await client.post("/ask/other", json={"prompt": "hi"})
        assert (spent.status_code, error_code(spent)) == (429, "rate_limited")


async def test_an_ask_over_the_limits_is_refused_at_once_while_its_conversation_answers(
    start_server: StartServer, database_env: dict[str, str]
):
    """The limits are checked before the conversation's lock: an ask they refuse does not
    wait for the answer in progress on its conversation (here one that never ends)."""
    server = await start_server(ADMIN_KEY=ADMIN_KEY, **database_env)
    freeze(server, START)
    secret = await create_key(server.http_url, "bot", rpm=1)
    async with server.client(headers=bearer(secret)) as client:
        async with trio.open_nursery() as nursery:

            async def hold() -> None:  # the minute's one request, answering until cancelled
                await client.post("/ask/busy/stream", json={"prompt": "[[fake:stall_after=1]] hi"})

            nursery.start_soon(hold)
            await wait_until(lambda: len(server.fake.requests) == 1)
            with trio.fail_after(5):  # it would wait for ever behind the answer in progress
                refused = await client.post("/ask/busy", json={"prompt": "again"})
            nursery.cancel_scope.cancel()
    assert (refused.status_code, error_code(refused)) == (429, "rate_limited")
    assert len(server.fake.requests) == 1


async def test_each_end_user_of_a_key_has_user_rpm_on_every_protocol(
    start_server: StartServer, database_env: dict[str, str]
):
    server = await every_protocol_server(start_server, USER_RPM="1", **database_env)
    freeze(server, START)
    secret = await create_key(server.http_url, "bot")  # no limit of its own
    headers = bearer(secret)
    grpc_port, model = server.running.grpc_port, server.settings.model
    async with server.client(headers=headers) as client:
        made = await client.post("/ask/u0", json={"prompt": "first"})
        turn_id = made.json()["turn_id"]

        async def http(user: str) -> str:
            response = await client.post("/ask/u1", json={"prompt": "hi", "user": user})
            return "ok" if response.status_code == 200 else error_code(response)

        async def sse(user: str) -> str:
            response = await client.post("/ask/u1/stream", json={"prompt": "hi", "user": user})
            return "ok" if response.status_code == 200 else error_code(response)

        async def regenerate(user: str) -> str:
            path = f"/conversations/u0/turns/{turn_id}/regenerate"
            response = await client.post(path, json={"user": user})
            return "ok" if response.status_code == 200 else error_code(response)

        async def websocket(user: str) -> str:
            url = ws_url(server.running.ws_port, f"/?api_key={secret}")
            async with open_websocket_url(url) as ws:
                await ws.send_message(
                    json.dumps(
                        {"type": "ask", "conversation_id": "u1", "prompt": "hi", "user": user}
                    )
                )
                while True:
                    reply = json.loads(await ws.get_message())
                    if reply["type"] == "end":
                        return "ok"
                    if reply["type"] == "error":
                        return reply["code"]

        async def grpc_ask(user: str) -> str:
            request = chat_pb2.AskRequest(conversation_id="u1", prompt="hi", user=user)
            result = await grpcio_stream(grpc_port, "Ask", request, api_key=secret)
            return (
                "ok"
                if result.code == grpc.StatusCode.OK
                else result.trailing.get("retry-after", "?")
            )

        async def grpc_regenerate(user: str) -> str:
            request = chat_pb2.RegenerateRequest(conversation_id="u0", turn_id=turn_id, user=user)
            result = await grpcio_stream(grpc_port, "Regenerate", request, api_key=secret)
            return (
                "ok"
                if result.code == grpc.StatusCode.OK
                else result.trailing.get("retry-after", "?")
            )

        async with async_client(server, secret) as sdk:
            messages = [{"role": "user", "content": "hi"}]

            async def sdk_call(make) -> str:
                try:
                    await make()
                except openai.RateLimitError as exc:
                    return exc.code
                return "ok"

            async def relay(user: str) -> str:
                return await sdk_call(
                    lambda: sdk.chat.completions.create(model=model, messages=messages, user=user)
                )

            async def conversation(user: str) -> str:
                return await sdk_call(
                    lambda: sdk.chat.completions.create(
                        model=model, messages=messages, user=user, extra_body={"conversation": "u2"}
                    )
                )

            async def responses(user: str) -> str:
                return await sdk_call(
                    lambda: sdk.responses.create(model=model, input="hi", user=user)
                )

            asks = {
                "http": (http, "rate_limited"),
                "sse": (sse, "rate_limited"),
                "regenerate": (regenerate, "rate_limited"),
                "ws": (websocket, "rate_limited"),
                "grpc": (grpc_ask, "60"),
                "grpc regenerate": (grpc_regenerate, "60"),
                "relay": (relay, "rate_limited"),
                "conversation": (conversation, "rate_limited"),
                "responses": (responses, "rate_limited"),
            }
            for name, (ask, refused) in asks.items():
                user = f"user of {name}"
                assert await ask(user) == "ok", name
                before = len(server.fake.requests)
                assert await ask(user) == refused, name
                assert len(server.fake.requests) == before, name  # the model was not called
                assert await ask(f"another {user}") == "ok", name
        text = await scrape(client)
    assert metric(text, "easybackend_limit_refusals_total", key="bot", limit="user_rpm") == len(
        asks
    )
    if database_env:  # PostgreSQL: the windows are the database's, which every instance shares
        with psycopg.connect(database_env["DATABASE_URL"], connect_timeout=5) as connection:
            rows = connection.execute("SELECT name FROM rate_windows").fetchall()
        assert {name for (name,) in rows} >= {f"user:bot:user of {name}" for name in asks}


async def test_a_user_that_is_no_end_user_id_is_invalid_input(start_server: StartServer):
    server = await every_protocol_server(start_server, USER_RPM="5")
    async with server.client() as client:
        response = await client.post("/ask/x", json={"prompt": "hi", "user": ""})
        assert (response.status_code, error_code(response)) == (400, "invalid_input")
        assert "user must be" in response.json()["error"]["message"]
    async with async_client(server) as sdk:
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk.chat.completions.create(
                model=server.settings.model,
                messages=[{"role": "user", "content": "hi"}],
                user="a\x00",
            )
        assert caught.value.body["param"] == "user"
    request = chat_pb2.AskRequest(conversation_id="x", prompt="hi", user="")
    result = await grpcio_stream(server.running.grpc_port, "Ask", request)
    assert result.code == grpc.StatusCode.INVALID_ARGUMENT
    assert not server.fake.requests


# -- tokens, what an answer in progress does, and what a cut answer costs -----------------------


async def test_tpm_counts_the_tokens_of_the_asks_that_ended(start_server: StartServer):
    server = await start_server(ADMIN_KEY=ADMIN_KEY)
    clock = freeze(server, START)
    secret = await create_key(server.http_url, "bot", tpm=30)
    async with server.client(headers=bearer(secret)) as client:
        big = await client.post("/ask/t", json={"prompt": "[[fake:tokens=40]] hi"})
        assert big.status_code == 200, big.text
        spent = big.json()["usage"]["total_tokens"]
        refused = await client.post("/ask/t", json={"prompt": "hi"})
        assert (refused.status_code, error_code(refused)) == (429, "rate_limited")
        assert "30 tokens per minute (tpm)" in refused.json()["error"]["message"]
        # spent tokens of 2 s each, 60 s of room, plus one token's 2 s
        assert refused.json()["error"]["retry_after"] == -(-(spent * 2 + 2 - 60) // 1)
        clock.advance(spent * 2 + 2 - 60)
        assert (await client.post("/ask/t", json={"prompt": "hi"})).status_code == 200


async def test_an_answer_in_progress_when_the_budget_runs_out_finishes(start_server: StartServer):
    server = await start_server(ADMIN_KEY=ADMIN_KEY)
    freeze(server, START)
    secret = await create_key(server.http_url, "bot", tokens_per_day=30)
    async with server.client(headers=bearer(secret)) as client:
        slow = {"prompt": "[[fake:tokens=20]] [[fake:delay=0.1]] slow"}
        async with client.stream("POST", "/ask/slow/stream", json=slow) as streamed:
            assert streamed.status_code == 200
            lines = streamed.aiter_lines()
            async for line in lines:
                if line.startswith("event: delta"):
                    break
            # while it streams, another ask of the key spends the whole day's budget
            spender = await client.post("/ask/other", json={"prompt": "[[fake:tokens=40]] x"})
            assert spender.status_code == 200 and spender.json()["usage"]["total_tokens"] > 30
            refused = await client.post("/ask/third", json={"prompt": "hi"})
            assert error_code(refused) == "budget_exhausted"
            rest = [line async for line in lines]
        end = json.loads(rest[rest.index("event: end") + 1].removeprefix("data: "))
        assert end["finish_reason"] == "stop" and end["usage"]["completion_tokens"] == 20
        usage = (await client.get("/usage")).json()
        assert usage["total"]["requests"] == 2  # the finished answer counts too
        assert usage["budget"]["spent_today"] == usage["total"]["total_tokens"]


async def spent_requests(client: httpx2.AsyncClient, count: int) -> dict:
    """GET /usage once it shows ``count`` requests (a cut answer is charged as it is cleaned up)."""
    with trio.fail_after(5):
        while True:
            usage = (await client.get("/usage")).json()
            if usage["total"]["requests"] >= count:
                return usage
            await trio.sleep(0.01)


async def test_a_cut_answer_costs_what_it_received_native_and_relayed(start_server: StartServer):
    server = await start_server(ADMIN_KEY=ADMIN_KEY)
    freeze(server, START)
    secret = await create_key(server.http_url, "bot", tokens_per_day=3)
    async with server.client(headers=bearer(secret)) as client:
        prompt = "[[fake:tokens=500]] [[fake:delay=0.01]]"
        async with client.stream("POST", "/ask/cut/stream", json={"prompt": prompt}) as response:
            async for line in response.aiter_lines():
                if line.startswith("event: delta"):
                    break  # the client hangs up after the first piece
        usage = await spent_requests(client, 1)
        assert 0 < usage["total"]["completion_tokens"] < 500
        refused = await client.post("/ask/next", json={"prompt": "hi"})
        assert error_code(refused) == "budget_exhausted"

    relay = await start_server(ADMIN_KEY=ADMIN_KEY)
    freeze(relay, START)
    secret = await create_key(relay.http_url, "relayed", tokens_per_day=3)
    async with async_client(relay, secret) as sdk:
        stream = await sdk.chat.completions.create(
            model=relay.settings.model,
            messages=[{"role": "user", "content": prompt}],
            stream=True,
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        await stream.close()
        async with relay.client(headers=bearer(secret)) as client:
            usage = await spent_requests(client, 1)
            assert usage["usage"] and 0 < usage["total"]["completion_tokens"] < 500
        with pytest.raises(openai.RateLimitError):
            await sdk.chat.completions.create(
                model=relay.settings.model, messages=[{"role": "user", "content": "hi"}]
            )


async def test_what_was_spent_survives_a_restart(start_server: StartServer, make_settings):
    """SQLite keeps the budgets in the process: written at shutdown, read by the next one."""
    first = await start_server(ADMIN_KEY=ADMIN_KEY)
    freeze(first, START)
    secret = await create_key(first.http_url, "bot", tokens_per_day=5, tokens_per_month=10**6)
    async with first.client(headers=bearer(secret)) as client:
        assert (await client.post("/ask/r", json={"prompt": "one two three"})).status_code == 200
    first.shutdown.set()
    with trio.fail_after(10):
        await first.stopped.wait()
    again = await start_server(
        ADMIN_KEY=ADMIN_KEY, CONVERSATIONS_DIR=str(first.settings.conversations_dir)
    )
    freeze(again, START)
    async with again.client(headers=bearer(secret)) as client:
        refused = await client.post("/ask/r", json={"prompt": "hi"})
        assert (refused.status_code, error_code(refused)) == (429, "budget_exhausted")
        budget = (await client.get("/usage")).json()["budget"]
        assert budget["spent_today"] == budget["spent_this_month"] > 5


# -- across instances: PostgreSQL --------------------------------------------------------------


@pytest.fixture
async def two_instances(fake, tmp_path: Path, pg_schema: str) -> AsyncIterator[list[str]]:
    """Two ``python run.py`` processes on one PostgreSQL schema (both with ADMIN_KEY), started
    together; their base URLs. Killed at teardown; neither logged a secret."""
    processes: list[tuple[ServerProcess, int]] = []
    for name in ("a", "b"):
        port = free_port()
        workdir = tmp_path / name
        workdir.mkdir()
        env = server_env(
            fake,
            HTTP_PORT=str(port),
            GRPC_PORT="off",
            WS_PORT="off",
            DATABASE_URL=pg_url(pg_schema),
            ADMIN_KEY=ADMIN_KEY,
            LOG_LEVEL="WARNING",
        )
        processes.append((ServerProcess(workdir, env), port))
    try:
        async with trio.open_nursery() as nursery:
            for process, port in processes:

                async def start(process: ServerProcess = process, port: int = port) -> None:
                    await process.start()
                    await process.wait_healthy(port)

                nursery.start_soon(start)
        yield [f"http://127.0.0.1:{port}" for _, port in processes]
    finally:
        for process, _ in processes:
            process.ensure_stopped()
        for process, _ in processes:
            if process.process is not None:
                with trio.fail_after(10):
                    await process.process.wait()
            assert ADMIN_KEY not in process.output and "eb-" not in process.output


async def keys_reached(urls: list[str]) -> None:
    """Wait until every instance requires keys: it read the key table, the keys made before."""
    for url in urls:
        await wait_for_status(url, "no-such-key-SECRET", 401)


async def test_two_instances_together_never_exceed_a_keys_rpm_by_more_than_one(
    two_instances: list[str], fake
):
    """The windows are rows of the database both instances take atomically: 40 asks sent at
    once, 20 to each, get the key's burst of rpm between them (one more should a request's
    worth of the window refill while they run: 12 s with rpm 5)."""
    rpm = 5
    secret = await create_key(two_instances[0], "shared", rpm=rpm)
    statuses: list[tuple[int, str]] = []

    async def ask(url: str, index: int) -> None:
        async with httpx2.AsyncClient(base_url=url, timeout=15, headers=bearer(secret)) as client:
            response = await client.post(f"/ask/c{index}", json={"prompt": "hi"})
            statuses.append(
                (response.status_code, "" if response.status_code == 200 else error_code(response))
            )

    await keys_reached(two_instances)
    async with trio.open_nursery() as nursery:
        for index in range(40):
            nursery.start_soon(ask, two_instances[index % 2], index)
    taken = sum(status == 200 for status, _ in statuses)
    assert rpm <= taken <= rpm + 1, statuses
    assert {(status, code) for status, code in statuses if status != 200} == {(429, "rate_limited")}
    assert len(fake.requests) == taken  # the refused asks never reached the model


async def test_two_instances_share_the_budgets_and_the_usage(two_instances: list[str]):
    first, second = two_instances
    secret = await create_key(first, "budgeted", tokens_per_day=5)
    async with httpx2.AsyncClient(base_url=first, timeout=15, headers=bearer(secret)) as client:
        spent = await client.post("/ask/b", json={"prompt": "one two three four"})
        assert spent.status_code == 200, spent.text
        tokens = spent.json()["usage"]["total_tokens"]
    await keys_reached(two_instances)
    async with httpx2.AsyncClient(base_url=second, timeout=15, headers=bearer(secret)) as client:
        refused = await client.post("/ask/b", json={"prompt": "hi"})
        assert (refused.status_code, error_code(refused)) == (429, "budget_exhausted")
        usage = (await client.get("/usage")).json()
        assert usage["total"] == {
            "requests": 1,
            "prompt_tokens": spent.json()["usage"]["prompt_tokens"],
            "completion_tokens": spent.json()["usage"]["completion_tokens"],
            "total_tokens": tokens,
        }
        assert usage["budget"]["spent_today"] == tokens
    async with httpx2.AsyncClient(base_url=second, timeout=15, headers=bearer(ADMIN_KEY)) as admin:
        rows = (await admin.get("/admin/usage", params={"group_by": "key"})).json()["usage"]
    assert rows == [
        {
            "key": "budgeted",
            "requests": 1,
            **{k: v for k, v in usage["total"].items() if k != "requests"},
        }
    ]


async def test_a_usage_read_waits_for_the_write_under_way(store, store_url: str):
    """A read flushes first: it must not slip in while the background write it would wait
    for is still running (it would read the table before that write commits)."""
    limits = limits_on(store, store_url, Clock(START))
    release = trio.Event()
    writing = trio.Event()
    real_add = store.add_usage  # type: ignore[attr-defined]

    async def held_add(rows):
        writing.set()
        await release.wait()
        await real_add(rows)

    store.add_usage = held_add  # type: ignore[attr-defined]
    day = "2026-12-01"
    limits._keep([("alice", day, "m", 1, 3, 4)])
    read: list[object] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(limits.flush)  # the background task's write, held open
            await writing.wait()

            async def reader() -> None:
                read.append(await limits.usage_rows("alice", day, day))

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            assert read == []  # the read waits for the write under way
            release.set()
    (rows,) = read
    assert [tuple(row)[3:] for row in rows] == [(1, 3, 4)]
