"""The model allow-list (SPEC §14, ``MODELS``): a model outside it, or outside its key's own list,
is refused on every protocol before anything reaches the model; an alias calls its provider
model, which the turn records; ``GET /models`` lists what the caller may name.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import openai
import purerpc
import pytest
from helpers.grpc import grpcio_stream, rpc, rpc_error, status_of
from helpers.http import bearer, error_code, parse_sse
from helpers.keys import ADMIN_KEY, admin_call, create_key
from helpers.logs import metric
from helpers.openai_sdk import async_client
from helpers.postgres import pg_url
from helpers.servers import Server, StartServer, free_port
from helpers.websocket import original_frames, ws_url
from trio_websocket import open_websocket_url

from easybackend.errors import ModelNotAllowed
from easybackend.governance.models import ModelEntry, ModelList, parse_models
from easybackend.proto_gen import chat_pb2
from easybackend.settings import DEFAULT_MODEL, ConfigError, load_settings

ENV_KEY = "env-SECRET-4242"
THREE = f"{DEFAULT_MODEL},other-model,fast=fake-fast-model"


@pytest.fixture(params=["sqlite", "postgres"])
def database_env(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """DATABASE_URL for a fresh SQLite file (the default) or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield {}
        return
    yield {"DATABASE_URL": pg_url(request.getfixturevalue("pg_schema"))}


def asks_refused(server: Server, protocol: str) -> float:
    text = server.running.service.metrics.render().decode()
    return metric(text, "easybackend_asks_total", protocol=protocol, outcome="model_not_allowed")


async def ws_json(port: int, secret: str | None, *messages: dict) -> list[dict]:
    """Send JSON asks on one socket; each one's final reply (its end or its error)."""
    headers = [(b"Authorization", f"Bearer {secret}".encode())] if secret else None
    finals = []
    async with open_websocket_url(ws_url(port), extra_headers=headers) as ws:
        for message in messages:
            await ws.send_message(json.dumps(message))
            while True:
                reply = json.loads(await ws.get_message())
                if reply["type"] in ("end", "error"):
                    finals.append(reply)
                    break
    return finals


# -- the list itself ------------------------------------------------------------------------------


def test_models_are_names_and_aliases():
    assert parse_models(" gpt-4.1-mini , fast = gpt-4.1-nano,, openai/gpt-4o ") == (
        ModelEntry("gpt-4.1-mini", "gpt-4.1-mini"),
        ModelEntry("fast", "gpt-4.1-nano"),
        ModelEntry("openai/gpt-4o", "openai/gpt-4o"),
    )
    assert parse_models("") == ()
    for bad in ("a,a", "fast=x,fast", "a b", "=x", "x=", "a=b=c"):
        with pytest.raises(ValueError):
            parse_models(bad)


def test_settings_need_gpt_engine_in_the_list():
    def load(**env: str):
        return load_settings({"OPENAI_API_KEY": "x", **env}, environ={}, env_file=None)

    assert load().models == ()  # unset: GPT_ENGINE alone
    assert load(MODELS=f"{DEFAULT_MODEL},b").models[1] == ModelEntry("b", "b")
    assert load(GPT_ENGINE="fast", MODELS="fast=provider-x").models  # as an alias's name
    assert load(GPT_ENGINE="provider-x", MODELS="fast=provider-x").models  # as its model
    with pytest.raises(ConfigError, match="GPT_ENGINE .* must be in MODELS"):
        load(MODELS="other-model")
    with pytest.raises(ConfigError, match="^MODELS='a,a' must name each model once"):
        load(MODELS="a,a", GPT_ENGINE="a")


def test_choosing_a_model():
    models = ModelList(parse_models(THREE), DEFAULT_MODEL)
    assert models.choose(None, None) == DEFAULT_MODEL
    assert models.choose("fast", None) == "fake-fast-model"  # an alias: its provider model
    with pytest.raises(ModelNotAllowed, match="'o1-pro' is not allowed here; allowed: "):
        models.choose("o1-pro", None)
    with pytest.raises(ModelNotAllowed):
        models.choose("fake-fast-model", None)  # a provider model is not a name of the list
    # a key's own list, matched by provider model
    assert models.choose("other-model", ("other-model",)) == "other-model"
    assert models.choose("fast", ("fake-fast-model",)) == "fake-fast-model"
    with pytest.raises(ModelNotAllowed, match="this key may not use the model 'fast'"):
        models.choose("fast", ("other-model",))
    # no model named: GPT_ENGINE, else the key's first model that the list holds
    assert models.choose(None, ("unknown", "fast", "other-model")) == "fake-fast-model"
    with pytest.raises(ModelNotAllowed, match="may use none of this server's models"):
        models.choose(None, ("unknown",))
    assert [e.name for e in models.allowed(("fast", "unknown"))] == ["fast"]
    assert ModelList((), DEFAULT_MODEL).entries == (ModelEntry(DEFAULT_MODEL, DEFAULT_MODEL),)


# -- every protocol ----------------------------------------------------------------------------


async def test_a_model_outside_the_list_is_refused_on_every_protocol_before_the_model(
    start_server: StartServer,
):
    server = await start_server(WS_PORT=str(free_port()), GRPC_PORT=str(free_port()))
    refused = {"prompt": "hi", "model": "o1-pro"}
    async with server.client() as client:
        allowed = await client.post("/ask/m1", json={"prompt": "hi", "model": DEFAULT_MODEL})
        assert allowed.status_code == 200, allowed.text
        turn_id = allowed.json()["turn_id"]
        before = len(server.fake.requests)
        whole = await client.post("/ask/m1", json=refused)
        stream = await client.post("/ask/m1/stream", json=refused)
        regenerate = await client.post(
            f"/conversations/m1/turns/{turn_id}/regenerate/stream", json={"model": "o1-pro"}
        )
    for response in (whole, stream, regenerate):
        assert response.status_code == 403, response.text
        assert error_code(response) == "model_not_allowed"
        assert "'o1-pro' is not allowed" in response.json()["error"]["message"]

    [error] = await ws_json(
        server.running.ws_port, None, {"type": "ask", "conversation_id": "m1", **refused}
    )
    assert (error["type"], error["code"]) == ("error", "model_not_allowed")

    request = chat_pb2.AskRequest(conversation_id="m1", prompt="hi", model="o1-pro")
    failure = await rpc_error(server, "Ask", request)
    assert status_of(failure)[0] == purerpc.StatusCode.PERMISSION_DENIED
    assert "'o1-pro' is not allowed" in status_of(failure)[1]
    streamed = await grpcio_stream(server.running.grpc_port, "Ask", request)
    assert streamed.code == grpc.StatusCode.PERMISSION_DENIED and not streamed.replies
    regenerated = await grpcio_stream(
        server.running.grpc_port,
        "Regenerate",
        chat_pb2.RegenerateRequest(conversation_id="m1", turn_id=turn_id, model="o1-pro"),
    )
    assert regenerated.code == grpc.StatusCode.PERMISSION_DENIED

    assert len(server.fake.requests) == before  # none reached the model
    assert asks_refused(server, "http") == 1
    assert asks_refused(server, "sse") == 2
    assert asks_refused(server, "ws") == 1
    assert asks_refused(server, "grpc") == 3


async def test_an_alias_calls_its_provider_model_which_the_turn_records(start_server: StartServer):
    server = await start_server(WS_PORT=str(free_port()), GRPC_PORT=str(free_port()), MODELS=THREE)
    async with server.client() as client:
        whole = await client.post("/ask/alias", json={"prompt": "one", "model": "fast"})
        assert whole.status_code == 200, whole.text
        assert server.fake.requests[-1]["body"]["model"] == "fake-fast-model"
        assert whole.json()["model"] == "fake-fast-model"
        stream = await client.post("/ask/alias/stream", json={"prompt": "two", "model": "fast"})
        assert parse_sse(stream.text)[-1][1]["model"] == "fake-fast-model"
        other = await client.post("/ask/alias", json={"prompt": "three", "model": "other-model"})
        assert other.json()["model"] == "other-model"
        direct = await client.post("/ask/alias", json={"prompt": "x", "model": "fake-fast-model"})
        assert direct.status_code == 403  # an alias's provider model is not itself a name
        assert (await client.post("/ask/alias", json={"prompt": "four"})).json()["model"] == (
            DEFAULT_MODEL
        )
    [end] = await ws_json(
        server.running.ws_port,
        None,
        {"type": "ask", "conversation_id": "alias", "prompt": "five", "model": "fast"},
    )
    assert end["model"] == "fake-fast-model"
    *_, last = await rpc(
        server, "Ask", chat_pb2.AskRequest(conversation_id="alias", prompt="six", model="fast")
    )
    assert last.model == "fake-fast-model"
    assert server.fake.requests[-1]["body"]["model"] == "fake-fast-model"
    async with server.client() as client:
        history = (await client.get("/conversations/alias")).json()["history"]
    assert [turn["model"] for turn in history] == [
        "fake-fast-model",
        "fake-fast-model",
        "other-model",
        DEFAULT_MODEL,
        "fake-fast-model",
        "fake-fast-model",
    ]


async def test_gpt_engine_may_be_an_alias(start_server: StartServer):
    server = await start_server(GPT_ENGINE="fast", MODELS="fast=fake-fast-model")
    async with server.client() as client:
        answer = await client.post("/ask/default", json={"prompt": "hi"})
        models = (await client.get("/models")).json()
    assert answer.json()["model"] == "fake-fast-model"
    assert server.fake.requests[-1]["body"]["model"] == "fake-fast-model"
    assert models == {"default": "fast", "models": [{"name": "fast", "model": "fake-fast-model"}]}


async def test_a_keys_own_models_narrow_the_list_on_every_protocol(
    start_server: StartServer, database_env: dict[str, str]
):
    server = await start_server(
        WS_PORT=str(free_port()),
        GRPC_PORT=str(free_port()),
        MODELS=THREE,
        ADMIN_KEY=ADMIN_KEY,
        API_KEYS=f"env:{ENV_KEY}",
        **database_env,
    )
    narrow = await create_key(server.http_url, "narrow", models=["other-model", "unknown"])
    nothing = await create_key(server.http_url, "nothing", models=["not-served-here"])
    before = len(server.fake.requests)
    async with server.client(headers=bearer(narrow)) as client:
        refused = await client.post("/ask/k", json={"prompt": "hi", "model": "fast"})
        assert refused.status_code == 403 and error_code(refused) == "model_not_allowed"
        assert (
            "this key may not use the model 'fast'; it may use: other-model"
            in (refused.json()["error"]["message"])
        )
        listed = (await client.get("/models")).json()
        assert listed == {
            "default": "other-model",
            "models": [{"name": "other-model", "model": "other-model"}],
        }
        assert len(server.fake.requests) == before
        # naming no model: GPT_ENGINE is not among the key's models, so its first one that is
        answered = await client.post("/ask/k", json={"prompt": "hi"})
        assert answered.status_code == 200 and answered.json()["model"] == "other-model"
        assert server.fake.requests[-1]["body"]["model"] == "other-model"
    async with server.client(headers=bearer(ENV_KEY)) as client:  # API_KEYS: every model
        listed = (await client.get("/models")).json()
    assert listed["default"] == DEFAULT_MODEL
    assert [m["name"] for m in listed["models"]] == [DEFAULT_MODEL, "other-model", "fast"]

    port = server.running.ws_port
    refused_ws, answered_ws = await ws_json(
        port,
        narrow,
        {"type": "ask", "conversation_id": "k", "prompt": "hi", "model": "fast"},
        {"type": "ask", "conversation_id": "k", "prompt": "hi", "model": "other-model"},
    )
    assert (refused_ws["type"], refused_ws["code"]) == ("error", "model_not_allowed")
    assert answered_ws["type"] == "end"
    # the original text protocol names no model: the key's first, or <|err|>$ if it has none
    async with open_websocket_url(ws_url(port, f"/?api_key={nothing}")) as ws:
        await ws.send_message("<|ask|>$k$hello")
        [failed] = await original_frames(ws)
    assert failed.startswith("<|err|>$this key may use none of this server's models")
    async with open_websocket_url(ws_url(port, f"/?api_key={narrow}")) as ws:
        await ws.send_message("<|ask|>$k-text$hello")
        frames = await original_frames(ws)
    assert frames[-1] == "<|end|>"
    assert server.fake.requests[-1]["body"]["model"] == "other-model"

    metadata = bearer(narrow)
    request = chat_pb2.AskRequest(conversation_id="k", prompt="hi", model="fast")
    failure = await rpc_error(server, "Ask", request, metadata=metadata)
    assert status_of(failure)[0] == purerpc.StatusCode.PERMISSION_DENIED
    streamed = await grpcio_stream(server.running.grpc_port, "Ask", request, api_key=narrow)
    assert streamed.code == grpc.StatusCode.PERMISSION_DENIED
    empty = chat_pb2.AskRequest(conversation_id="k-none", prompt="hi")
    failure = await rpc_error(server, "Ask", empty, metadata=bearer(nothing))
    assert status_of(failure)[0] == purerpc.StatusCode.PERMISSION_DENIED


async def test_a_change_of_a_keys_models_applies_to_its_open_websocket(start_server: StartServer):
    server = await start_server(WS_PORT=str(free_port()), MODELS=THREE, ADMIN_KEY=ADMIN_KEY)
    secret = await create_key(server.http_url, "changing", models=["fast"])
    ask = {"type": "ask", "conversation_id": "c", "prompt": "hi", "model": "other-model"}
    headers = [(b"Authorization", f"Bearer {secret}".encode())]
    async with open_websocket_url(ws_url(server.running.ws_port), extra_headers=headers) as ws:

        async def final() -> dict:
            await ws.send_message(json.dumps(ask))
            while (reply := json.loads(await ws.get_message()))["type"] not in ("end", "error"):
                pass
            return reply

        assert (await final())["code"] == "model_not_allowed"
        change = await admin_call(
            server.http_url, "PATCH", "/admin/keys/changing", {"models": ["other-model"]}
        )
        assert change.status_code == 200, change.text
        assert (await final())["type"] == "end"  # the same connection, the key's new list
        async with server.client(headers=bearer(secret)) as client:
            assert (await client.get("/models")).json()["default"] == "other-model"


async def test_models_lists_gpt_engine_alone_by_default_and_is_documented(server: Server):
    async with server.client() as client:
        listed = await client.get("/models")
        spec = (await client.get("/openapi.json")).json()
    assert listed.status_code == 200
    assert listed.json() == {
        "default": DEFAULT_MODEL,
        "models": [{"name": DEFAULT_MODEL, "model": DEFAULT_MODEL}],
    }
    assert "/models" in spec["paths"]
    assert 403 in map(int, spec["paths"]["/ask/{conversation_id}"]["post"]["responses"])


async def test_models_needs_a_key_when_keys_are_on(start_server: StartServer):
    server = await start_server(API_KEYS=f"env:{ENV_KEY}")
    async with server.client() as client:
        assert (await client.get("/models")).status_code == 401
        assert (await client.get("/models", headers=bearer(ENV_KEY))).status_code == 200


async def test_the_openai_api_refuses_and_lists_by_the_same_lists(start_server: StartServer):
    server = await start_server(MODELS=THREE, ADMIN_KEY=ADMIN_KEY)
    narrow = await create_key(server.http_url, "narrow", models=["fast", "other-model"])
    messages = [{"role": "user", "content": "hi"}]
    before = len(server.fake.requests)
    async with async_client(server, narrow) as client:
        for call in (
            lambda: client.chat.completions.create(model=DEFAULT_MODEL, messages=messages),
            lambda: client.chat.completions.create(
                model=DEFAULT_MODEL, messages=messages, stream=True
            ),
            lambda: client.chat.completions.create(
                model="o1-pro", messages=messages, extra_body={"conversation": "v1"}
            ),
            lambda: client.responses.create(model="o1-pro", input="hi"),
        ):
            with pytest.raises(openai.PermissionDeniedError) as refused:
                await call()
            assert refused.value.status_code == 403
            assert refused.value.body["code"] == "model_not_allowed"
            assert refused.value.body["param"] == "model"
        assert len(server.fake.requests) == before  # none reached the model
        listed = await client.models.list()
        # the key's default first (its first model MODELS holds), then MODELS' order
        assert [m.id for m in listed.data] == ["fast", "other-model"]
        relayed = await client.chat.completions.create(model="fast", messages=messages)
        assert server.fake.requests[-1]["body"]["model"] == "fake-fast-model"  # the alias's
        assert relayed.choices[0].message.content == "echo(1): hi"
        # naming none: the key's first model MODELS holds, as on every protocol
        await client.chat.completions.create(
            model=None,
            messages=messages,
            extra_body={"conversation": "v1"},  # type: ignore[arg-type]
        )
        assert server.fake.requests[-1]["body"]["model"] == "fake-fast-model"
