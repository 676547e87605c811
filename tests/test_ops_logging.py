"""Logging (SPEC §7): one access line per ask on every protocol, request ids, console and JSON.

The in-process tests catch the records of the ``easybackend.access`` logger;
the subprocess test runs ``python run.py`` with ``LOG_FORMAT=json`` and a
``LOG_FILE`` and reads what it really wrote.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import sys

import grpc
import httpx2
import trio
from helpers.grpc import grpc_ask
from helpers.http import parse_sse, sse_leave_after_first_piece
from helpers.logs import ACCESS_FIELDS, capture_access, check_access_line
from helpers.servers import ServerProcess, clean_env, free_port
from helpers.upstream import UPSTREAM_KEY
from helpers.websocket import ws_json_ask, ws_original_ask

from easybackend import logs
from easybackend.logs import CONSOLE_FORMAT, JsonFormatter, configure_logging
from easybackend.settings import Settings

GENERATED_ID = re.compile(r"[0-9a-f]{16}")
KEYS = "alice:sk-alice-SECRET-0001,bob:sk-bob-SECRET-0002"
ALICE, BOB = "sk-alice-SECRET-0001", "sk-bob-SECRET-0002"


async def test_request_ids_round_trip_on_every_protocol(start_server):
    server = await start_server(WS_PORT=str(free_port()), GRPC_PORT=str(free_port()))
    with capture_access() as access:
        async with server.client() as client:
            # HTTP: the client's id is echoed and logged
            response = await client.post(
                "/ask/rid", json={"prompt": "hi"}, headers={"X-Request-Id": "client-req.1:A_b-2"}
            )
            assert response.headers["X-Request-Id"] == "client-req.1:A_b-2"
            (line,) = access.by_request_id("client-req.1:A_b-2")
            assert (line["protocol"], line["conversation_id"], line["outcome"]) == (
                "http",
                "rid",
                "ok",
            )

            # none sent: one is made up, returned and logged
            response = await client.post("/ask/rid", json={"prompt": "hi"})
            generated = response.headers["X-Request-Id"]
            assert GENERATED_ID.fullmatch(generated)
            assert len(access.by_request_id(generated)) == 1

            # an unacceptable one is replaced, never logged
            bad = "has spaces, and is far too long to be taken: " + "x" * 64
            response = await client.post(
                "/ask/rid", json={"prompt": "hi"}, headers={"X-Request-Id": bad}
            )
            replaced = response.headers["X-Request-Id"]
            assert GENERATED_ID.fullmatch(replaced)
            assert len(access.by_request_id(replaced)) == 1
            assert all(bad not in str(line) for line in access.lines)

            # SSE, and an error response: the header and the access line carry the same id
            response = await client.post(
                "/ask/rid/stream", json={"prompt": "hi"}, headers={"X-Request-Id": "sse-1"}
            )
            assert response.headers["X-Request-Id"] == "sse-1"
            assert parse_sse(response.text)[-1][0] == "end"
            assert [line["protocol"] for line in access.by_request_id("sse-1")] == ["sse"]
            response = await client.post(
                "/ask/rid",
                json={"prompt": "[[fake:status=502]]"},
                headers={"X-Request-Id": "err-1"},
            )
            assert response.status_code == 502
            assert response.headers["X-Request-Id"] == "err-1"
            assert [line["outcome"] for line in access.by_request_id("err-1")] == ["upstream_error"]

        # WebSocket (JSON): the id is in the end and error messages
        ws_port = server.running.ws_port
        replies = await ws_json_ask(ws_port, {"conversation_id": "rid-ws", "prompt": "hi"})
        end = replies[-1]
        assert end["type"] == "end" and GENERATED_ID.fullmatch(end["request_id"])
        assert [line["protocol"] for line in access.by_request_id(end["request_id"])] == ["ws"]
        replies = await ws_json_ask(ws_port, {"conversation_id": "bad id", "prompt": "hi"})
        error = replies[-1]
        assert error["type"] == "error" and error["code"] == "invalid_input"
        assert [line["outcome"] for line in access.by_request_id(error["request_id"])] == [
            "invalid_input"
        ]

        # gRPC: x-request-id metadata in, x-request-id initial metadata out
        grpc_port = server.running.grpc_port
        result = await grpc_ask(grpc_port, "rid-grpc", "hi", request_id="grpc-req-7")
        assert result.code == grpc.StatusCode.OK
        assert result.metadata["x-request-id"] == "grpc-req-7"
        assert [line["protocol"] for line in access.by_request_id("grpc-req-7")] == ["grpc"]
        # an error before any reply still carries the id, in the trailing metadata
        failed = await grpc_ask(grpc_port, "bad id", "hi", request_id="grpc-req-8")
        assert failed.code == grpc.StatusCode.INVALID_ARGUMENT
        assert failed.trailing["x-request-id"] == "grpc-req-8"
        result = await grpc_ask(grpc_port, "rid-grpc", "hi")
        generated = result.metadata["x-request-id"]
        assert GENERATED_ID.fullmatch(generated)
        assert [line["protocol"] for line in access.by_request_id(generated)] == ["grpc"]

    ids = [line["request_id"] for line in access.lines]
    assert len(ids) == len(set(ids)) == 10  # one line per ask, each its own id


async def test_one_access_line_per_ask_with_every_field(fake, start_server):
    server = await start_server(API_KEYS=KEYS, WS_PORT=str(free_port()), GRPC_PORT=str(free_port()))
    auth = {"Authorization": f"Bearer {ALICE}"}
    with capture_access() as access:
        async with server.client(headers=auth) as client:
            http = (await client.post("/ask/a1", json={"prompt": "one two"})).json()
            response = await client.post(
                "/ask/a2/stream",
                json={"prompt": "three"},
                headers={"Authorization": f"Bearer {BOB}"},
            )
            sse = parse_sse(response.text)[-1][1]
        ws = (
            await ws_json_ask(
                server.running.ws_port, {"conversation_id": "a3", "prompt": "four"}, api_key=BOB
            )
        )[-1]
        result = await grpc_ask(server.running.grpc_port, "a4", "five six", api_key=ALICE)
        lines = await access.wait_for(4)
    assert len(lines) == 4
    for line in lines:
        check_access_line(line)
        assert line["outcome"] == "ok" and line["ttft_ms"] is not None, line
    grpc_usage = result.replies[-1].usage
    assert [
        (a["protocol"], a["conversation_id"], a["key"], a["prompt_tokens"], a["completion_tokens"])
        for a in lines
    ] == [
        ("http", "a1", "alice", http["usage"]["prompt_tokens"], http["usage"]["completion_tokens"]),
        ("sse", "a2", "bob", sse["usage"]["prompt_tokens"], sse["usage"]["completion_tokens"]),
        ("ws", "a3", "bob", ws["usage"]["prompt_tokens"], ws["usage"]["completion_tokens"]),
        ("grpc", "a4", "alice", grpc_usage.prompt_tokens, grpc_usage.completion_tokens),
    ]  # fmt: skip
    for record in access.records:
        formatted = logging.Formatter(CONSOLE_FORMAT).format(record)
        assert "SECRET" not in formatted and "SECRET" not in JsonFormatter().format(record)


async def test_failed_and_cancelled_asks_get_one_access_line_each(fake, start_server):
    server = await start_server(WS_PORT=str(free_port()), UPSTREAM_IDLE_TIMEOUT="0.3")
    with capture_access() as access:
        async with server.client() as client:
            await client.post("/ask/f1", json={"prompt": "x [[fake:status=500]]"})
            await client.post("/ask/f2/stream", json={"prompt": "x [[fake:stall_after=2]]"})
            await sse_leave_after_first_piece(client, "f3")
        frames = await ws_original_ask(server.running.ws_port, "f4", "x [[fake:status=429]]")
        assert frames[-1].startswith("<|err|>$")
        lines = await access.wait_for(4)
    assert len(lines) == 4
    by_conversation = {line["conversation_id"]: line for line in lines}
    assert {cid: (line["protocol"], line["outcome"]) for cid, line in by_conversation.items()} == {
        "f1": ("http", "upstream_error"),
        "f2": ("sse", "upstream_timeout"),
        "f3": ("sse", "cancelled"),
        "f4": ("ws", "upstream_rate_limited"),
    }
    assert by_conversation["f1"]["ttft_ms"] is None  # failed before any token
    assert by_conversation["f1"]["completion_tokens"] == 0  # nothing stored, nothing counted
    # the cancelled ask's partial turn was stored: its tokens are counted
    assert (
        by_conversation["f3"]["prompt_tokens"] > 0
        and by_conversation["f3"]["completion_tokens"] > 0
    )
    assert by_conversation["f2"]["ttft_ms"] is not None
    assert by_conversation["f2"]["duration_ms"] >= 300  # the idle timeout
    for line in lines:
        check_access_line(line)


async def test_access_line_formats(start_server):
    server = await start_server()
    with capture_access() as access:
        async with server.client() as client:
            response = await client.post(
                "/ask/fmt", json={"prompt": "one two"}, headers={"X-Request-Id": "fmt-1"}
            )
    (record,) = access.records
    usage = response.json()["usage"]

    console = logging.Formatter(CONSOLE_FORMAT).format(record)
    pattern = (
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO easybackend\.access: ask request_id=fmt-1 "
        r"protocol=http conversation_id=fmt key=- upstream=default outcome=ok ttft_ms=[\d.]+ "
        r"duration_ms=[\d.]+ "
        rf"prompt_tokens={usage['prompt_tokens']} completion_tokens={usage['completion_tokens']}"
    )
    assert re.fullmatch(pattern, console), console

    data = json.loads(JsonFormatter().format(record))
    assert set(data) == {"time", "level", "logger", "message"} | ACCESS_FIELDS
    assert (data["level"], data["logger"], data["request_id"]) == (
        "INFO",
        "easybackend.access",
        "fmt-1",
    )
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", data["time"])
    assert data["message"] == record.getMessage()

    try:
        raise ValueError("boom")
    except ValueError:
        failure = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed: %s", ("it",), None)
        failure.exc_info = sys.exc_info()
    data = json.loads(JsonFormatter().format(failure))
    assert data["message"] == "failed: it" and "ValueError: boom" in data["exception"]


def test_log_file_is_json_and_rotates(tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "FILE_MAX_BYTES", 2000)
    path = tmp_path / "logs" / "easybackend.log"
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_quiet = {name: logging.getLogger(name).level for name in logs.QUIET_LIBRARIES}
    try:
        configure_logging(Settings(log_format="json", log_file=path, log_level="INFO"))
        for n in range(100):
            logging.getLogger("easybackend.test").info("line %d of the rotation test", n)
        logging.getLogger("easybackend.test").debug("below the level")
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)
        for name, level in saved_quiet.items():
            logging.getLogger(name).setLevel(level)
    files = sorted(path.parent.iterdir())
    assert [f.name for f in files] == ["easybackend.log"] + [
        f"easybackend.log.{n}" for n in range(1, logs.FILE_BACKUPS + 1)
    ]
    assert all(f.stat().st_size <= 2000 for f in files)
    last = [json.loads(line) for line in path.read_text().splitlines()]
    assert last[-1]["message"] == "line 99 of the rotation test"
    assert all(entry["level"] == "INFO" for entry in last)
    for f in files:
        for line in f.read_text().splitlines():
            json.loads(line)


async def test_json_logs_of_a_real_process(fake, tmp_path):
    """Every stderr line is JSON; one access line per ask per protocol; LOG_FILE holds the same."""
    http_port, grpc_port, ws_port = free_port(), free_port(), free_port()
    log_file = tmp_path / "logs" / "easybackend.log"
    env = clean_env(
        OPENAI_API_KEY=UPSTREAM_KEY,
        OPENAI_BASE_URL=fake.base_url(),
        HOST="127.0.0.1",
        HTTP_PORT=str(http_port),
        GRPC_PORT=str(grpc_port),
        WS_PORT=str(ws_port),
        CONVERSATIONS_DIR=str(tmp_path / "data"),
        LOG_FORMAT="json",
        LOG_FILE=str(log_file),
    )
    process = ServerProcess(tmp_path, env)
    await process.start()
    try:
        await process.wait_healthy(http_port)
        sentinel = "PROMPT-SENTINEL in every prompt"
        async with httpx2.AsyncClient(
            base_url=f"http://127.0.0.1:{http_port}", timeout=10
        ) as client:
            response = await client.post(
                "/ask/j-http", json={"prompt": sentinel}, headers={"X-Request-Id": "j-http-1"}
            )
            assert response.status_code == 200, response.text
            response = await client.post("/ask/j-sse/stream", json={"prompt": sentinel})
            sse_id = response.headers["X-Request-Id"]
        ws_id = (await ws_json_ask(ws_port, {"conversation_id": "j-ws", "prompt": sentinel}))[-1][
            "request_id"
        ]
        result = await grpc_ask(grpc_port, "j-grpc", sentinel, request_id="j-grpc-1")
        assert result.code == grpc.StatusCode.OK
        process.process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await process.process.wait() == 0
    finally:
        process.ensure_stopped()

    stderr = process.stderr_path.read_text()
    entries = [json.loads(line) for line in stderr.splitlines()]  # every line parses
    assert "Traceback" not in stderr and "SECRET" not in stderr and "PROMPT-SENTINEL" not in stderr
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry), entry
    access = [entry for entry in entries if entry["logger"] == "easybackend.access"]
    assert [(a["protocol"], a["request_id"]) for a in access] == [
        ("http", "j-http-1"),
        ("sse", sse_id),
        ("ws", ws_id),
        ("grpc", "j-grpc-1"),
    ]
    for entry in access:
        line = {k: v for k, v in entry.items() if k in ACCESS_FIELDS}
        check_access_line(line)
        assert entry["outcome"] == "ok" and entry["key"] == "-", entry
        assert entry["conversation_id"] == f"j-{entry['protocol']}", entry
    loggers = {entry["logger"] for entry in entries}
    assert "hypercorn.error" in loggers  # hypercorn's own lines go through the same handlers
    assert entries[-1]["message"] == "EasyBackend stopped"  # flushed before the exit

    in_file = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert in_file == entries
