"""``POST /ask/{id}/stream``: Server-Sent Events (SPEC §4)."""

from __future__ import annotations

from helpers.database import stored_turns
from helpers.http import error_code, parse_sse
from helpers.upstream import echo, full_answer, history_of, upstream_messages


async def test_stream_sends_deltas_then_exactly_one_end(server):
    prompt = "stream me [[fake:tokens=12]]"
    async with server.client() as client:
        response = await client.post("/ask/sse/stream", json={"prompt": prompt})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"

    events = parse_sse(response.text)
    names = [name for name, _ in events]
    assert names == ["delta"] * (len(events) - 1) + ["end"], names
    assert 1 <= len(events) - 1 <= 12  # pieces that arrive together make one delta
    text = "".join(data["text"] for _, data in events[:-1])
    assert text == full_answer(1, "stream me", 12)
    end = events[-1][1]
    assert end["conversation_id"] == "sse"
    assert end["finish_reason"] == "stop"
    assert end["model"] == server.settings.model
    usage = end["usage"]
    assert usage["completion_tokens"] == 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 12

    (turn,) = stored_turns(server.settings.sqlite_path, "sse")
    assert (turn["prompt"], turn["answer"], turn["finish_reason"]) == (prompt, text, "stop")


async def test_streamed_turn_is_remembered_like_any_other(server):
    async with server.client() as client:
        first = await client.post("/ask/sse-mem/stream", json={"prompt": "first"})
        second = await client.post("/ask/sse-mem", json={"prompt": "second"})
        third = await client.post("/ask/sse-mem/stream", json={"prompt": "third"})
    assert "".join(d["text"] for e, d in parse_sse(first.text) if e == "delta") == echo(1, "first")
    assert second.json()["response"] == echo(3, "second")
    assert history_of(upstream_messages(server.fake)) == [
        ("first", echo(1, "first")),
        ("second", echo(3, "second")),
    ]
    assert "".join(d["text"] for e, d in parse_sse(third.text) if e == "delta") == echo(5, "third")


async def test_stream_respects_max_tokens_with_finish_reason_length(server):
    async with server.client() as client:
        response = await client.post(
            "/ask/sse-len/stream", json={"prompt": "a b c d e f g h", "max_tokens": 3}
        )
    events = parse_sse(response.text)
    assert "".join(d["text"] for e, d in events if e == "delta") == "echo(1): a b"
    assert events[-1][0] == "end" and events[-1][1]["finish_reason"] == "length"
    (turn,) = stored_turns(server.settings.sqlite_path, "sse-len")
    assert turn["finish_reason"] == "length"


async def test_error_before_first_token_is_a_plain_json_response(start_server):
    server = await start_server(MAX_CONTEXT_TOKENS="100")
    async with server.client() as client:
        too_long = await client.post(
            "/ask/sse-err/stream", json={"prompt": " ".join(f"w{i}" for i in range(200))}
        )
        assert too_long.status_code == 413, too_long.text
        assert error_code(too_long) == "prompt_too_long"

        failed = await client.post("/ask/sse-err/stream", json={"prompt": "x [[fake:status=500]]"})
        assert failed.status_code == 502, failed.text
        assert error_code(failed) == "upstream_error"

        limited = await client.post("/ask/sse-err/stream", json={"prompt": "x [[fake:status=429]]"})
        assert limited.status_code == 429, limited.text
        assert error_code(limited) == "upstream_rate_limited"
    assert stored_turns(server.settings.sqlite_path, "sse-err") == []


async def test_upstream_disconnect_mid_stream_gives_one_error_event_and_stores_nothing(server):
    async with server.client() as client:
        response = await client.post(
            "/ask/sse-drop/stream", json={"prompt": "a b c d e f [[fake:disconnect_after=3]]"}
        )
        assert response.status_code == 200
        events = parse_sse(response.text)
        names = [name for name, _ in events]
        assert names == ["delta"] * (len(names) - 1) + ["error"] and len(names) > 1, names
        assert "".join(d["text"] for _, d in events[:-1]) == "echo(1): a b"
        error = events[-1][1]
        assert error["code"] == "upstream_error" and "broke off" in error["message"], error
        assert error["message"]
        assert stored_turns(server.settings.sqlite_path, "sse-drop") == []

        # the conversation carries no trace of it
        after = await client.post("/ask/sse-drop/stream", json={"prompt": "again"})
        assert [n for n, _ in parse_sse(after.text)][-1] == "end"
    assert upstream_messages(server.fake) == [{"role": "user", "content": "again"}]
    assert [t["prompt"] for t in stored_turns(server.settings.sqlite_path, "sse-drop")] == ["again"]


async def test_stream_passes_unicode_and_newlines_through(server):
    prompt = '你好\n\n$ and 🎉 "quotes"\n'
    async with server.client() as client:
        response = await client.post("/ask/sse-uni/stream", json={"prompt": prompt})
    events = parse_sse(response.text)
    assert "".join(d["text"] for e, d in events if e == "delta") == echo(1, prompt)
    assert events[-1][0] == "end"
