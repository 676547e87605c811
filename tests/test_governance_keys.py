"""Keys as data (SPEC §14): stored as hashes only, made, changed and revoked at run time by
``easybackend keys`` and the admin API, beside ``API_KEYS``, on every protocol and both
backends; a change reaches every instance within 5 seconds, and a secret reaches no log line,
no metric and no error message.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import httpx2
import openai
import psycopg
import purerpc
import pytest
import trio
from helpers.fuzz import run_schemathesis
from helpers.grpc import grpc_ask, rpc, rpc_error, status_of
from helpers.http import bearer, error_code, parse_sse
from helpers.keys import (
    ADMIN_KEY,
    PROPAGATION,
    admin_call,
    create_key,
    models_status,
    wait_for_status,
)
from helpers.logs import scrape
from helpers.openai_sdk import async_client
from helpers.postgres import pg_url
from helpers.servers import Server, ServerProcess, StartServer, clean_env, free_port, run_cli
from helpers.upstream import UPSTREAM_KEY, echo
from helpers.waiting import wait_until
from helpers.websocket import original_frames, ws_url
from trio_websocket import HandshakeError, open_websocket_url

from easybackend.errors import InvalidInput, KeyConflict, NotFound, StorageUnavailable
from easybackend.governance import keys
from easybackend.proto_gen import chat_pb2
from easybackend.settings import load_settings
from easybackend.storage import open_url

ALICE = "alice-SECRET-1111"
# What the admin API and ``keys list --json`` show of a key: never its secret or its digest.
KEY_FIELDS = {
    "name",
    "status",
    "created_at",
    "updated_at",
    "expires_at",
    "revoked_at",
    "disabled",
    "rpm",
    "tpm",
    "tokens_per_day",
    "tokens_per_month",
    "models",
}
STORE_SETTINGS = load_settings(
    {"PG_POOL_TIMEOUT": "2"}, environ={}, env_file=None, need_api_key=False
)


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh SQLite file or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'keys.sqlite3'}"
        return
    yield pg_url(request.getfixturevalue("pg_schema"))


@pytest.fixture
def database_env(store_url: str) -> dict[str, str]:
    return {"DATABASE_URL": store_url}


def raw_key_rows(url: str) -> list[tuple]:
    """Every column of every row of the key table, read with a connection of the test's own."""
    query = "SELECT * FROM api_keys ORDER BY name"
    if url.startswith("sqlite:///"):
        db = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            return db.execute(query).fetchall()
        finally:
            db.close()
    with psycopg.connect(url, connect_timeout=5) as connection:
        return connection.execute(query).fetchall()


async def http_ask(
    server: Server, secret: str | None, conversation: str, prompt: str
) -> httpx2.Response:
    async with server.client(headers=bearer(secret)) as client:
        return await client.post(f"/ask/{conversation}", json={"prompt": prompt})


# -- the fields and the store ---------------------------------------------------------------------


def test_the_fields_of_a_key_are_checked():
    changes = keys.key_changes(
        {"rpm": 60, "tokens_per_month": 10**12, "models": "a, b,a", "expires": "2027-01-01"}
    )
    midnight = datetime.datetime(2027, 1, 1, tzinfo=datetime.UTC).timestamp()
    assert changes == {
        "rpm": 60,
        "tokens_per_month": 10**12,
        "models": ("a", "b"),
        "expires_at": midnight,
    }
    assert keys.key_changes({"rpm": None, "models": None, "expires": None}) == {
        "rpm": None,
        "models": None,
        "expires_at": None,
    }
    assert keys.parse_expiry("2027-01-01T12:00:00+02:00") == midnight + 10 * 3600
    assert keys.parse_expiry("2027-01-01T12:00:00") == midnight + 12 * 3600  # no zone: UTC
    for bad in (
        {"rpm": 0},
        {"rpm": True},
        {"tpm": 2**31},
        {"tokens_per_day": "5"},
        {"models": []},
        {"models": ["a b"]},
        {"expires": "next year"},
        {"disabled": "yes"},
        {"secret": "mine"},
    ):
        with pytest.raises(InvalidInput):
            keys.key_changes(bad)


async def test_the_store_keeps_only_a_hash_and_gives_a_name_once(store_url: str):
    store = await open_url(store_url, STORE_SETTINGS)
    try:
        secret, record = await keys.create_key(store, "bot", {"rpm": 5, "models": ["m"]})
        assert secret.startswith("eb-") and len(secret) == 46
        rows = raw_key_rows(store_url)
        assert len(rows) == 1 and secret not in repr(rows)
        assert hashlib.sha256(secret.encode()).hexdigest() in rows[0]
        [listed] = await store.keys()
        assert listed == record and (listed.rpm, listed.models) == (5, ("m",))
        assert keys.key_status(listed, time.time()) == keys.ACTIVE
        view = keys.key_view(listed)
        assert secret not in json.dumps(view) and listed.secret_sha256 not in json.dumps(view)

        changed = await keys.update_key(store, "bot", {"rpm": None, "disabled": True})
        assert (changed.rpm, changed.disabled, changed.models) == (None, True, ("m",))
        assert keys.key_status(changed, time.time()) == keys.DISABLED
        with pytest.raises(NotFound):
            await keys.update_key(store, "nobody", {"rpm": 1})
        with pytest.raises(KeyConflict):
            await keys.create_key(store, "bot", {})
        with pytest.raises(KeyConflict):
            await keys.create_key(store, "alice", {}, reserved={"alice"})

        revoked = await keys.revoke_key(store, "bot")
        assert keys.key_status(revoked, time.time()) == keys.REVOKED
        again = await keys.revoke_key(store, "bot")
        assert again.revoked_at == revoked.revoked_at  # revoked once
        with pytest.raises(KeyConflict):
            await keys.update_key(store, "bot", {"disabled": False})
        with pytest.raises(KeyConflict):  # a revoked key's name is never given again
            await keys.create_key(store, "bot", {})
        with pytest.raises(InvalidInput):
            await keys.create_key(store, "no spaces", {})
    finally:
        await store.close()


async def test_the_copy_of_the_table_outlives_a_failed_read(tmp_path: Path, caplog):
    store = await open_url(f"sqlite:///{tmp_path / 'k.sqlite3'}", STORE_SETTINGS)
    copy = keys.KeyStore(store)
    secret, _ = await keys.create_key(store, "kept", {})
    await copy.load()
    assert copy.enabled and copy.find(secret)[0].name == "kept"
    assert copy.find(secret + "x") is None and copy.named("kept")[0].name == "kept"
    await store.close()
    with pytest.raises(StorageUnavailable):
        await copy.load()
    assert copy.find(secret)[0].name == "kept"  # the last read stays in force

    caplog.set_level(logging.INFO, logger="easybackend.keys")
    copy = keys.KeyStore(await open_url(f"sqlite:///{tmp_path / 'k.sqlite3'}", STORE_SETTINGS))
    async with trio.open_nursery() as nursery:
        await nursery.start(copy.refresh_forever)
        await copy.table.close()
        await wait_until(lambda: copy.failures >= 3, timeout=10 * keys.REFRESH_SECONDS)
        nursery.cancel_scope.cancel()
    assert sum("cannot read the key table" in r.getMessage() for r in caplog.records) == 1
    assert copy.find(secret)[0].name == "kept"


class _HeldReads:
    """A real store whose reads of the key table can be held back, one at a time."""

    def __init__(self, store) -> None:
        self.store = store
        self.hold: trio.Event | None = None
        self.held = trio.Event()

    async def keys(self):
        rows = await self.store.keys()  # read now...
        if self.hold is not None:
            hold, self.hold = self.hold, None
            self.held.set()
            await hold.wait()  # ...handed over later
        return rows


async def test_of_two_reads_of_the_table_the_later_one_is_kept(tmp_path: Path):
    store = await open_url(f"sqlite:///{tmp_path / 'k.sqlite3'}", STORE_SETTINGS)
    try:
        reads = _HeldReads(store)
        copy = keys.KeyStore(reads)
        release = reads.hold = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(copy.load)  # the refresh's read: before the key exists
            await reads.held.wait()
            secret, _ = await keys.create_key(store, "new", {})
            await copy.load()  # the read after the change ends first
            assert copy.find(secret) is not None
            release.set()  # the older read ends last: it must not win
        assert copy.find(secret) is not None
    finally:
        await store.close()


# -- the CLI ------------------------------------------------------------------------------------


async def test_the_cli_creates_lists_updates_and_revokes(tmp_path: Path, store_url: str):
    env = clean_env(DATABASE_URL=store_url, API_KEYS=f"alice:{ALICE}")

    async def cli(*args: str):
        return await run_cli(tmp_path, env, ["keys", *args])

    made = await cli("create", "bot", "--rpm", "60", "--models", "a,b", "--expires", "2030-01-01")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.decode().strip()  # alone on standard output
    assert secret.startswith("eb-") and "shown this once" in made.stderr.decode()
    made_json = await cli("create", "tool", "--tokens-per-day", "1000", "--json")
    shown = json.loads(made_json.stdout)
    assert set(shown) == {"secret", *KEY_FIELDS}
    assert shown["name"] == "tool" and shown["tokens_per_day"] == 1000 and shown["models"] is None

    listed = await cli("list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(k["name"], k["status"], k["rpm"], k["models"]) for k in json.loads(listed.stdout)] == [
        ("bot", "active", 60, ["a", "b"]),
        ("tool", "active", None, None),
    ]
    table = await cli("list")
    digests = [hashlib.sha256(s.encode()).hexdigest() for s in (secret, shown["secret"])]
    for output in (listed, table):
        text = output.stdout.decode() + output.stderr.decode()
        assert not any(s in text for s in (secret, shown["secret"], *digests))
    assert table.stdout.decode().splitlines()[1].split()[:2] == ["bot", "active"]

    changed = await cli("update", "bot", "--rpm", "none", "--models", "all", "--disable", "--json")
    view = json.loads(changed.stdout)
    assert (view["status"], view["rpm"], view["models"]) == ("disabled", None, None)
    assert view["expires_at"] == "2030-01-01T00:00:00Z"
    assert (
        json.loads((await cli("update", "bot", "--enable", "--json")).stdout)["status"] == "active"
    )
    revoked = await cli("revoke", "tool")
    assert revoked.returncode == 0 and "revoked" in revoked.stdout.decode()

    for args, says in (
        (("create", "bot"), "never given twice"),
        (("create", "alice"), "one of API_KEYS"),
        (("update", "tool", "--rpm", "5"), "revoked"),
        (("update", "nobody", "--rpm", "5"), "no key named 'nobody'"),
        (("update", "bot"), "nothing to change"),
        (("create", "x", "--expires", "soon"), "expires must be"),
    ):
        failed = await cli(*args)
        assert failed.returncode == 1, (args, failed.stdout)
        [line] = failed.stderr.decode().splitlines()
        assert line.startswith("easybackend: error: ") and says in line, line
    refused = await cli("create", "x", "--rpm", "0")
    assert refused.returncode == 2 and "--rpm" in refused.stderr.decode()  # argparse's own


# -- the admin API --------------------------------------------------------------------------------


async def test_the_admin_api_is_off_without_admin_key(start_server: StartServer):
    server = await start_server(API_KEYS=f"alice:{ALICE}")
    for key in (None, ALICE, ADMIN_KEY):
        response = await admin_call(server.http_url, "GET", "/admin/keys", key=key)
        assert response.status_code == 404 and error_code(response) == "not_found"
        assert "ADMIN_KEY" in response.json()["error"]["message"]


async def test_the_admin_api_takes_the_admin_key_only(start_server: StartServer):
    server = await start_server(API_KEYS=f"alice:{ALICE}", ADMIN_KEY=ADMIN_KEY)
    stored = await create_key(server.http_url, "stored")
    for key, status, code in (
        (None, 401, "unauthenticated"),
        ("wrong-SECRET-key", 401, "unauthenticated"),
        (ALICE, 403, "forbidden"),  # an API_KEYS key
        (stored, 403, "forbidden"),  # a stored key
    ):
        for method, path, body in (
            ("GET", "/admin/keys", None),
            ("POST", "/admin/keys", {"name": "sneaky"}),
            ("PATCH", "/admin/keys/stored", {"rpm": 1}),
            ("DELETE", "/admin/keys/stored", None),
        ):
            response = await admin_call(server.http_url, method, path, body, key=key)
            assert response.status_code == status, (key, method, response.text)
            assert error_code(response) == code
            if status == 401:
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
    listed = await admin_call(server.http_url, "GET", "/admin/keys")
    assert [k["name"] for k in listed.json()["keys"]] == ["stored"]  # nothing was changed
    assert (await http_ask(server, ADMIN_KEY, "a", "hi")).status_code == 401  # not an API key
    assert (await http_ask(server, stored, "a", "hi")).status_code == 200


async def test_the_admin_api_creates_changes_and_revokes(
    start_server: StartServer, database_env: dict[str, str]
):
    server = await start_server(API_KEYS=f"alice:{ALICE}", ADMIN_KEY=ADMIN_KEY, **database_env)
    url = server.http_url
    made = await admin_call(
        url,
        "POST",
        "/admin/keys",
        {
            "name": "bot",
            "rpm": 60,
            "tpm": 6000,
            "models": ["gpt-4.1-mini"],
            "expires": "2030-01-01",
        },
    )
    assert made.status_code == 201, made.text
    body = made.json()
    secret = body.pop("secret")
    assert body["name"] == "bot" and body["status"] == "active" and body["rpm"] == 60
    assert (body["tpm"], body["models"], body["expires_at"]) == (
        6000,
        ["gpt-4.1-mini"],
        "2030-01-01T00:00:00Z",
    )
    assert set(body) == KEY_FIELDS
    listed = await admin_call(url, "GET", "/admin/keys")
    assert listed.json() == {"keys": [body]} and secret not in listed.text
    assert (await http_ask(server, secret, "c", "hi")).status_code == 200  # at once, here

    changed = await admin_call(
        url, "PATCH", "/admin/keys/bot", {"rpm": None, "tokens_per_day": 100, "models": None}
    )
    assert changed.status_code == 200, changed.text
    view = changed.json()
    assert (view["rpm"], view["tpm"], view["tokens_per_day"], view["models"]) == (
        None,
        6000,
        100,
        None,
    )
    for method, path, payload, status, code in (
        ("POST", "/admin/keys", {"name": "bot"}, 409, "key_conflict"),
        ("POST", "/admin/keys", {"name": "alice"}, 409, "key_conflict"),  # one of API_KEYS
        ("POST", "/admin/keys", {"name": "bad name"}, 400, "invalid_input"),
        ("POST", "/admin/keys", {"name": "x", "rpm": 0}, 400, "invalid_input"),
        ("POST", "/admin/keys", {"name": "x", "secret": "mine"}, 400, "invalid_input"),
        ("POST", "/admin/keys", {"name": "x", "expires": "soon"}, 400, "invalid_input"),
        ("PATCH", "/admin/keys/nobody", {"rpm": 1}, 404, "not_found"),
        ("DELETE", "/admin/keys/nobody", None, 404, "not_found"),
    ):
        response = await admin_call(url, method, path, payload)
        assert (response.status_code, error_code(response)) == (status, code), response.text

    revoked = await admin_call(url, "DELETE", "/admin/keys/bot")
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    assert (await admin_call(url, "DELETE", "/admin/keys/bot")).json() == revoked.json()
    again = await admin_call(url, "PATCH", "/admin/keys/bot", {"rpm": 1})
    assert again.status_code == 409 and "revoked" in again.json()["error"]["message"]
    refused = await http_ask(server, secret, "c", "hi")
    assert refused.status_code == 401 and "revoked" in refused.json()["error"]["message"]
    assert secret not in refused.text


# -- stored keys on every protocol -----------------------------------------------------------------


async def test_a_stored_key_works_and_stops_on_every_protocol(
    start_server: StartServer, database_env: dict[str, str]
):
    server = await start_server(
        WS_PORT=str(free_port()),
        GRPC_PORT=str(free_port()),
        ADMIN_KEY=ADMIN_KEY,
        SHUTDOWN_GRACE="2",
        **database_env,
    )
    secret = await create_key(server.http_url, "bot")
    other = await create_key(server.http_url, "other")
    ws_port, grpc_port = server.running.ws_port, server.running.grpc_port

    assert (await http_ask(server, secret, "1", "one")).json()["response"] == echo(1, "one")
    # the key's name owns the conversation: another key's "1" is another conversation
    assert (await http_ask(server, other, "1", "mine")).json()["response"] == echo(1, "mine")
    async with server.client(headers=bearer(secret)) as client:
        streamed = await client.post("/ask/1/stream", json={"prompt": "two"})
        assert parse_sse(streamed.text)[-1][0] == "end"
        assert [
            c["conversation_id"]
            for c in (await client.get("/conversations")).json()["conversations"]
        ] == ["1"]
    headers = [(b"Authorization", f"Bearer {secret}".encode())]
    async with open_websocket_url(ws_url(ws_port), extra_headers=headers) as held:
        await held.send_message(
            json.dumps({"type": "ask", "conversation_id": "1", "prompt": "three"})
        )
        while json.loads(await held.get_message())["type"] != "end":
            pass
        async with open_websocket_url(ws_url(ws_port, f"/?api_key={secret}")) as text_ws:
            await text_ws.send_message("<|ask|>$1$four")
            assert (await original_frames(text_ws))[-1] == "<|end|>"
            *pieces, last = await rpc(
                server,
                "Ask",
                chat_pb2.AskRequest(conversation_id="1", prompt="five"),
                metadata=bearer(secret),
            )
            assert "".join(p.response for p in pieces) == echo(9, "five")
            answered = await grpc_ask(grpc_port, "1", "six", api_key=secret)
            assert answered.code == grpc.StatusCode.OK and answered.text == echo(11, "six")

            revoked = await admin_call(server.http_url, "DELETE", "/admin/keys/bot")
            assert revoked.status_code == 200
            before = len(server.fake.requests)

            # the sockets opened before the revocation: their next ask is refused
            await held.send_message(
                json.dumps({"type": "ask", "conversation_id": "1", "prompt": "seven"})
            )
            error = json.loads(await held.get_message())
            assert (error["type"], error["code"]) == ("error", "unauthenticated")
            await text_ws.send_message("<|ask|>$1$eight")
            assert (await original_frames(text_ws))[0] == "<|err|>$the API key is revoked"

    refused = await http_ask(server, secret, "1", "nine")
    assert refused.status_code == 401 and error_code(refused) == "unauthenticated"
    async with server.client(headers=bearer(secret)) as client:
        assert (await client.post("/ask/1/stream", json={"prompt": "x"})).status_code == 401
        assert (await client.get("/conversations")).status_code == 401
    with pytest.raises(HandshakeError) as handshake:
        async with open_websocket_url(ws_url(ws_port), extra_headers=headers):
            pass
    assert handshake.value.status_code == 401
    failure = await rpc_error(
        server, "Ask", chat_pb2.AskRequest(conversation_id="1", prompt="x"), metadata=bearer(secret)
    )
    assert status_of(failure) == (purerpc.StatusCode.UNAUTHENTICATED, "the API key is revoked")
    grpcio_refused = await grpc_ask(grpc_port, "1", "x", api_key=secret)
    assert grpcio_refused.code == grpc.StatusCode.UNAUTHENTICATED
    assert len(server.fake.requests) == before  # nothing reached the model
    assert (await http_ask(server, other, "1", "still")).status_code == 200  # the other key


def key_status_seen(server: Server, name: str) -> str | None:
    """The status of the stored key ``name`` in ``server``'s copy of the key table (None: none)."""
    assert server.running.service is not None
    found = server.running.service.keys.named(name)
    return keys.key_status(found[0], time.time()) if found is not None else None


async def openai_refusals(server: Server, secret: str) -> list[str]:
    """What each /v1 call of ``secret`` gives: "ok", or the message of its AuthenticationError."""
    model = server.settings.model
    messages = [{"role": "user", "content": "hi"}]
    said = []
    async with async_client(server, secret) as sdk:

        async def streamed() -> None:
            async for _ in await sdk.chat.completions.create(
                model=model, messages=messages, stream=True
            ):
                pass

        for call in (
            lambda: sdk.chat.completions.create(model=model, messages=messages),
            streamed,
            lambda: sdk.chat.completions.create(
                model=model, messages=messages, extra_body={"conversation": "v1"}
            ),
            lambda: sdk.responses.create(model=model, input="hi"),
            lambda: sdk.models.list(),
            lambda: sdk.models.retrieve(model),
        ):
            try:
                await call()
            except openai.AuthenticationError as exc:
                assert exc.type == "authentication_error" and secret not in exc.response.text
                said.append(exc.body["message"])
            else:
                said.append("ok")
    return said


async def test_a_stored_key_changed_in_the_table_stops_on_the_openai_api_within_5_seconds(
    start_server: StartServer, store_url: str
):
    """A key disabled or revoked behind the server's back (another instance, the CLI) is refused
    by /v1 once the server's own copy of the table is read again, within PROPAGATION."""
    server = await start_server(ADMIN_KEY=ADMIN_KEY, DATABASE_URL=store_url)
    by_api = await create_key(server.http_url, "by-api")
    store = await open_url(store_url, STORE_SETTINGS)
    try:
        in_store, _ = await keys.create_key(store, "in-store", {})
        await wait_until(lambda: key_status_seen(server, "in-store") == "active", PROPAGATION)
        for secret in (by_api, in_store):
            assert await openai_refusals(server, secret) == ["ok"] * 6
        asked = len(server.fake.requests)

        await keys.update_key(store, "by-api", {"disabled": True})
        await keys.revoke_key(store, "in-store")
        # only the server's refresh of its copy can carry these changes: wait_until fails the
        # test unless both arrive within PROPAGATION
        await wait_until(
            lambda: (
                (key_status_seen(server, "by-api"), key_status_seen(server, "in-store"))
                == ("disabled", "revoked")
            ),
            PROPAGATION,
        )
        assert await openai_refusals(server, by_api) == ["the API key is disabled"] * 6
        assert await openai_refusals(server, in_store) == ["the API key is revoked"] * 6
        assert len(server.fake.requests) == asked  # nothing reached the model

        await keys.update_key(store, "by-api", {"disabled": False})
        await wait_until(lambda: key_status_seen(server, "by-api") == "active", PROPAGATION)
        assert await openai_refusals(server, by_api) == ["ok"] * 6
    finally:
        await store.close()


async def test_disabled_and_expired_keys_stop_and_come_back(start_server: StartServer):
    server = await start_server(ADMIN_KEY=ADMIN_KEY)
    secret = await create_key(server.http_url, "bot")
    past = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)).date().isoformat()
    for change, says in (({"disabled": True}, "disabled"), ({"expires": past}, "expired")):
        response = await admin_call(server.http_url, "PATCH", "/admin/keys/bot", change)
        assert response.json()["status"] == says
        refused = await http_ask(server, secret, "d", "hi")
        assert refused.status_code == 401 and refused.json()["error"]["message"] == (
            f"the API key is {says}"
        )
        back = {"disabled": False} if "disabled" in change else {"expires": None}
        await admin_call(server.http_url, "PATCH", "/admin/keys/bot", back)
        assert (await http_ask(server, secret, "d", "hi")).status_code == 200


async def test_a_stored_key_turns_authentication_on(start_server: StartServer):
    server = await start_server(ADMIN_KEY=ADMIN_KEY)
    assert (await http_ask(server, None, "open", "hi")).status_code == 200
    secret = await create_key(server.http_url, "first")
    refused = await http_ask(server, None, "open", "hi")  # at once on the instance that made it
    assert refused.status_code == 401 and error_code(refused) == "unauthenticated"
    assert (await http_ask(server, secret, "open", "hi")).json()["response"] == echo(1, "hi")
    await admin_call(server.http_url, "DELETE", "/admin/keys/first")
    # revoking the last key does not open the server to everyone
    assert (await http_ask(server, None, "open", "hi")).status_code == 401


async def test_api_keys_work_beside_stored_keys_and_a_name_in_both(
    start_server: StartServer, tmp_path: Path, caplog
):
    caplog.set_level(logging.WARNING, logger="easybackend.keys")
    server = await start_server(API_KEYS=f"alice:{ALICE}", ADMIN_KEY=ADMIN_KEY)
    bob = await create_key(server.http_url, "bob")
    assert (await http_ask(server, ALICE, "1", "a")).json()["response"] == echo(1, "a")
    assert (await http_ask(server, bob, "1", "b")).json()["response"] == echo(1, "b")
    # a stored "alice" made where API_KEYS does not name it (the CLI's environment): both
    # secrets work, as the same owner
    made = await run_cli(
        tmp_path,
        clean_env(DATABASE_URL=server.settings.database_url),
        ["keys", "create", "alice", "--rpm", "5"],
    )
    assert made.returncode == 0, made.stderr
    stored_alice = made.stdout.decode().strip()
    await wait_for_status(server.http_url, stored_alice, 200)
    assert (await http_ask(server, stored_alice, "1", "c")).json()["response"] == echo(3, "c")
    assert (await http_ask(server, ALICE, "1", "d")).json()["response"] == echo(5, "d")
    warned = [
        r.getMessage()
        for r in caplog.records
        if "in API_KEYS and in the key table" in r.getMessage()
    ]
    assert len(warned) == 1 and "'alice'" in warned[0]


# -- reaching every instance within 5 seconds ------------------------------------------------------


async def test_cli_changes_reach_a_running_sqlite_server_within_5_seconds(
    start_server: StartServer, tmp_path: Path
):
    server = await start_server()
    env = clean_env(DATABASE_URL=server.settings.database_url)
    assert await models_status(server.http_url, None) == 200  # no keys yet: open
    made = await run_cli(tmp_path, env, ["keys", "create", "late"])
    assert made.returncode == 0, made.stderr
    secret = made.stdout.decode().strip()
    assert await wait_for_status(server.http_url, None, 401) < PROPAGATION  # keys are on now
    assert await wait_for_status(server.http_url, secret, 200) < PROPAGATION
    assert (await http_ask(server, secret, "s", "hi")).status_code == 200
    assert (await run_cli(tmp_path, env, ["keys", "update", "late", "--disable"])).returncode == 0
    assert await wait_for_status(server.http_url, secret, 401) < PROPAGATION
    assert (await run_cli(tmp_path, env, ["keys", "update", "late", "--enable"])).returncode == 0
    assert await wait_for_status(server.http_url, secret, 200) < PROPAGATION
    assert (await run_cli(tmp_path, env, ["keys", "revoke", "late"])).returncode == 0
    assert await wait_for_status(server.http_url, secret, 401) < PROPAGATION
    assert (await http_ask(server, secret, "s", "hi")).status_code == 401


@pytest.fixture
async def two_instances(fake, tmp_path: Path, pg_schema: str) -> AsyncIterator[list[str]]:
    """Two ``python run.py`` processes on one PostgreSQL schema (both with ADMIN_KEY); their
    base URLs. Killed at teardown."""
    processes: list[ServerProcess] = []
    urls: list[str] = []
    try:
        for name in ("a", "b"):
            port = free_port()
            workdir = tmp_path / name
            workdir.mkdir()
            env = clean_env(
                OPENAI_API_KEY=UPSTREAM_KEY,
                OPENAI_BASE_URL=fake.base_url(),
                HOST="127.0.0.1",
                HTTP_PORT=str(port),
                GRPC_PORT="off",
                WS_PORT="off",
                DATABASE_URL=pg_url(pg_schema),
                UPSTREAM_RETRIES="0",
                ADMIN_KEY=ADMIN_KEY,
            )
            process = ServerProcess(workdir, env)
            processes.append(process)
            await process.start()
            await process.wait_healthy(port)
            urls.append(f"http://127.0.0.1:{port}")
        yield urls
    finally:
        for process in processes:
            if process.process is not None and process.process.returncode is None:
                await process.kill()
        for process in processes:
            assert UPSTREAM_KEY not in process.output and ADMIN_KEY not in process.output


async def test_two_instances_on_postgresql_see_a_change_on_either_within_5_seconds(
    two_instances: list[str], tmp_path: Path, pg_schema: str
):
    a, b = two_instances
    secret = await create_key(a, "shared")
    assert await wait_for_status(b, None, 401) < PROPAGATION  # b requires keys now
    assert await wait_for_status(b, secret, 200) < PROPAGATION  # and takes the new one
    async with httpx2.AsyncClient(base_url=b, timeout=10, headers=bearer(secret)) as client:
        answered = await client.post("/ask/x", json={"prompt": "on b"})
    assert answered.status_code == 200 and answered.json()["response"] == echo(1, "on b")

    changed = await admin_call(b, "PATCH", "/admin/keys/shared", {"disabled": True})
    assert changed.status_code == 200
    assert await wait_for_status(a, secret, 401) < PROPAGATION
    await admin_call(a, "PATCH", "/admin/keys/shared", {"disabled": False})
    assert await wait_for_status(b, secret, 200) < PROPAGATION

    revoked = await admin_call(a, "DELETE", "/admin/keys/shared")
    assert revoked.status_code == 200
    assert await wait_for_status(b, secret, 401) < PROPAGATION
    # and the CLI on the same database, as the servers run
    made = await run_cli(
        tmp_path, clean_env(DATABASE_URL=pg_url(pg_schema)), ["keys", "create", "from-cli"]
    )
    assert made.returncode == 0, made.stderr
    cli_secret = made.stdout.decode().strip()
    for url in (a, b):
        assert await wait_for_status(url, cli_secret, 200) < PROPAGATION


# -- secrets stay secret --------------------------------------------------------------------------


async def test_a_secret_reaches_no_log_line_no_metric_and_no_error(
    start_server: StartServer, caplog
):
    caplog.set_level(logging.INFO)  # what a server logs; its own loggers down to DEBUG
    caplog.set_level(logging.DEBUG, logger="easybackend")
    server = await start_server(
        WS_PORT=str(free_port()), GRPC_PORT=str(free_port()), ADMIN_KEY=ADMIN_KEY
    )
    made = await admin_call(server.http_url, "POST", "/admin/keys", {"name": "quiet"})
    secret = made.json()["secret"]
    digest = hashlib.sha256(secret.encode()).hexdigest()
    seen: list[str] = []
    seen.append((await http_ask(server, secret, "q", "hi")).text)
    seen.append((await http_ask(server, secret + "x", "q", "hi")).text)  # a near miss
    await admin_call(server.http_url, "PATCH", "/admin/keys/quiet", {"disabled": True})
    seen.append((await http_ask(server, secret, "q", "hi")).text)
    for presented in (secret, secret[:-1]):
        with pytest.raises(HandshakeError) as refused:
            async with open_websocket_url(ws_url(server.running.ws_port, f"/?api_key={presented}")):
                pass
        seen.append(refused.value.body.decode())
        failure = await rpc_error(
            server,
            "Ask",
            chat_pb2.AskRequest(conversation_id="q", prompt="x"),
            metadata=bearer(presented),
        )
        seen.append(status_of(failure)[1])
    seen.append((await admin_call(server.http_url, "POST", "/admin/keys", {"name": "quiet"})).text)
    seen.append((await admin_call(server.http_url, "GET", "/admin/keys")).text)
    seen.append((await admin_call(server.http_url, "GET", "/admin/keys", key=secret)).text)
    async with server.client() as client:
        seen.append(await scrape(client))
    assert "the API key is disabled" in seen[2]  # the refusals did happen
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert caplog.records and "quiet" in "".join(seen)
    for text in [*seen, logged]:
        assert secret not in text and secret[:-1] not in text and digest not in text


async def test_schemathesis_finds_nothing_wrong_in_the_admin_api(start_server: StartServer):
    """The admin routes fuzzed with the admin key: every status and body as documented, no 500."""
    server = await start_server(ADMIN_KEY=ADMIN_KEY, API_KEYS=f"alice:{ALICE}")
    await run_schemathesis(
        server.http_url, ADMIN_KEY, max_examples=30, seed=20261201, paths="^/(admin|models)"
    )
    listed = await admin_call(server.http_url, "GET", "/admin/keys")
    assert listed.status_code == 200 and listed.json()["keys"]  # the fuzzer did make keys
    assert (await http_ask(server, ALICE, "after", "still there?")).status_code == 200
