"""The upstream API key never leaves the server: not in responses, not in logs (SPEC §7)."""

from __future__ import annotations

import logging

import httpx2
import pytest
from helpers.http import parse_sse
from helpers.servers import ServerProcess, clean_env, free_port, run_cli, server_env
from helpers.upstream import UPSTREAM_KEY

WRONG_KEY = "sk-wrong-but-still-SECRET-9876543210"
SECRETS = (UPSTREAM_KEY, WRONG_KEY, UPSTREAM_KEY[-12:], WRONG_KEY[-12:])
LOGGERS = (
    "",
    "easybackend",
    "openai",
    "httpx2",
    "httpcore2",
    "httpx",
    "httpcore",
    "hypercorn",
    "hypercorn.error",
    "quart",
    "quart.app",
    "hpack",
    "h11",
    "anyio",
)


class Recorder:
    """Keeps every response (status line, headers, body) a client received."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def __call__(self, response: httpx2.Response) -> None:
        await response.aread()
        self.seen.append(f"{response.status_code} {response.headers!r}\n{response.text}")

    def check(self) -> None:
        assert self.seen
        for text in self.seen:
            for secret in SECRETS:
                assert secret not in text, text


def check_logs(caplog: pytest.LogCaptureFixture) -> None:
    assert caplog.records
    for record in caplog.records:
        rendered = f"{record.getMessage()} {record.__dict__!r} {record.exc_text or ''}"
        for secret in SECRETS:
            assert secret not in rendered, rendered
    for secret in SECRETS:
        assert secret not in caplog.text


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


async def test_key_appears_in_no_response_and_no_log_record(server, debug_logs):
    recorder = Recorder()
    async with server.client(event_hooks={"response": [recorder]}) as client:
        ok = await client.post("/ask/secret", json={"prompt": "hello"})
        assert ok.status_code == 200
        failed = await client.post("/ask/secret", json={"prompt": "x [[fake:status=500]]"})
        assert failed.status_code == 502
        limited = await client.post("/ask/secret", json={"prompt": "x [[fake:status=429]]"})
        assert limited.status_code == 429
        stream = await client.post("/ask/secret/stream", json={"prompt": "stream"})
        assert [name for name, _ in parse_sse(stream.text)][-1] == "end"
        broken = await client.post(
            "/ask/secret/stream", json={"prompt": "a b c [[fake:disconnect_after=2]]"}
        )
        assert [name for name, _ in parse_sse(broken.text)][-1] == "error"
        bad = await client.post("/ask/secret", json={"prompt": 1})
        assert bad.status_code == 400
        await client.get("/openapi.json")
        await client.get("/healthz")
    # the key really was used upstream, so its absence above means something
    assert server.fake.requests[0]["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    recorder.check()
    check_logs(debug_logs)


async def test_key_rejected_by_the_upstream_is_not_echoed(start_server, debug_logs):
    server = await start_server(OPENAI_API_KEY=WRONG_KEY)
    recorder = Recorder()
    async with server.client(event_hooks={"response": [recorder]}) as client:
        response = await client.post("/ask/wrong-key", json={"prompt": "hello"})
        assert response.status_code == 502, response.text
        assert response.json()["error"]["code"] == "upstream_auth_failed"
        stream = await client.post("/ask/wrong-key/stream", json={"prompt": "hello"})
        assert stream.status_code == 502, stream.text
    assert server.fake.requests[0]["headers"]["authorization"] == f"Bearer {WRONG_KEY}"
    recorder.check()
    check_logs(debug_logs)


async def test_key_is_not_in_the_output_of_a_server_process_logging_at_debug(fake, tmp_path):
    port = free_port()
    env = server_env(fake, HTTP_PORT=str(port), GRPC_PORT="off", WS_PORT="off", LOG_LEVEL="DEBUG")
    process = ServerProcess(tmp_path, env)
    await process.start()
    recorder = Recorder()
    try:
        await process.wait_healthy(port)
        async with httpx2.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=10, event_hooks={"response": [recorder]}
        ) as client:
            assert (await client.post("/ask/p", json={"prompt": "hi"})).status_code == 200
            failed = await client.post("/ask/p", json={"prompt": "x [[fake:status=500]]"})
            assert failed.status_code == 502
            stream = await client.post("/ask/p/stream", json={"prompt": "streamed"})
            assert [name for name, _ in parse_sse(stream.text)][-1] == "end"
        assert await process.interrupt() == 0
    finally:
        process.ensure_stopped()
    output = process.output
    assert output.strip(), "the server logged nothing at DEBUG"
    assert "Traceback" not in output
    for secret in SECRETS:
        assert secret not in output
    assert fake.requests[0]["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    recorder.check()


async def test_key_is_not_printed_by_a_failed_start(tmp_path):
    env = clean_env(OPENAI_API_KEY=UPSTREAM_KEY, TEMPERATURE="hot", HTTP_PORT="99999")
    result = await run_cli(tmp_path, env)
    assert result.returncode != 0
    output = (result.stdout + result.stderr).decode()
    assert output.startswith("easybackend: error:")
    for secret in SECRETS:
        assert secret not in output
