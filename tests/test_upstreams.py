"""Several upstreams from a configuration file (SPEC §16): routing, key pools, failover, proxies."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import httpx2
import pytest
import trio
from helpers.database import stored_turns
from helpers.http import error_code, parse_sse
from helpers.logs import capture_access, check_access_line, metric, scrape
from helpers.proxies import ConnectProxy, Socks5Proxy
from helpers.servers import clean_env, free_port, run_cli
from helpers.tls import tls_front, trusted_authority
from helpers.upstream import UPSTREAM_KEY, queue_faults

from easybackend.fake_upstream import FakeUpstream
from easybackend.metrics import Metrics
from easybackend.upstream.openai_client import OpenAIUpstream

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
    assert response.status_code == 503, response.text
    assert "no upstream serves the model gpt-4.1-mini" in response.text
    assert "retry-after" not in response.headers  # no cool-down to wait for: a configuration
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
    assert second.status_code == 503, second.text
    assert error_code(second) == "upstream_unavailable"
    assert 18 <= int(second.headers["retry-after"]) <= 20
    assert second.json()["error"]["code"] == "upstream_unavailable"
    async with server.client(trust_env=False) as client:  # the native API says the same
        with trio.fail_after(20):
            native = await client.post("/ask/down", json={"prompt": "hi"})
    assert native.status_code == 503, native.text
    assert error_code(native) == "upstream_unavailable"
    assert 18 <= int(native.headers["retry-after"]) <= 20
    assert 18 <= native.json()["error"]["retry_after"] <= 20
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


async def test_an_https_upstream_is_reached_through_its_own_connect_proxy(
    nursery, start_server, tmp_path, monkeypatch
):
    authority = trusted_authority(tmp_path, monkeypatch)
    behind_tls, direct = await started_fake(nursery), await started_fake(nursery)
    tls_port = await tls_front(nursery, behind_tls.port, authority)
    proxy = ConnectProxy()
    await nursery.start(proxy.serve)
    config = write_config(
        tmp_path,
        table("direct", direct.base_url(), [UPSTREAM_KEY], ["m1"])
        + table(
            "tls",
            f"https://127.0.0.1:{tls_port}/v1",
            [UPSTREAM_KEY],
            ["m2"],
            proxy=f"http://127.0.0.1:{proxy.port}",
        ),  # fmt: skip
    )
    server = await start_server(CONFIG_FILE=config, MODELS="m1,m2", GPT_ENGINE="m1")
    for model in ("m2", "m1"):
        response = await chat(server, model, f"to {model}")
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == f"echo(1): to {model}"
    assert len(behind_tls.requests) == 1 and len(direct.requests) == 1
    # the proxy was asked for a tunnel to the TLS port, and the tunnel carried TLS (a handshake
    # record starts with 0x16), not the request in clear; the other upstream was not proxied
    assert proxy.tunnels, "the proxy saw no CONNECT"
    assert set(proxy.tunnels) == {(f"127.0.0.1:{tls_port}", b"\x16")}


# -- visibility ----------------------------------------------------------------------------------


def requests_of(text: str, upstream: str, outcome: str) -> float:
    return metric(text, "easybackend_upstream_requests_total", upstream=upstream, outcome=outcome)


def first_tokens_of(text: str, upstream: str) -> float:
    return metric(text, "easybackend_upstream_time_to_first_token_seconds_count", upstream=upstream)


def cool_downs_of(text: str, upstream: str) -> float:
    return metric(text, "easybackend_upstream_cool_downs_total", upstream=upstream)


def logged_text(caplog: pytest.LogCaptureFixture) -> str:
    """Every captured log line as written, with an access line's fields."""
    return "\n".join(
        f"{record.getMessage()} {getattr(record, 'access', '')}" for record in caplog.records
    )


async def test_metrics_count_each_upstreams_calls_cool_downs_and_first_tokens_never_keys(
    nursery, start_server, tmp_path, caplog
):
    limited, other = await started_fake(nursery), await started_fake(nursery, OTHER_KEY)
    config = write_config(
        tmp_path,
        table("limited", limited.base_url(), [UPSTREAM_KEY], ["gpt-4.1-mini"])
        + table("other", other.base_url(), [OTHER_KEY], ["gpt-4.1-mini"]),
    )
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="easybackend")
    server = await start_server(CONFIG_FILE=config, UPSTREAM_RETRIES="1")
    await queue_faults(limited, {"status": 429, "retry_after": 30})
    for _ in range(2):  # the first fails over from limited (429, cooling for 30 s) to other
        response = await chat(server, "gpt-4.1-mini")
        assert response.status_code == 200, response.text
    async with server.client(trust_env=False) as client:
        with trio.fail_after(20):
            native = await client.post("/ask/per-upstream", json={"prompt": "hello"})
        assert native.status_code == 200, native.text
        text = await scrape(client)
    assert len(limited.requests) == 1 and len(other.requests) == 3
    assert requests_of(text, "limited", "upstream_rate_limited") == 1
    assert requests_of(text, "limited", "ok") == 0
    assert requests_of(text, "other", "ok") == 3
    assert cool_downs_of(text, "limited") == 1 and cool_downs_of(text, "other") == 0
    assert first_tokens_of(text, "other") == 3 and first_tokens_of(text, "limited") == 0
    logged = logged_text(caplog)
    assert "limited key #1 cools down" in logged  # the logs were captured: their absence counts
    for secret in (UPSTREAM_KEY, OTHER_KEY):
        assert secret not in text and secret not in logged
    for fake in (limited, other):
        assert f":{fake.port}" not in text  # nor the upstream's address


async def test_the_access_line_names_the_upstream_that_answered(nursery, start_server, tmp_path):
    first, second = await started_fake(nursery), await started_fake(nursery)
    config = write_config(
        tmp_path,
        table("first", first.base_url(), [UPSTREAM_KEY], ["gpt-4.1-mini"])
        + table("second", second.base_url(), [UPSTREAM_KEY], ["deepseek-chat"])
        + table("down", down_url(), [UPSTREAM_KEY], ["gpt-down"]),
    )
    server = await start_server(CONFIG_FILE=config, MODELS="gpt-4.1-mini,deepseek-chat,gpt-down")
    messages = [{"role": "user", "content": "hi"}]
    asks = {  # request id: (path, body, status)
        "relay-whole": ("/v1/chat/completions", {"model": "deepseek-chat"}, 200),
        "relay-stream": ("/v1/chat/completions", {"model": "gpt-4.1-mini", "stream": True}, 200),
        "native": ("/ask/named", {"model": "deepseek-chat"}, 200),
        "native-sse": ("/ask/named/stream", {"model": "gpt-4.1-mini"}, 200),
        "refused": ("/v1/chat/completions", {"model": "not-allowed"}, 403),
        "all-down": ("/ask/named", {"model": "gpt-down"}, 503),
    }
    with capture_access() as access:
        async with server.client(trust_env=False) as client:
            for request_id, (path, body, status) in asks.items():
                body = {**body, "messages": messages} if path.startswith("/v1") else body
                body = body if path.startswith("/v1") else {**body, "prompt": "hi"}
                with trio.fail_after(20):
                    response = await client.post(
                        path, json=body, headers={"X-Request-Id": request_id}
                    )
                assert response.status_code == status, (request_id, response.text)
                if request_id == "native-sse":
                    assert parse_sse(response.text)[-1][0] == "end", response.text
        lines = await access.wait_for(len(asks))
    answered_by = {}
    for line in lines:
        check_access_line(line)
        answered_by[line["request_id"]] = line["upstream"]
    assert answered_by == {
        "relay-whole": "second",
        "relay-stream": "first",
        "native": "second",
        "native-sse": "first",
        "refused": "-",  # refused before any upstream was called
        "all-down": "-",  # no upstream answered
    }
    written = [record.getMessage() for record in access.records]
    assert any(" upstream=second " in message for message in written), written


async def test_the_single_upstream_of_the_environment_is_named_default(server):
    with capture_access() as access:
        async with server.client(trust_env=False) as client:
            with trio.fail_after(20):
                whole = await client.post("/ask/default", json={"prompt": "hello"})
                relayed = await client.post(
                    "/v1/chat/completions",
                    json={"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "x"}]},
                )
                broken = await client.post(
                    "/v1/chat/completions",
                    json={
                        "model": "gpt-4.1-mini",
                        "stream": True,
                        "messages": [{"role": "user", "content": "a b c [[fake:disconnect_after=2]]"}],
                    },
                )  # fmt: skip
            text = await scrape(client)
        lines = await access.wait_for(3)
    assert whole.status_code == 200 and relayed.status_code == 200, (whole.text, relayed.text)
    assert broken.status_code == 200 and '"code": "upstream_error"' in broken.text, broken.text
    assert [line["upstream"] for line in lines] == ["default"] * 3
    assert requests_of(text, "default", "ok") == 2
    assert requests_of(text, "default", "upstream_error") == 1  # broken off after two pieces
    assert first_tokens_of(text, "default") == 3
    assert UPSTREAM_KEY not in text


async def test_a_call_cancelled_before_its_answer_starts_is_counted_and_gives_its_place_back(
    nursery, make_settings
):
    received = trio.Event()

    async def silent(stream: trio.SocketStream) -> None:
        """Reads the request, never answers."""
        try:
            await stream.receive_some()
            received.set()
            await trio.sleep_forever()
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    metrics = Metrics()
    upstream = OpenAIUpstream(make_settings(OPENAI_BASE_URL=f"http://127.0.0.1:{port}/v1"), metrics)
    (provider,) = upstream.router.providers
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as calls:
                calls.start_soon(upstream.relay_whole, b'{"model":"m","messages":[]}', "m")
                await received.wait()
                assert provider.in_progress == 1
                calls.cancel_scope.cancel()
    finally:
        await upstream.aclose()
    assert provider.in_progress == 0  # no answer left counted in progress: its load is right
    assert requests_of(metrics.render().decode(), "default", "cancelled") == 1


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


async def test_each_turn_keeps_the_upstream_that_answered_and_continues_on_any(
    nursery, start_server, tmp_path
):
    first, second = await started_fake(nursery), await started_fake(nursery)
    config = write_config(
        tmp_path,
        table("first", first.base_url(), [UPSTREAM_KEY], ["gpt-4.1-mini"])
        + table("second", second.base_url(), [UPSTREAM_KEY], ["gpt-4.1-mini"], weight=0.001),
    )
    server = await start_server(CONFIG_FILE=config, UPSTREAM_RETRIES="2")
    async with server.client(trust_env=False) as client:
        one = await client.post("/ask/roams", json={"prompt": "one"})
        # the first upstream goes away: the conversation goes on at the second, history and all
        await queue_faults(first, {"status": 503}, {"status": 503})
        two = await client.post("/ask/roams", json={"prompt": "two"})
        detail = (await client.get("/conversations/roams")).json()
    assert one.status_code == two.status_code == 200, (one.text, two.text)
    assert [turn["upstream"] for turn in detail["history"]] == ["first", "second"]
    (asked,) = [request["body"]["messages"] for request in second.requests]
    assert [m["content"] for m in asked if m["role"] != "system"][:2] == [
        "one",
        one.json()["response"],
    ]
    (turn,) = stored_turns(server.settings.sqlite_path, "roams")[1:]
    assert turn["upstream"] == "second"
