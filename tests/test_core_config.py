"""Start-up configuration through the real command (SPEC §2, §11): ``python run.py``."""

from __future__ import annotations

import socket

import httpx2
import pytest
import trio
from helpers.servers import ServerProcess, clean_env, free_port, run_cli
from helpers.upstream import UPSTREAM_KEY

from easybackend.settings import ConfigError, load_settings

BASE = {"OPENAI_API_KEY": UPSTREAM_KEY, "HOST": "127.0.0.1", "GRPC_PORT": "off", "WS_PORT": "off"}

BAD_CONFIGS = {
    "temperature not a number": ({"TEMPERATURE": "abc"}, "TEMPERATURE"),
    "port out of range": ({"HTTP_PORT": "99999"}, "HTTP_PORT"),
    "mysql database": ({"DATABASE_URL": "mysql://u:pw@h/db"}, "DATABASE_URL"),
    "no upstream key": ({"OPENAI_API_KEY": ""}, "OPENAI_API_KEY"),
    "response budget eats the context": (
        {"MAX_CONTEXT_TOKENS": "100", "MAX_RESPONSE_TOKENS": "100"},
        "MAX_RESPONSE_TOKENS",
    ),
    "unknown encoding": ({"ENCODING_NAME": "nope", "HTTP_PORT": "0"}, "nope"),
    "unknown memory policy": (
        {"MEMORY": "forget"},
        "MEMORY='forget' must be truncate or summarize",
    ),
    "summary longer than half the budget": (
        {"MAX_CONTEXT_TOKENS": "1000", "MAX_RESPONSE_TOKENS": "200", "SUMMARY_MAX_TOKENS": "401"},
        "SUMMARY_MAX_TOKENS must be at most half",
    ),
}


def check_one_error_line(result, mentions: str) -> str:
    assert result.returncode != 0
    stderr = result.stderr.decode()
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("easybackend: error: "), stderr
    assert mentions in lines[0], stderr
    assert "Traceback" not in stderr + result.stdout.decode()
    return lines[0]


async def test_bad_configuration_stops_start_up_with_one_line(tmp_path):
    results = {}

    async def run(name: str, env: dict[str, str]) -> None:
        workdir = tmp_path / name.replace(" ", "-")
        workdir.mkdir()
        results[name] = await run_cli(workdir, clean_env(**{**BASE, **env}))

    async with trio.open_nursery() as nursery:
        for name, (env, _) in BAD_CONFIGS.items():
            nursery.start_soon(run, name, env)

    for name, (_, mentions) in BAD_CONFIGS.items():
        line = check_one_error_line(results[name], mentions)
        assert "u:pw" not in line and "pw@" not in line, line
    assert "--demo" in results["no upstream key"].stderr.decode()


def memory_settings(**env: str):
    return load_settings(environ={"OPENAI_API_KEY": "unused", **env}, env_file=None)


def test_memory_defaults_leave_conversations_unsummarized_and_unexpiring():
    settings = memory_settings()
    assert settings.memory == "truncate"
    assert settings.conversation_ttl is None
    assert settings.summary_max_tokens is None and settings.summary_threshold is None
    assert settings.auto_title is False
    assert settings.sweep_interval == 60.0
    assert settings.background_jobs == 4


@pytest.mark.parametrize(
    ("env", "field", "value"),
    [
        ({"MEMORY": " Summarize "}, "memory", "summarize"),
        ({"MEMORY": "truncate"}, "memory", "truncate"),
        ({"CONVERSATION_TTL": "off"}, "conversation_ttl", None),
        ({"CONVERSATION_TTL": "0"}, "conversation_ttl", None),
        ({"CONVERSATION_TTL": "never"}, "conversation_ttl", None),
        ({"CONVERSATION_TTL": ""}, "conversation_ttl", None),
        ({"CONVERSATION_TTL": "86400"}, "conversation_ttl", 86400.0),
        ({"CONVERSATION_TTL": "1.5"}, "conversation_ttl", 1.5),
        ({"AUTO_TITLE": "true"}, "auto_title", True),
        ({"AUTO_TITLE": "on"}, "auto_title", True),
        ({"AUTO_TITLE": "0"}, "auto_title", False),
        ({"SWEEP_INTERVAL": "2.5"}, "sweep_interval", 2.5),
        ({"BACKGROUND_JOBS": "16"}, "background_jobs", 16),
        ({"SUMMARY_THRESHOLD": "300"}, "summary_threshold", 300),
        ({"SUMMARY_MODEL": "small"}, "summary_model", "small"),
        ({"SUMMARY_MODEL": ""}, "summary_model", None),
        # exactly half of the budget (1000 - 200) is allowed
        (
            {
                "MAX_CONTEXT_TOKENS": "1000",
                "MAX_RESPONSE_TOKENS": "200",
                "SUMMARY_MAX_TOKENS": "400",
            },
            "summary_max_tokens",
            400,
        ),
    ],
)
def test_memory_variables_are_parsed(env, field, value):
    assert getattr(memory_settings(**env), field) == value


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MEMORY": "forget"}, "MEMORY='forget' must be truncate or summarize"),
        ({"MEMORY": ""}, "MEMORY='' must be truncate or summarize"),
        ({"CONVERSATION_TTL": "-5"}, "CONVERSATION_TTL='-5' must be a positive number of seconds"),
        ({"CONVERSATION_TTL": "a day"}, "CONVERSATION_TTL='a day' is not a valid value"),
        ({"CONVERSATION_TTL": "inf"}, "CONVERSATION_TTL='inf' must be a positive number"),
        ({"AUTO_TITLE": "maybe"}, "AUTO_TITLE='maybe' must be true or false"),
        ({"SWEEP_INTERVAL": "0"}, "SWEEP_INTERVAL='0' must be a positive number of seconds"),
        ({"SWEEP_INTERVAL": "off"}, "SWEEP_INTERVAL='off' is not a valid value"),
        ({"BACKGROUND_JOBS": "0"}, "BACKGROUND_JOBS='0' must be a positive whole number"),
        ({"BACKGROUND_JOBS": "2.5"}, "BACKGROUND_JOBS='2.5' is not a valid value"),
        ({"SUMMARY_THRESHOLD": "-1"}, "SUMMARY_THRESHOLD='-1' must be a positive whole number"),
        ({"SUMMARY_MAX_TOKENS": "0"}, "SUMMARY_MAX_TOKENS='0' must be a positive whole number"),
        (
            # the default budget: MAX_CONTEXT_TOKENS 4096, no MAX_RESPONSE_TOKENS
            {"SUMMARY_MAX_TOKENS": "2049"},
            "SUMMARY_MAX_TOKENS must be at most half of MAX_CONTEXT_TOKENS minus",
        ),
        (
            {
                "MAX_CONTEXT_TOKENS": "1000",
                "MAX_RESPONSE_TOKENS": "200",
                "SUMMARY_MAX_TOKENS": "401",
            },
            "SUMMARY_MAX_TOKENS must be at most half of MAX_CONTEXT_TOKENS minus",
        ),
    ],
)
def test_bad_memory_variables_are_refused_with_their_reason(env, message):
    with pytest.raises(ConfigError) as refused:
        memory_settings(**env)
    assert str(refused.value).startswith(message), refused.value
    assert "\n" not in str(refused.value)


async def test_taken_http_port_stops_start_up_naming_the_port(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = await run_cli(tmp_path, clean_env(**BASE, HTTP_PORT=str(port)))
    line = check_one_error_line(result, str(port))
    assert "HTTP" in line


async def test_flags_override_the_environment(tmp_path):
    result = await run_cli(tmp_path, clean_env(**BASE, TEMPERATURE="0.2"), ["--http-port", "99999"])
    check_one_error_line(result, "99999")


async def test_dotenv_in_the_working_directory_is_read(tmp_path):
    (tmp_path / ".env").write_text(f"OPENAI_API_KEY={UPSTREAM_KEY}\nTEMPERATURE=7\n")
    env = clean_env(HOST="127.0.0.1")
    result = await run_cli(tmp_path, env)
    check_one_error_line(result, "TEMPERATURE='7'")


async def test_environment_wins_over_dotenv(tmp_path):
    # .env supplies the key (else that error would come first) and a bad temperature that
    # the environment overrides; the remaining error proves both.
    (tmp_path / ".env").write_text(
        f"OPENAI_API_KEY={UPSTREAM_KEY}\nTEMPERATURE=7\nDATABASE_URL=sqlite:///ok.db\n"
    )
    env = clean_env(TEMPERATURE="0.3", DATABASE_URL="mysql://user:hunter2@db/x")
    result = await run_cli(tmp_path, env)
    line = check_one_error_line(result, "DATABASE_URL")
    assert "mysql" in line and "hunter2" not in line


@pytest.fixture
async def demo(tmp_path):
    port = free_port()
    env = clean_env(HTTP_PORT=str(port), GRPC_PORT="off", WS_PORT="off", HOST="127.0.0.1")
    process = ServerProcess(tmp_path, env, ["--demo"])
    await process.start()
    try:
        await process.wait_healthy(port)
        yield process, f"http://127.0.0.1:{port}"
    finally:
        process.ensure_stopped()


async def test_demo_mode_serves_docs_and_answers_then_stops_cleanly_on_sigint(demo, tmp_path):
    process, url = demo
    async with httpx2.AsyncClient(base_url=url, timeout=10) as client:
        docs = await client.get("/docs")
        assert docs.status_code == 200
        assert "text/html" in docs.headers["content-type"]
        assert "swagger" in docs.text.lower()

        openapi = await client.get("/openapi.json")
        assert openapi.status_code == 200
        document = openapi.json()
        assert document["openapi"].startswith("3.")
        assert "/ask/{conversation_id}" in document["paths"]
        assert "/ask/{conversation_id}/stream" in document["paths"]

        answer = await client.post("/ask/123", json={"prompt": "你好"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["response"] == "echo(1): 你好"
        assert answer.json()["conversation_id"] == "123"
        again = await client.post("/ask/123", json={"prompt": "再见"})
        assert again.json()["response"] == "echo(3): 再见"

    assert await process.interrupt() == 0
    output = process.output
    assert "Traceback" not in output, output
    # the default data directory is ./conversations in the working directory
    assert (tmp_path / "conversations" / "easybackend.sqlite3").is_file()
