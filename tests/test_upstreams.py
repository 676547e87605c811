"""Several upstreams from a configuration file (SPEC §16): routing, key pools, failover, proxies."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx2
import pytest
import trio
from helpers.http import error_code
from helpers.proxies import ConnectProxy, Socks5Proxy
from helpers.servers import clean_env, free_port, run_cli
from helpers.upstream import UPSTREAM_KEY, queue_faults

from easybackend.fake_upstream import FakeUpstream

OTHER_KEY = "sk-other-upstream-key-0002"
BAD_KEY = "sk-rejected-upstream-key-0001"


async def started_fake(nursery: trio.Nursery, api_key: str | None = UPSTREAM_KEY) -> FakeUpstream:
    fake = FakeUpstream(api_key=api_key)
    await nursery.start(fake.serve)
    return fake


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "upstreams.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def table(name: str, base_url: str, keys: list[str], models: list[str], **extra: object) -> str:
    lines = [
        "[[upstream]]",
        f'name = "{name}"',
        f'base_url = "{base_url}"',
        "api_keys = [" + ", ".join(f'"{key}"' for key in keys) + "]",
        "models = [" + ", ".join(f'"{model}"' for model in models) + "]",
    ]
    lines += [f"{field} = {value!r}".replace("'", '"') for field, value in extra.items()]
    return "\n".join(lines) + "\n"


def down_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there


async def chat(server, model: str, text: str = "hi") -> httpx2.Response:
    async with server.client(trust_env=False) as client:
        with trio.fail_after(20):
            return await client.post(
                "/v1/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": text}]},
            )


def models_asked(fake: FakeUpstream) -> list[str]:
    return [request["body"]["model"] for request in fake.requests]


# -- start-up ------------------------------------------------------------------------------------

GOOD = table("main", "http://127.0.0.1:9/v1", ["sk-a"], ["m"])
BAD_FILES = {
    "not toml": ("[[upstream]\nname=", "not valid TOML"),
    "no table": ("title = 1\n", "unknown top-level key"),
    "no name": (GOOD.replace('name = "main"\n', ""), "#1: name is missing"),
    "no models": (GOOD.replace('models = ["m"]\n', ""), '"main": models is missing'),
    "keys not a list": (GOOD.replace('["sk-a"]', '"sk-a"'), '"main": api_keys must be'),
    "unset variable": (GOOD.replace("sk-a", "${NOT_SET_ANYWHERE}"), "${NOT_SET_ANYWHERE}"),
    "bad weight": (GOOD + "weight = -1\n", '"main": weight must be'),
    "bad proxy": (GOOD + 'proxy = "ftp://x"\n', '"main": proxy must'),
    "bad kind": (GOOD + 'kind = "bedrock"\n', '"main": kind must'),
    "azure without version": (GOOD + 'kind = "azure"\n', "api_version is missing"),
    "unknown field": (GOOD + "colour = 1\n", '"main": colour is not a known field'),
    "bad url": (GOOD.replace("http://127.0.0.1:9/v1", "127.0.0.1"), "base_url must"),
    "same name twice": (GOOD + GOOD.replace("sk-a", "sk-b"), '#2 "main": name is already'),
    "second table bad": (
        GOOD + table("second", "http://h/v1", ["k"], ["m"], max_concurrency=0),
        '#2 "second": max_concurrency must',
    ),
}


async def test_a_bad_configuration_file_stops_start_up_with_one_line(tmp_path):
    results = {}

    async def run(name: str, text: str) -> None:
        workdir = tmp_path / name.replace(" ", "-")
        workdir.mkdir()
        (workdir / "upstreams.toml").write_text(text, encoding="utf-8")
        env = clean_env(HOST="127.0.0.1", GRPC_PORT="off", WS_PORT="off")
        results[name] = await run_cli(workdir, env, ["--config", "upstreams.toml"])

    at_once = trio.Semaphore(4)

    async def limited(name: str, text: str) -> None:
        async with at_once:
            await run(name, text)

    async with trio.open_nursery() as nursery:
        for name, (text, _) in BAD_FILES.items():
            nursery.start_soon(limited, name, text)

    for name, (_, mentions) in BAD_FILES.items():
        result = results[name]
        assert result.returncode != 0, name
        stderr = result.stderr.decode()
        lines = stderr.splitlines()
        assert len(lines) == 1, (name, stderr)
        assert lines[0].startswith("easybackend: error: CONFIG_FILE"), (name, stderr)
        assert mentions in lines[0], (name, stderr)
        assert "Traceback" not in stderr
    assert "sk-a" not in results["unknown field"].stderr.decode()


async def test_a_missing_configuration_file_is_named(tmp_path):
    env = clean_env(HOST="127.0.0.1", CONFIG_FILE=str(tmp_path / "nope.toml"))
    result = await run_cli(tmp_path, env)
    assert result.returncode != 0
    assert "nope.toml cannot be read" in result.stderr.decode()


async def test_with_a_file_no_openai_api_key_is_needed_and_keys_come_from_the_environment(
    nursery, start_server, tmp_path
):
    fake = await started_fake(nursery, OTHER_KEY)
    config = write_config(tmp_path, table("one", fake.base_url(), ["${THE_KEY}"], ["gpt-4.1-mini"]))
    server = await start_server(CONFIG_FILE=config, OPENAI_API_KEY="", THE_KEY=OTHER_KEY)
    response = await chat(server, "gpt-4.1-mini")
    assert response.status_code == 200, response.text
    assert fake.requests[0]["headers"]["authorization"] == f"Bearer {OTHER_KEY}"
    assert server.fake.requests == []  # OPENAI_BASE_URL's is not used with a file


# -- routing -------------------------------------------------------------------------------------


async def test_each_model_goes_to_the_upstream_that_serves_it(nursery, start_server, tmp_path):
    first, second = await started_fake(nursery), await started_fake(nursery)
    config = write_config(
        tmp_path,
        table("first", first.base_url(), [UPSTREAM_KEY], ["gpt-4.1-mini"])
        + table("second", second.base_url(), [UPSTREAM_KEY], ["deepseek-chat"]),
    )
    server = await start_server(CONFIG_FILE=config, MODELS="gpt-4.1-mini,deepseek-chat")
    for model in ("deepseek-chat", "gpt-4.1-mini", "deepseek-chat"):
        response = await chat(server, model)
        assert response.status_code == 200, response.text
    assert models_asked(first) == ["gpt-4.1-mini"]
    assert models_asked(second) == ["deepseek-chat", "deepseek-chat"]


async def test_a_model_no_upstream_serves_is_upstream_unavailable(nursery, start_server, tmp_path):
    fake = await started_fake(nursery)
    config = write_config(tmp_path, table("only", fake.base_url(), [UPSTREAM_KEY], ["other"]))
    server = await start_server(CONFIG_FILE=config)
    response = await chat(server, "gpt-4.1-mini")
    assert response.status_code == 502, response.text
    assert "no upstream serves the model gpt-4.1-mini" in response.text
    assert fake.requests == []


async def test_answers_in_progress_and_weights_share_the_load(nursery, start_server, tmp_path):
    first, second = await started_fake(nursery), await started_fake(nursery)
    config = write_config(
        tmp_path,
        table("first", first.base_url(), [UPSTREAM_KEY], ["gpt-4.1-mini"])
        + table("second", second.base_url(), [UPSTREAM_KEY], ["gpt-4.1-mini"], weight=3),
    )
    server = await start_server(CONFIG_FILE=config)
    await queue_faults(first, *[{"delay": 0.3}] * 8)
    await queue_faults(second, *[{"delay": 0.3}] * 8)
    async with trio.open_nursery() as asks:
        for _ in range(8):
            asks.start_soon(chat, server, "gpt-4.1-mini")
    assert len(first.requests) + len(second.requests) == 8
    assert len(second.requests) == 6 and len(first.requests) == 2  # 3 to 1, by weight


# -- failover and cool-down ----------------------------------------------------------------------


async def test_an_upstream_that_is_down_fails_over_to_the_next(nursery, start_server, tmp_path):
    fake = await started_fake(nursery)
    config = write_config(
        tmp_path,
        table("down", down_url(), [UPSTREAM_KEY], ["gpt-4.1-mini"])
        + table("up", fake.base_url(), [UPSTREAM_KEY], ["gpt-4.1-mini"]),
    )
    server = await start_server(CONFIG_FILE=config, UPSTREAM_RETRIES="2")
    for index in range(3):
        response = await chat(server, "gpt-4.1-mini", f"ask {index}")
        assert response.status_code == 200, response.text
    assert len(fake.requests) == 3


async def test_a_429_fails_over_and_the_key_cools_down_for_its_retry_after(
    nursery, start_server, tmp_path
):
    limited, other = await started_fake(nursery), await started_fake(nursery)
    config = write_config(
        tmp_path,
        table("limited", limited.base_url(), [UPSTREAM_KEY], ["gpt-4.1-mini"])
        + table("other", other.base_url(), [UPSTREAM_KEY], ["gpt-4.1-mini"]),
    )
    server = await start_server(CONFIG_FILE=config, UPSTREAM_RETRIES="1")
    await queue_faults(limited, {"status": 429, "retry_after": 30})
    for _ in range(3):
        response = await chat(server, "gpt-4.1-mini")
        assert response.status_code == 200, response.text
    assert len(limited.requests) == 1  # the 429; then cooling for 30 s
    assert len(other.requests) == 3


async def test_a_rejected_key_is_taken_out_and_logged_once_without_the_key(
    nursery, start_server, tmp_path, caplog
):
    fake = await started_fake(nursery, OTHER_KEY)
    config = write_config(
        tmp_path, table("pool", fake.base_url(), [BAD_KEY, OTHER_KEY], ["gpt-4.1-mini"])
    )
    server = await start_server(CONFIG_FILE=config, UPSTREAM_RETRIES="1")
    with caplog.at_level(logging.INFO):
        for _ in range(4):
            response = await chat(server, "gpt-4.1-mini")
            assert response.status_code == 200, response.text
    used = [request["headers"]["authorization"] for request in fake.requests]
    assert used == [f"Bearer {BAD_KEY}"] + [f"Bearer {OTHER_KEY}"] * 4
    rejected = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert rejected == [
        "upstream pool key #1 was rejected by the provider (401/403): not used again until restart"
    ]
    assert not any(BAD_KEY in r.getMessage() or OTHER_KEY in r.getMessage() for r in caplog.records)


async def test_two_keys_of_one_upstream_share_its_load(nursery, start_server, tmp_path):
    fake = await started_fake(nursery, api_key=None)
    config = write_config(
        tmp_path, table("pool", fake.base_url(), ["sk-key-one-1111", "sk-key-two-2222"], ["m"])
    )
    server = await start_server(CONFIG_FILE=config, GPT_ENGINE="m")
    for _ in range(4):
        response = await chat(server, "m")
        assert response.status_code == 200, response.text
    used = [request["headers"]["authorization"][-4:] for request in fake.requests]
    assert used == ["1111", "2222", "1111", "2222"]
    listed = server.running.service.upstream.router.describe()
    assert listed[0]["keys"] == [
        {"key": "#1 …1111", "state": "ready"},
        {"key": "#2 …2222", "state": "ready"},
    ]


async def test_every_upstream_down_is_upstream_unavailable_with_the_soonest_retry(
    nursery, start_server, tmp_path
):
    fake = await started_fake(nursery)
    config = write_config(
        tmp_path,
        table("a", fake.base_url(), [UPSTREAM_KEY], ["gpt-4.1-mini"])
        + table("b", fake.base_url(), [UPSTREAM_KEY], ["gpt-4.1-mini"]),
    )
    server = await start_server(CONFIG_FILE=config, UPSTREAM_RETRIES="1")
    await queue_faults(fake, {"status": 429, "retry_after": 20}, {"status": 429, "retry_after": 25})
    first = await chat(server, "gpt-4.1-mini")
    assert first.status_code == 429, first.text  # the provider's own refusal, passed on
    second = await chat(server, "gpt-4.1-mini")
    assert second.status_code == 502, second.text
    assert error_code(second) == "upstream_unavailable"
    assert 18 <= int(second.headers["retry-after"]) <= 20
    assert second.json()["error"]["code"] == "upstream_unavailable"
    assert len(fake.requests) == 2


# -- Azure, proxies ------------------------------------------------------------------------------


async def test_an_azure_upstream_gets_the_key_in_api_key_and_the_api_version(
    nursery, start_server, tmp_path
):
    fake = await started_fake(nursery, api_key=None)
    config = write_config(
        tmp_path,
        table(
            "azure",
            fake.base_url(),
            [OTHER_KEY],
            ["gpt-4.1-mini"],
            kind="azure",
            api_version="2024-06-01",
        ),  # fmt: skip
    )
    server = await start_server(CONFIG_FILE=config)
    response = await chat(server, "gpt-4.1-mini")
    assert response.status_code == 200, response.text
    headers = fake.requests[0]["headers"]
    assert headers["api-key"] == OTHER_KEY
    assert "authorization" not in headers


@pytest.mark.parametrize("kind", ["socks5", "http"])
async def test_an_upstream_has_its_own_proxy(nursery, start_server, tmp_path, kind):
    proxy = Socks5Proxy() if kind == "socks5" else ConnectProxy()
    await nursery.start(proxy.serve)
    direct, proxied = await started_fake(nursery), await started_fake(nursery)
    config = write_config(
        tmp_path,
        table("direct", direct.base_url(), [UPSTREAM_KEY], ["m1"])
        + table(
            "proxied",
            proxied.base_url(),
            [UPSTREAM_KEY],
            ["m2"],
            proxy=f"{kind}://127.0.0.1:{proxy.port}",
        ),  # fmt: skip
    )
    server = await start_server(CONFIG_FILE=config, MODELS="m1,m2", GPT_ENGINE="m1")
    for model in ("m1", "m2"):
        response = await chat(server, model)
        assert response.status_code == 200, response.text
    assert len(direct.requests) == 1 and len(proxied.requests) == 1
    targets = [str(tunnel[0]) for tunnel in proxy.tunnels]
    if kind == "socks5":
        assert ("127.0.0.1", proxied.port) in proxy.tunnels
    else:
        assert any(str(proxied.port) in target for target in targets), targets
    assert not any(str(direct.port) in target for target in targets)


# -- visibility ----------------------------------------------------------------------------------


async def test_the_upstreams_command_shows_keys_as_number_and_last_four(tmp_path):
    secret = "sk-the-secret-part-of-the-key-WXYZ"
    (tmp_path / "upstreams.toml").write_text(
        table("openai", "https://api.openai.com/v1", [secret, "${SECOND}"], ["gpt-4.1-mini"])
        + table("ollama", "http://127.0.0.1:11434/v1", ["ollama"], ["qwen"], weight=2),
        encoding="utf-8",
    )
    env = clean_env(SECOND="sk-another-secret-key-9876")
    result = await run_cli(tmp_path, env, ["upstreams", "--config", "upstreams.toml"])
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert out.splitlines() == [
        "openai  https://api.openai.com/v1  models: gpt-4.1-mini  weight 1",
        "  key #1 …WXYZ",
        "  key #2 …9876",
        "ollama  http://127.0.0.1:11434/v1  models: qwen  weight 2",
        "  key #1",
    ]
    assert "secret" not in out


async def test_readyz_lists_the_upstreams_and_their_keys_states(nursery, start_server, tmp_path):
    fake = await started_fake(nursery)
    config = write_config(
        tmp_path,
        table("a", fake.base_url(), [UPSTREAM_KEY], ["gpt-4.1-mini"])
        + table("b", fake.base_url(), [UPSTREAM_KEY], ["gpt-4.1-mini"]),
    )
    server = await start_server(CONFIG_FILE=config, UPSTREAM_RETRIES="1")
    await queue_faults(fake, {"status": 429, "retry_after": 20})
    assert (await chat(server, "gpt-4.1-mini")).status_code == 200
    async with server.client(trust_env=False) as client:
        ready = (await client.get("/readyz")).json()
    assert ready["status"] == "ready"
    states = {u["name"]: [k["state"] for k in u["keys"]] for u in ready["upstreams"]}
    assert states["b"] == ["ready"]
    assert states["a"][0].startswith("cooling ")
    assert UPSTREAM_KEY not in json.dumps(ready)
