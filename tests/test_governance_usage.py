"""Usage per key, model and UTC day (SPEC §14): ``GET /usage`` for the caller's own key,
``GET /admin/usage`` for every key (ADMIN_KEY), ``easybackend usage``, and the tokens of each key
name in Prometheus; both backends; the usage of the turns stored before the upgrade.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from helpers.database import LinearConversation, write_linear_sqlite
from helpers.http import bearer, error_code
from helpers.keys import ADMIN_KEY, admin_call, create_key
from helpers.limits import freeze, utc
from helpers.logs import metric, scrape
from helpers.openai_sdk import async_client
from helpers.postgres import pg_url, write_linear_postgres
from helpers.servers import Server, StartServer, clean_env, run_cli
from helpers.upstream import ALLOW_OTHER_MODEL, OTHER_MODEL

from easybackend.settings import load_settings
from easybackend.storage import open_url

DAY_ONE = utc("2026-11-30T10:00:00")
DAY_TWO = utc("2026-12-01T10:00:00")
FIGURES = ("prompt_tokens", "completion_tokens", "total_tokens")


@pytest.fixture(params=["sqlite", "postgres"])
def database_env(request: pytest.FixtureRequest) -> dict[str, str]:
    if request.param == "sqlite":
        return {}
    return {"DATABASE_URL": pg_url(request.getfixturevalue("pg_schema"))}


async def ask(server: Server, secret: str | None, conversation: str, **body: object) -> dict:
    async with server.client(headers=bearer(secret)) as client:
        response = await client.post(f"/ask/{conversation}", json={"prompt": "hi", **body})
    assert response.status_code == 200, response.text
    return response.json()["usage"]


def added(*usages: dict) -> dict[str, int]:
    return {
        "requests": len(usages),
        **{name: sum(usage[name] for usage in usages) for name in FIGURES},
    }


async def get(server: Server, secret: str | None, path: str, **params: str) -> dict:
    async with server.client(headers=bearer(secret)) as client:
        response = await client.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


async def test_a_key_sees_its_own_usage_by_day_and_by_model(
    start_server: StartServer, database_env: dict[str, str], caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG)
    server = await start_server(ADMIN_KEY=ADMIN_KEY, **ALLOW_OTHER_MODEL, **database_env)
    clock = freeze(server, DAY_ONE)
    alice = await create_key(server.http_url, "alice", tokens_per_month=10**6)
    bob = await create_key(server.http_url, "bob")
    first = await ask(server, alice, "a")
    other = await ask(server, alice, "a", model=OTHER_MODEL)
    clock.now = DAY_TWO
    second = await ask(server, alice, "b", prompt="a longer prompt than the first")
    async with async_client(server, alice) as sdk:  # the /v1 relay's usage counts too
        relayed = await sdk.chat.completions.create(
            model=server.settings.model, messages=[{"role": "user", "content": "relayed"}]
        )
    relay = relayed.usage.model_dump(include=set(FIGURES))
    bobs = await ask(server, bob, "a")

    by_day = await get(server, alice, "/usage", **{"from": "2026-11-01"})
    assert (by_day["key"], by_day["from"], by_day["to"], by_day["group_by"]) == (
        "alice",
        "2026-11-01",
        "2026-12-01",  # today
        "day",
    )
    assert by_day["usage"] == [
        {"day": "2026-11-30", **added(first, other)},
        {"day": "2026-12-01", **added(second, relay)},
    ]
    assert by_day["total"] == added(first, other, second, relay)
    assert by_day["budget"] == {
        "tokens_per_day": None,
        "tokens_per_month": 10**6,
        "spent_today": added(second, relay)["total_tokens"],
        "spent_this_month": added(second, relay)["total_tokens"],  # December's
    }

    default = await get(server, alice, "/usage")  # this month, by day
    assert default["from"] == "2026-12-01" and default["total"] == added(second, relay)
    by_model = await get(
        server, alice, "/usage", **{"from": "2026-11-30", "to": "2026-11-30", "group_by": "model"}
    )
    assert by_model["usage"] == [
        {"model": server.settings.model, **added(first)},
        {"model": OTHER_MODEL, **added(other)},
    ]
    both = await get(server, alice, "/usage", **{"from": "2026-11-30", "group_by": "day,model"})
    assert [(row["day"], row["model"]) for row in both["usage"]] == [
        ("2026-11-30", server.settings.model),
        ("2026-11-30", OTHER_MODEL),
        ("2026-12-01", server.settings.model),
    ]
    assert (await get(server, bob, "/usage"))["total"] == added(bobs)  # each key its own

    async with server.client(headers=bearer(alice)) as client:
        text = await scrape(client)
    total = added(first, other, second, relay)
    for key, figures in (("alice", total), ("bob", added(bobs))):
        for direction in ("prompt", "completion"):
            assert (
                metric(text, "easybackend_key_tokens_total", key=key, direction=direction)
                == figures[f"{direction}_tokens"]
            )
    for secret in (alice, bob):
        assert secret not in text and secret not in caplog.text
        assert secret not in json.dumps(by_day)


async def test_a_usage_query_is_checked(server: Server):
    for params, field in (
        ({"from": "2026-13-01"}, "from"),
        ({"to": "yesterday"}, "to"),
        ({"from": "2026-12-02", "to": "2026-12-01"}, "from"),
        ({"from": "2025-01-01", "to": "2026-12-01"}, "from"),  # more than 366 days
        ({"group_by": "key"}, "group_by"),  # a key sees its own usage only
        ({"group_by": "day,week"}, "group_by"),
    ):
        async with server.client() as client:
            response = await client.get("/usage", params=params)
        assert (response.status_code, error_code(response)) == (400, "invalid_input"), params
        assert field in response.json()["error"]["message"]


async def test_without_keys_the_usage_is_every_asks(start_server: StartServer):
    server = await start_server()
    freeze(server, DAY_TWO)
    asked = await ask(server, None, "x")
    usage = await get(server, None, "/usage")
    assert usage["key"] is None and usage["usage"] == [{"day": "2026-12-01", **added(asked)}]
    async with server.client() as client:
        text = await scrape(client)
    assert "easybackend_key_tokens_total{" not in text  # key names only: no key, no series


async def test_the_admin_sees_every_keys_usage(
    start_server: StartServer, database_env: dict[str, str]
):
    server = await start_server(ADMIN_KEY=ADMIN_KEY, **database_env)
    clock = freeze(server, DAY_ONE)
    alice = await create_key(server.http_url, "alice")
    bob = await create_key(server.http_url, "bob")
    a1 = await ask(server, alice, "a")
    clock.now = DAY_TWO
    a2 = await ask(server, alice, "a")
    b2 = await ask(server, bob, "b")
    model = server.settings.model

    everything = await get(server, ADMIN_KEY, "/admin/usage", **{"from": "2026-11-01"})
    assert everything["group_by"] == "key,day,model"
    assert everything["usage"] == [
        {"key": "alice", "day": "2026-11-30", "model": model, **added(a1)},
        {"key": "alice", "day": "2026-12-01", "model": model, **added(a2)},
        {"key": "bob", "day": "2026-12-01", "model": model, **added(b2)},
    ]
    assert everything["total"] == added(a1, a2, b2)
    by_key = await get(
        server, ADMIN_KEY, "/admin/usage", **{"from": "2026-11-01", "group_by": "key"}
    )
    assert by_key["usage"] == [{"key": "alice", **added(a1, a2)}, {"key": "bob", **added(b2)}]
    one = await get(server, ADMIN_KEY, "/admin/usage", key="bob", group_by="day")
    assert one["usage"] == [{"day": "2026-12-01", **added(b2)}]

    assert (await admin_call(server.http_url, "GET", "/admin/usage", key=None)).status_code == 401
    ordinary = await admin_call(server.http_url, "GET", "/admin/usage", key=alice)
    assert (ordinary.status_code, error_code(ordinary)) == (403, "forbidden")
    wrong = await admin_call(server.http_url, "GET", "/admin/usage?group_by=week")
    assert (wrong.status_code, error_code(wrong)) == (400, "invalid_input")


async def test_the_admin_usage_is_off_without_admin_key(server: Server):
    response = await admin_call(server.http_url, "GET", "/admin/usage")
    assert (response.status_code, error_code(response)) == (404, "not_found")


async def test_the_usage_command_reads_the_servers_database(
    start_server: StartServer, database_env: dict[str, str], tmp_path: Path
):
    server = await start_server(ADMIN_KEY=ADMIN_KEY, **database_env)
    freeze(server, DAY_TWO)
    alice = await create_key(server.http_url, "alice")
    bob = await create_key(server.http_url, "bob")
    a = await ask(server, alice, "a")
    b = await ask(server, bob, "b")
    server.shutdown.set()  # SQLite writes what it kept at the end (PostgreSQL as asks end)
    await server.stopped.wait()
    env = clean_env(DATABASE_URL=server.settings.database_url)
    days = ["--from", "2026-12-01", "--to", "2026-12-01"]
    done = await run_cli(tmp_path, env, ["usage", *days, "--json"])
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    assert [row["key"] for row in view["usage"]] == ["alice", "bob"]
    assert view["total"] == added(a, b)
    done = await run_cli(tmp_path, env, ["usage", *days, "--key", "bob", "--group-by", "model"])
    assert done.returncode == 0, done.stderr
    header, row, total = done.stdout.decode().splitlines()
    assert header.split() == ["MODEL", "REQUESTS", "PROMPT", "COMPLETION", "TOTAL"]
    assert row.split() == [server.settings.model, "1", *(str(b[name]) for name in FIGURES)]
    assert total.split() == ["total", "1", *(str(b[name]) for name in FIGURES)]
    bad = await run_cli(tmp_path, env, ["usage", "--from", "tomorrow"])
    assert bad.returncode == 1 and b"easybackend: error: from must be a date" in bad.stderr
    for secret in (alice, bob):
        assert secret.encode() not in done.stdout + done.stderr


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
async def test_the_upgrade_counts_the_usage_of_the_turns_stored_before(
    engine: str, tmp_path: Path, request: pytest.FixtureRequest
):
    """The previous release's turns (owner: the key's name) become the usage of their days."""
    old = [
        LinearConversation("alice", "1", ("a1", "a2", "a3")),
        LinearConversation("", "2", ("anonymous",)),
    ]
    if engine == "sqlite":
        path = tmp_path / "old.sqlite3"
        write_linear_sqlite(path, old)
        url = f"sqlite:///{path}"
    else:
        schema = request.getfixturevalue("pg_schema")
        write_linear_postgres(schema, old)
        url = pg_url(schema)
    settings = load_settings(
        {"PG_POOL_TIMEOUT": "2"}, environ={}, env_file=None, need_api_key=False
    )
    store = await open_url(url, settings)
    try:
        rows = await store.usage_rows(None, "2023-11-01", "2023-11-30")
    finally:
        await store.close()
    # the helpers' old turns: each billed 5 + 7 tokens, on 2023-11-14 (UTC), model gpt-old
    assert rows == [
        ("", "2023-11-14", "gpt-old", 1, 5, 7),
        ("alice", "2023-11-14", "gpt-old", 3, 15, 21),
    ]
