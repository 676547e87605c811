"""Conversation ids and request validation on the HTTP transport (SPEC §3, §4)."""

from __future__ import annotations

import json

import pytest
import trio
from helpers.database import snapshot, stored_turns
from helpers.http import error_code, raw_request
from helpers.upstream import echo

ENCODED_BAD_IDS = {
    "dot-dot-slash": "..%2Fx",
    "dot-dot-slash-deeper": "..%2F..%2F..%2Fescaped",
    "space": "a%20b",
    "nul": "%00",
    "nul-inside": "abc%00def",
    "too-long": "a" * 300,
    "one-too-many": "a" * 129,
    "non-ascii-letter": "caf%C3%A9",
    "fullwidth-letter": "%EF%BD%81bc",
    "arabic-digit": "%D9%A1",
    "newline": "abc%0A",
    "backslash": "..%5Cx",
    "percent": "a%25b",
    "slash-inside": "a%2Fb",
}


@pytest.fixture
async def data_server(start_server, tmp_path):
    return await start_server(CONVERSATIONS_DIR=str(tmp_path / "data" / "conversations"))


@pytest.mark.parametrize("raw_id", ENCODED_BAD_IDS.values(), ids=ENCODED_BAD_IDS.keys())
async def test_invalid_conversation_id_is_rejected_before_anything_happens(
    data_server, tmp_path, raw_id
):
    before = snapshot(tmp_path)
    async with data_server.client() as client:
        for path in (f"/ask/{raw_id}", f"/ask/{raw_id}/stream"):
            response = await client.post(path, json={"prompt": "hello"})
            assert response.status_code == 400, (path, response.text)
            assert error_code(response) == "invalid_input"
            assert "conversation_id" in response.json()["error"]["message"]
    assert not data_server.fake.requests
    after = snapshot(tmp_path)
    changed = {name for name in after.keys() | before.keys() if after.get(name) != before.get(name)}
    allowed = {f"data/conversations/easybackend.sqlite3{suffix}" for suffix in ("", "-wal", "-shm")}
    assert changed <= allowed, changed
    assert not (tmp_path / "data" / "x").exists()
    assert not (tmp_path / "escaped").exists()


async def test_raw_dot_segments_reach_the_id_check_unnormalised(data_server, tmp_path):
    # httpx-style clients remove dot segments before sending; a raw client does not, and the
    # server must not resolve them either: the id holds a '/' and is rejected
    port = data_server.running.http_port
    body = json.dumps({"prompt": "hello"}).encode()
    for target in ("/ask/../x", "/ask/../../x", "/ask/./x", "/ask/a/../b", "/ask/%2e%2e%2fx"):
        for suffix in ("", "/stream"):
            status, answer = await raw_request(port, f"POST {target}{suffix}", body)
            assert status == 400, (target, status, answer)
            assert json.loads(answer)["error"]["code"] == "invalid_input"
    assert not data_server.fake.requests
    assert not (tmp_path / "data" / "x").exists()
    assert not (tmp_path / "x").exists()


async def test_dot_dot_sent_raw_is_a_valid_id_and_names_no_file(data_server, tmp_path):
    # ".." only has characters of the allowed set; it must stay an opaque key, never a path
    status, answer = await raw_request(
        data_server.running.http_port, "POST /ask/..", b'{"prompt": "hello"}'
    )
    assert status == 200, answer
    assert json.loads(answer)["conversation_id"] == ".."
    db = data_server.settings.sqlite_path
    assert [t["prompt"] for t in stored_turns(db, "..")] == ["hello"]
    assert {p.name for p in (tmp_path / "data").iterdir()} == {"conversations"}


@pytest.mark.parametrize(
    "conversation_id", ["a", "a" * 128, "A-z_0.9:x", "...", ":", "user:42.chat_1-b"]
)
async def test_valid_conversation_ids_are_accepted(server, conversation_id):
    async with server.client() as client:
        response = await client.post(f"/ask/{conversation_id}", json={"prompt": "hi"})
        assert response.status_code == 200, response.text
        assert response.json()["conversation_id"] == conversation_id
    assert [t["prompt"] for t in stored_turns(server.settings.sqlite_path, conversation_id)] == [
        "hi"
    ]


BAD_BODIES = {
    "empty prompt": ({"prompt": ""}, "prompt"),
    "blank prompt": ({"prompt": "  \n\t "}, "prompt"),
    "missing prompt": ({}, "prompt"),
    "prompt not a string": ({"prompt": 42}, "prompt"),
    "prompt a list": ({"prompt": ["a", "b"]}, "prompt"),
    "prompt null": ({"prompt": None}, "prompt"),
    "prompt with NUL": ({"prompt": "a\x00b"}, "NUL"),
    "temperature 5": ({"prompt": "hi", "temperature": 5}, "temperature"),
    "temperature negative": ({"prompt": "hi", "temperature": -0.1}, "temperature"),
    "temperature a string": ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    "max_tokens 0": ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    "max_tokens negative": ({"prompt": "hi", "max_tokens": -5}, "max_tokens"),
    "max_tokens fractional": ({"prompt": "hi", "max_tokens": 1.5}, "max_tokens"),
    "unknown field": ({"prompt": "hi", "colour": "blue"}, "colour"),
    "empty model": ({"prompt": "hi", "model": ""}, "model"),
}


@pytest.mark.parametrize("body, mentions", BAD_BODIES.values(), ids=BAD_BODIES.keys())
async def test_bad_json_body_is_400_invalid_input_with_readable_message(server, body, mentions):
    async with server.client() as client:
        for path in ("/ask/bodies", "/ask/bodies/stream"):
            response = await client.post(path, json=body)
            assert response.status_code == 400, (path, response.text)
            assert error_code(response) == "invalid_input"
            assert mentions in response.json()["error"]["message"], response.text
    assert not server.fake.requests
    assert stored_turns(server.settings.sqlite_path, "bodies") == []


RAW_BODIES = {
    "not JSON": b"prompt=hello",
    "truncated JSON": b'{"prompt": "hel',
    "JSON list": b'[{"prompt": "hello"}]',
    "JSON string": b'"hello"',
    "JSON number": b"42",
    "JSON null": b"null",
    "empty body": b"",
    "invalid UTF-8": b'{"prompt": "\xff\xfe"}',
}


@pytest.mark.parametrize("content", RAW_BODIES.values(), ids=RAW_BODIES.keys())
async def test_body_that_is_not_a_json_object_is_400_invalid_input(server, content):
    async with server.client() as client:
        response = await client.post(
            "/ask/raw", content=content, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, response.text
        assert error_code(response) == "invalid_input"
        assert "JSON" in response.json()["error"]["message"], response.text
    assert not server.fake.requests


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_json_body_is_read_whatever_the_content_type(server, content_type):
    headers = {"content-type": content_type} if content_type else {}
    async with server.client() as client:
        response = await client.post("/ask/ctype", content=b'{"prompt": "hi"}', headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["response"] == echo(1, "hi")


async def test_unknown_route_and_wrong_method_are_json_errors(server):
    async with server.client() as client:
        missing = await client.get("/no/such/route")
        assert missing.status_code == 404
        assert error_code(missing) == "not_found"
        post_missing = await client.post("/nope", json={"prompt": "hi"})
        assert post_missing.status_code == 404 and error_code(post_missing) == "not_found"
        wrong = await client.get("/ask/x")
        assert wrong.status_code == 405
        assert error_code(wrong) == "method_not_allowed"
        assert "POST" in wrong.headers.get("allow", "")
        wrong_stream = await client.put("/ask/x/stream", json={"prompt": "hi"})
        assert wrong_stream.status_code == 405 and error_code(wrong_stream)
    assert not server.fake.requests


async def test_body_larger_than_max_body_bytes_is_413(start_server):
    server = await start_server(MAX_BODY_BYTES="2000")
    big = json.dumps({"prompt": "x" * 3000}).encode()

    async def chunked():
        for start in range(0, len(big), 500):
            yield big[start : start + 500]

    async with server.client() as client:
        response = await client.post(
            "/ask/big", content=big, headers={"content-type": "application/json"}
        )
        assert response.status_code == 413, response.text
        assert error_code(response) == "request_too_large"
        streamed = await client.post(
            "/ask/big", content=chunked(), headers={"content-type": "application/json"}
        )
        assert streamed.status_code == 413, streamed.text
        assert error_code(streamed) == "request_too_large"
        small = await client.post("/ask/big", json={"prompt": "x" * 1000})
        assert small.status_code == 200, small.text
    assert len(server.fake.requests) == 1


async def test_server_keeps_serving_after_every_kind_of_bad_request(server):
    port = server.running.http_port
    async with server.client() as client:
        for body in BAD_BODIES.values():
            await client.post("/ask/after", json=body[0])
        for content in RAW_BODIES.values():
            await client.post("/ask/after", content=content)
        for raw_id in ENCODED_BAD_IDS.values():
            await client.post(f"/ask/{raw_id}", json={"prompt": "x"})
        await client.get("/ask/after")
        await client.get("/missing")
    for garbage in (b"GARBAGE\r\n\r\n", b"POST /ask/x HTTP/1.1\r\nContent-Length: zz\r\n\r\n"):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(garbage)
            await stream.receive_some()
    assert not server.fake.requests
    async with server.client() as client:
        response = await client.post("/ask/after", json={"prompt": "still alive"})
        assert response.status_code == 200, response.text
        assert response.json()["response"] == echo(1, "still alive")
    assert [t["prompt"] for t in stored_turns(server.settings.sqlite_path, "after")] == [
        "still alive"
    ]
