"""The fake OpenAI upstream, driven over loopback by the real ``openai`` SDK and by raw HTTP."""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx2
import openai
import pytest
import trio
from helpers.upstream import PIECES, events_of, user
from helpers.waiting import wait_until

from easybackend.fake_upstream import FakeUpstream, _Reply


@asynccontextmanager
async def serving(fake: FakeUpstream) -> AsyncIterator[FakeUpstream]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(fake.serve)
        assert port == fake.port
        yield fake
        nursery.cancel_scope.cancel()


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with serving(FakeUpstream()) as fake:
        yield fake


@pytest.fixture
async def client(upstream: FakeUpstream) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=upstream.base_url(), api_key="k", max_retries=0) as c:
        yield c


@pytest.fixture
async def control(upstream: FakeUpstream) -> AsyncIterator[httpx2.AsyncClient]:
    root = upstream.base_url().removesuffix("/v1")
    async with httpx2.AsyncClient(base_url=root, timeout=5) as http:
        yield http


async def test_non_streaming_answer_and_usage(upstream, client):
    messages = [{"role": "system", "content": "be brief"}, *user("hello there world")]
    reply = await client.chat.completions.create(model="my-model", messages=messages)
    answer = "echo(2): hello there world"
    assert reply.choices[0].message.content == answer
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.model == "my-model" and reply.object == "chat.completion"
    assert reply.id == upstream.requests[0]["id"]
    assert reply.usage.prompt_tokens == (2 + 4) + (3 + 4)
    assert reply.usage.completion_tokens == len(PIECES.findall(answer)) == 4
    assert reply.usage.total_tokens == 17
    assert events_of(upstream, reply.id) == ["started", "completed"]


async def test_streamed_deltas_join_to_the_exact_multiline_answer(upstream, client):
    prompt = "first line\n\n  costs $5 or $HOME ${x}\n\n\n\tlast  \n"
    history = [*user("earlier"), {"role": "assistant", "content": "ok"}, *user(prompt)]
    with trio.fail_after(5):
        stream = await client.chat.completions.create(
            model="m", messages=history, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    answer = f"echo(3): {prompt}"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    contents = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert contents == PIECES.findall(answer)
    assert "".join(contents) == answer
    finishes = [c.choices[0].finish_reason for c in chunks[:-1]]
    assert finishes == [None] * (len(chunks) - 2) + ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == len(contents)
    assert chunks[-1].usage.prompt_tokens == (1 + 4) + (1 + 4) + (len(prompt.split()) + 4)
    assert all(c.usage is None for c in chunks[:-1])
    assert {c.id for c in chunks} == {upstream.requests[0]["id"]}
    assert {(c.model, c.object) for c in chunks} == {("m", "chat.completion.chunk")}
    await wait_until(lambda: "completed" in events_of(upstream, chunks[0].id))
    assert upstream.events[-1]["chunks"] == len(contents)


async def test_sse_wire_format(upstream, control):
    body = {"model": "m", "messages": user("a b"), "stream": True}
    with trio.fail_after(5):
        async with control.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            text = (await response.aread()).decode()
    frames = text.split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""]
    assert all(f.startswith("data: ") for f in frames[:-1])
    chunks = [json.loads(f.removeprefix("data: ")) for f in frames[:-2]]
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": ""},
        {"content": "echo(1):"},
        {"content": " a"},
        {"content": " b"},
        {},
    ]
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk" and chunk["model"] == "m"
        assert chunk["id"] == "chatcmpl-1" and isinstance(chunk["created"], int)
        assert "usage" not in chunk  # only sent as null when include_usage was asked for


async def test_max_tokens_cuts_the_answer_with_finish_reason_length(client):
    reply = await client.chat.completions.create(model="m", messages=user("a b c"), max_tokens=2)
    assert reply.choices[0].message.content == "echo(1): a"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 2
    with trio.fail_after(5):
        stream = await client.chat.completions.create(
            model="m", messages=user("a b c"), max_completion_tokens=3, stream=True
        )
        chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "echo(1): a b"
    assert chunks[-1].choices[0].finish_reason == "length"
    exact = await client.chat.completions.create(model="m", messages=user("a b c"), max_tokens=4)
    assert exact.choices[0].finish_reason == "stop"


async def test_requests_are_recorded_in_arrival_order(upstream, client):
    first = [{"role": "system", "content": "sys"}, *user("one")]
    second = user("two")
    await client.chat.completions.create(model="m", messages=first, temperature=0.5)
    await client.chat.completions.create(model="m", messages=second, stream=False)
    assert [r["body"]["messages"] for r in upstream.requests] == [first, second]
    assert upstream.requests[0]["body"]["temperature"] == 0.5
    assert upstream.requests[0]["headers"]["authorization"] == "Bearer k"
    assert upstream.requests[0]["headers"]["content-type"] == "application/json"
    assert [r["id"] for r in upstream.requests] == ["chatcmpl-1", "chatcmpl-2"]
    assert [r["fault"] for r in upstream.requests] == [None, None]


async def test_injected_status_with_retry_after(upstream, client):
    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(
            model="m", messages=user("x [[fake:status=429]] [[fake:retry_after=2]]")
        )
    assert limited.value.status_code == 429
    assert limited.value.response.headers["retry-after"] == "2"
    assert limited.value.code == "rate_limit_exceeded"
    assert upstream.requests[-1]["fault"] == {"status": 429, "retry_after": 2}
    assert events_of(upstream, "chatcmpl-1") == ["started", "failed"]

    with pytest.raises(openai.InternalServerError) as failed:
        await client.chat.completions.create(
            model="m", messages=user("[[fake:status=500]]"), stream=True
        )
    assert failed.value.status_code == 500
    assert "retry-after" not in failed.value.response.headers
    assert failed.value.body["type"] == "server_error"


async def test_disconnect_after_breaks_the_stream_mid_body(upstream, client):
    prompt = "one two three four five [[fake:disconnect_after=3]]"
    received: list[str] = []
    with trio.fail_after(5):
        stream = await client.chat.completions.create(model="m", messages=user(prompt), stream=True)
        with pytest.raises(openai.APIConnectionError) as broken:
            async for chunk in stream:
                received.append(chunk.choices[0].delta.content)
    assert isinstance(broken.value.__cause__, httpx2.RemoteProtocolError)
    assert "incomplete chunked read" in str(broken.value.__cause__)
    assert received == ["", "echo(1):", " one", " two"]
    assert upstream.events[-1] == {**upstream.events[-1], "event": "failed", "chunks": 3}

    with trio.fail_after(5), pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(model="m", messages=user(prompt))
    assert events_of(upstream, "chatcmpl-2") == ["started", "failed"]
    # the connection pool recovers: the next request works
    reply = await client.chat.completions.create(model="m", messages=user("fine"))
    assert reply.choices[0].message.content == "echo(1): fine"


async def test_stall_then_client_timeout_is_seen_as_disconnect(upstream, client):
    received: list[str] = []
    with trio.fail_after(5):
        stream = await client.with_options(timeout=0.5).chat.completions.create(
            model="m", messages=user("a b c d [[fake:stall_after=2]]"), stream=True
        )
        with pytest.raises(openai.APITimeoutError):
            async for chunk in stream:
                received.append(chunk.choices[0].delta.content)
    assert received == ["", "echo(1):", " a"]
    await wait_until(lambda: "disconnected" in events_of(upstream, "chatcmpl-1"))
    assert events_of(upstream, "chatcmpl-1") == ["started", "stalled", "disconnected"]
    stalled, gone = upstream.events[-2:]
    assert stalled["chunks"] == gone["chunks"] == 2
    assert gone["time"] - stalled["time"] >= 0.4


async def test_closing_the_stream_early_is_noticed_within_a_second(upstream, client):
    with trio.fail_after(5):
        stream = await client.chat.completions.create(
            model="m", messages=user("[[fake:tokens=500]][[fake:delay=0.02]] long"), stream=True
        )
        count = 0
        async for _ in stream:
            count += 1
            if count == 2:
                break
        await stream.close()
    with trio.fail_after(1):
        await wait_until(lambda: "disconnected" in events_of(upstream, "chatcmpl-1"))
    assert events_of(upstream, "chatcmpl-1") == ["started", "disconnected"]
    assert 1 <= upstream.events[-1]["chunks"] < 10


async def test_wrong_api_key_is_rejected_without_echoing_it():
    async with serving(FakeUpstream(api_key="sk-right", model="gpt-fake")) as fake:
        wrong = openai.AsyncOpenAI(base_url=fake.base_url(), api_key="sk-wrong-1234", max_retries=0)
        right = openai.AsyncOpenAI(base_url=fake.base_url(), api_key="sk-right", max_retries=0)
        async with wrong, right:
            with pytest.raises(openai.AuthenticationError) as denied:
                await wrong.chat.completions.create(model="m", messages=user("hi"))
            assert denied.value.status_code == 401
            assert denied.value.code == "invalid_api_key"
            assert "sk-wrong" not in denied.value.response.text
            with pytest.raises(openai.AuthenticationError):
                await wrong.models.list()
            assert events_of(fake, "chatcmpl-1") == ["started", "failed"]

            reply = await right.chat.completions.create(model="m", messages=user("hi"))
            assert reply.choices[0].message.content == "echo(1): hi"
            models = await right.models.list()
            assert [(m.id, m.owned_by) for m in models.data] == [("gpt-fake", "easybackend-fake")]


async def test_control_endpoints_queue_faults_and_reset(upstream, client, control):
    queued = await control.post("/_fake/faults", json=[{"status": 503}, {"tokens": 5}])
    assert queued.status_code == 200 and queued.json() == {"queued": 2}
    with pytest.raises(openai.InternalServerError) as unavailable:
        await client.chat.completions.create(model="m", messages=user("hi"))
    assert unavailable.value.status_code == 503
    reply = await client.chat.completions.create(model="m", messages=user("hi"))
    assert reply.choices[0].message.content == "echo(1): hi t1 t2 t3"
    reply = await client.chat.completions.create(model="m", messages=user("hi"))
    assert reply.choices[0].message.content == "echo(1): hi"  # the queue is empty again

    requests = (await control.get("/_fake/requests")).json()
    assert [r["fault"] for r in requests] == [{"status": 503}, {"tokens": 5}, None]
    assert requests[0]["body"]["messages"] == user("hi")
    events = (await control.get("/_fake/events")).json()
    assert [(e["id"], e["event"]) for e in events] == [
        ("chatcmpl-1", "started"),
        ("chatcmpl-1", "failed"),
        ("chatcmpl-2", "started"),
        ("chatcmpl-2", "completed"),
        ("chatcmpl-3", "started"),
        ("chatcmpl-3", "completed"),
    ]

    bad = await control.post("/_fake/faults", json=[{"status": "soon"}])
    assert bad.status_code == 400 and "status" in bad.json()["error"]["message"]
    assert (await control.post("/_fake/faults", json=[{"explode": 1}])).status_code == 400
    assert (await control.post("/_fake/faults", json=[{"status": 500}])).status_code == 200
    assert (await control.post("/_fake/reset")).status_code == 200
    assert upstream.requests == [] and upstream.events == []
    assert (await control.get("/_fake/requests")).json() == []
    reply = await client.chat.completions.create(model="m", messages=user("after reset"))
    assert reply.choices[0].message.content == "echo(1): after reset"  # fault was dropped

    missing = await control.get("/nowhere")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_url"


async def test_inline_directives_win_over_queued_ones_and_are_not_echoed(upstream, client, control):
    await control.post("/_fake/faults", json=[{"tokens": 3, "delay": 0}])
    reply = await client.chat.completions.create(
        model="m", messages=user("  [[fake:tokens=6]] hey  there ")
    )
    assert reply.choices[0].message.content == "echo(1): hey  there t1 t2 t3"
    assert upstream.requests[-1]["fault"] == {"tokens": 6, "delay": 0}
    short = await client.chat.completions.create(
        model="m", messages=user("a b c [[fake:tokens=2]]")
    )
    assert short.choices[0].message.content == "echo(1): a"
    assert short.choices[0].finish_reason == "stop"


async def test_invalid_requests_get_openai_style_400(upstream, client, control):
    garbled = await control.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert garbled.status_code == 400
    assert garbled.json()["error"]["type"] == "invalid_request_error"
    assert upstream.requests[-1]["body"] == "{not json"
    empty = await control.post("/v1/chat/completions", json={"model": "m"})
    assert empty.status_code == 400 and "messages" in empty.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="m", messages=user("[[fake:tokens=many]]"))
    assert [e["event"] for e in upstream.events] == ["started", "failed"] * 3


async def test_delays_slow_every_token():
    async with serving(FakeUpstream(token_delay=0.05)) as fake:
        async with openai.AsyncOpenAI(base_url=fake.base_url(), api_key="k", max_retries=0) as c:
            start = trio.current_time()
            stream = await c.chat.completions.create(model="m", messages=user("a b c"), stream=True)
            assert len([chunk async for chunk in stream]) == 6
            assert trio.current_time() - start >= 4 * 0.05
            start = trio.current_time()
            reply = await c.chat.completions.create(
                model="m", messages=user("[[fake:delay=0.1]] a b")
            )
            assert reply.choices[0].message.content == "echo(1): a b"
            assert trio.current_time() - start >= 3 * 0.1


async def test_tokens_come_at_a_steady_rate_however_slow_sending_is(autojump_clock):
    """Token i is due i delays after the start: time spent sending does not add up.

    On trio's virtual clock, so the figures are exact whatever the machine's load.
    """
    reply = _Reply("r", "m", ["a", " b", " c", " d"], "stop", {}, {}, 0.05, False)
    sent_at: list[float] = []

    async def slow_emit(piece: str) -> None:
        await trio.sleep(0.03)  # sending takes most of the delay
        sent_at.append(trio.current_time())

    start = trio.current_time()
    assert await FakeUpstream()._produce(reply, slow_emit)
    # due at 0.05, 0.10, 0.15, 0.20, each sent 0.03 s later; adding up the sending time
    # would give 0.08, 0.16, 0.24, 0.32
    assert [round(t - start, 6) for t in sent_at] == [0.08, 0.13, 0.18, 0.23]


async def test_keep_alive_serves_several_requests_on_one_connection(upstream):
    request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", upstream.port)
        async with stream:
            for _ in range(3):
                await stream.send_all(request)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += await stream.receive_some(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200")
                assert b"connection: close" not in head.lower()
                length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
                while len(body) < length:
                    body += await stream.receive_some(65536)
                assert json.loads(body)["data"][0]["id"] == "fake-model"


async def test_many_concurrent_streams(upstream, client):
    results: dict[int, str] = {}

    async def ask(i: int) -> None:
        stream = await client.chat.completions.create(
            model="m", messages=user(f"n{i} [[fake:tokens=20]] [[fake:delay=0.01]]"), stream=True
        )
        results[i] = "".join([c.choices[0].delta.content or "" async for c in stream])

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(ask, i)
    tail = "".join(f" t{k}" for k in range(1, 19))
    assert results == {i: f"echo(1): n{i}{tail}" for i in range(200)}
    in_flight = most = 0
    for event in upstream.events:
        in_flight += 1 if event["event"] == "started" else -1
        most = max(most, in_flight)
    assert in_flight == 0 and most >= 50


async def test_cancelling_serve_closes_everything_quietly(caplog):
    caplog.set_level(logging.DEBUG)
    fake = FakeUpstream()
    errors: list[BaseException] = []
    async with trio.open_nursery() as outer:
        with trio.CancelScope() as server_scope:
            async with trio.open_nursery() as server:
                await server.start(fake.serve)
                port = fake.port
                client = openai.AsyncOpenAI(base_url=fake.base_url(), api_key="k", max_retries=0)

                async def stalled() -> None:
                    stream = await client.chat.completions.create(
                        model="m", messages=user("x [[fake:stall_after=1]]"), stream=True
                    )
                    try:
                        async for _ in stream:
                            pass
                    except openai.APIError as exc:
                        errors.append(exc)

                outer.start_soon(stalled)
                await wait_until(lambda: "stalled" in events_of(fake, "chatcmpl-1"), 5)
                server_scope.cancel()
        assert fake.port is None
        with trio.fail_after(2):
            while not errors:
                await trio.sleep(0.005)
    await client.close()
    assert isinstance(errors[0], openai.APIConnectionError)
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert noisy == []
    with pytest.raises(RuntimeError):
        fake.base_url()


async def test_standalone_process_prints_its_url_answers_and_stops_on_sigint():
    command = [sys.executable, "-m", "easybackend.fake_upstream", "--port", "0"]
    command += ["--api-key", "sk-demo", "--model", "demo-model", "--token-delay", "0.001"]
    process = await trio.lowlevel.open_process(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        line = b""
        with trio.fail_after(15):
            while not line.endswith(b"\n"):
                data = await process.stdout.receive_some(4096)
                assert data, "the process exited before announcing itself"
                line += data
        match = re.fullmatch(rb"fake upstream listening on (http://127\.0\.0\.1:\d+/v1)\n", line)
        assert match, line
        url = match.group(1).decode()
        async with openai.AsyncOpenAI(base_url=url, api_key="sk-demo", max_retries=0) as c:
            with trio.fail_after(5):
                reply = await c.chat.completions.create(model="m", messages=user("ping"))
                models = await c.models.list()
        assert reply.choices[0].message.content == "echo(1): ping"
        assert [m.id for m in models.data] == ["demo-model"]
        process.send_signal(signal.SIGINT)
        with trio.fail_after(5):
            assert await process.wait() == 0
        errors = b""
        while data := await process.stderr.receive_some(4096):
            errors += data
        assert b"Traceback" not in errors and errors == b"", errors
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_help_describes_the_directives():
    result = await trio.run_process(
        [sys.executable, "-m", "easybackend.fake_upstream", "--help"], capture_stdout=True
    )
    text = result.stdout.decode()
    for needle in ("--token-delay", "--api-key", "--model", "[[fake:key=value]]", "/_fake/faults"):
        assert needle in text
