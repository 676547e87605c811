"""The webhook of background answers (SPEC §18, easybackend/chat/webhooks.py).

A real receiver on loopback (helpers/webhook_receiver.py) records every
request; signatures are checked with the test's own HMAC computation as
well as with ``verify_signature``. Backoffs are made short through the
class attributes (``backoff_base``), never by sleeping seconds.
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import inspect
import itertools
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
import trio
from helpers.servers import clean_env, free_port, run_cli
from helpers.upstream import UPSTREAM_KEY
from helpers.webhook_receiver import Reply, WebhookReceiver

from easybackend.chat.webhooks import Webhooks, retry_after_seconds, shown_url, verify_signature
from easybackend.logs import RedactingFormatter, secrets_of
from easybackend.settings import ConfigError, Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
WEBHOOK_SECRET = "whsec-test-SECRET-0123456789"  # contains SECRET: the log watch fails on it
QUERY_TOKEN = "token=query-SECRET-42"  # a token in the URL's query must not be logged either
EVENT = {
    "type": "answer.completed",
    "conversation_id": "123",
    "turn_id": "5c668971bf44ff809097e1a5",
    "status": "completed",
    "finish_reason": "stop",
    "model": "gpt-4.1-mini",
    "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21},
    "created_at": 1_800_000_000,
    "text": "你好！Once upon a time…",
}


def webhook_settings(url: str, **env: str) -> Settings:
    return load_settings(
        environ={"WEBHOOK_URL": url, "WEBHOOK_SECRET": WEBHOOK_SECRET, **env},
        env_file=None,
        need_api_key=False,
    )


def hand_signature(timestamp: str, body: bytes, secret: str = WEBHOOK_SECRET) -> str:
    """The signature computed here, independently of the module."""
    message = timestamp.encode() + b"." + body
    return "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def ticking_clock(start: int = 1_800_000_000, step: int = 7) -> Iterator[float]:
    return itertools.count(start, step)


@pytest.fixture
async def receiver(nursery: trio.Nursery) -> WebhookReceiver:
    served = WebhookReceiver()
    await nursery.start(served.serve)
    return served


async def started(nursery: trio.Nursery, url: str, **env: str) -> Webhooks:
    webhooks = Webhooks(webhook_settings(url, **env))
    webhooks.backoff_base = 0.01
    await nursery.start(webhooks.run)
    return webhooks


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "easybackend.webhooks" and record.levelno >= logging.WARNING
    ]


async def test_a_delivery_is_signed_json_with_its_headers(nursery, receiver):
    webhooks = await started(nursery, receiver.url(f"/hooks/answers?{QUERY_TOKEN}"))
    before = int(time.time())
    assert webhooks.notify(EVENT) is True
    (request,) = await receiver.wait_for(1)

    assert request.method == "POST"
    assert request.target == f"/hooks/answers?{QUERY_TOKEN}"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == "EasyBackend"
    assert request.body == json.dumps(EVENT, ensure_ascii=False, separators=(",", ":")).encode()
    assert json.loads(request.body.decode("utf-8")) == EVENT
    timestamp = request.headers["x-easybackend-timestamp"]
    assert before <= int(timestamp) <= int(time.time())
    signature = request.headers["x-easybackend-signature"]
    assert signature == hand_signature(timestamp, request.body)
    assert len(request.headers["x-easybackend-delivery"]) >= 16

    assert verify_signature(WEBHOOK_SECRET, timestamp, request.body, signature)
    assert not verify_signature("another-secret-0123456789", timestamp, request.body, signature)
    assert not verify_signature(WEBHOOK_SECRET, timestamp, request.body + b" ", signature)
    assert not verify_signature(WEBHOOK_SECRET, str(int(timestamp) + 1), request.body, signature)
    stale, future = int(timestamp) + 301, int(timestamp) - 301
    assert not verify_signature(WEBHOOK_SECRET, timestamp, request.body, signature, now=stale)
    assert not verify_signature(WEBHOOK_SECRET, timestamp, request.body, signature, now=future)
    assert verify_signature(WEBHOOK_SECRET, timestamp, request.body, signature, now=stale - 2)
    assert not verify_signature(WEBHOOK_SECRET, "soon", request.body, signature)
    assert not verify_signature(WEBHOOK_SECRET, timestamp, request.body, "sha256=zz")

    await webhooks.stop(grace=5)
    assert webhooks.notify(EVENT) is False  # stopped: nothing is taken any more


async def test_two_events_have_two_delivery_ids(nursery, receiver):
    webhooks = await started(nursery, receiver.url())
    assert webhooks.notify(EVENT) and webhooks.notify({**EVENT, "type": "answer.failed"})
    first, second = await receiver.wait_for(2)
    assert first.headers["x-easybackend-delivery"] != second.headers["x-easybackend-delivery"]
    assert {json.loads(first.body)["type"], json.loads(second.body)["type"]} == {
        "answer.completed",
        "answer.failed",
    }
    await webhooks.stop(grace=5)


async def test_500_is_retried_with_the_same_delivery_id_and_a_fresh_timestamp(
    nursery, receiver, caplog
):
    receiver.replies.extend([Reply(500), Reply(503), Reply(200)])
    webhooks = await started(nursery, receiver.url(f"/hook?{QUERY_TOKEN}"))
    clock = ticking_clock()
    webhooks.clock = lambda: next(clock)
    assert webhooks.notify(EVENT)
    await receiver.wait_for(3)
    await webhooks.stop(grace=5)  # returns once the delivery has ended: no 4th attempt
    assert len(receiver.requests) == 3

    ids = {request.headers["x-easybackend-delivery"] for request in receiver.requests}
    assert len(ids) == 1
    (delivery_id,) = ids
    stamps = [request.headers["x-easybackend-timestamp"] for request in receiver.requests]
    assert stamps == ["1800000000", "1800000007", "1800000014"]
    for request, stamp in zip(receiver.requests, stamps, strict=True):
        assert request.body == receiver.requests[0].body
        signature = request.headers["x-easybackend-signature"]
        assert signature == hand_signature(stamp, request.body)
        assert verify_signature(WEBHOOK_SECRET, stamp, request.body, signature, now=int(stamp))

    warnings = warnings_of(caplog)
    assert len(warnings) == 2, warnings
    assert "HTTP 500" in warnings[0] and "retry 1 of 5" in warnings[0], warnings
    assert "HTTP 503" in warnings[1] and "retry 2 of 5" in warnings[1], warnings
    assert all(delivery_id in line for line in warnings), warnings
    for line in warnings:
        assert "/hook" in line and "query-SECRET" not in line and "token=" not in line, line
        assert WEBHOOK_SECRET not in line, line


async def test_400_is_not_retried(nursery, receiver, caplog):
    receiver.replies.append(Reply(400))
    webhooks = await started(nursery, receiver.url())
    assert webhooks.notify(EVENT)
    await receiver.wait_for(1)
    await webhooks.stop(grace=5)
    assert len(receiver.requests) == 1
    (warning,) = warnings_of(caplog)
    assert "HTTP 400" in warning and "not retried" in warning, warning


async def test_the_retries_are_bounded_by_webhook_retries(nursery, receiver, caplog):
    receiver.default = Reply(502)
    webhooks = await started(nursery, receiver.url(), WEBHOOK_RETRIES="2")
    assert webhooks.notify(EVENT)
    await receiver.wait_for(3)
    await webhooks.stop(grace=5)
    assert len(receiver.requests) == 3
    assert "given up after 2 retries" in warnings_of(caplog)[-1]


async def test_a_refused_connection_is_retried_and_logged(nursery, caplog):
    url = f"http://127.0.0.1:{free_port()}/hook?{QUERY_TOKEN}"  # nothing listens there
    webhooks = await started(nursery, url, WEBHOOK_RETRIES="1")
    assert webhooks.notify(EVENT)
    with trio.fail_after(5):
        await webhooks.stop(grace=5)
    warnings = warnings_of(caplog)
    assert len(warnings) == 2, warnings
    assert "ConnectError" in warnings[0] and "retry 1 of 1" in warnings[0], warnings
    assert "given up after 1 retries" in warnings[1], warnings
    assert all("token=" not in line and "SECRET" not in line for line in warnings), warnings


async def test_retry_after_is_honoured(nursery, receiver):
    receiver.replies.extend(
        [Reply(429, (("Retry-After", "0.4"),)), Reply(503, (("Retry-After", "0"),)), Reply(204)]
    )
    webhooks = await started(nursery, receiver.url())
    webhooks.backoff_base = 0.001  # the backoff alone would retry at once
    assert webhooks.notify(EVENT)
    first, second, third = await receiver.wait_for(3)
    assert 0.4 <= second.at - first.at < 3, second.at - first.at
    assert third.at - second.at < 0.4
    await webhooks.stop(grace=5)


def test_retry_after_and_the_url_shown_in_the_log():
    assert retry_after_seconds(httpx2.Headers({"Retry-After": "12"})) == 12
    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= retry_after_seconds(httpx2.Headers({"Retry-After": in_a_minute})) <= 61
    assert retry_after_seconds(httpx2.Headers({"Retry-After": "soon"})) is None
    assert retry_after_seconds(httpx2.Headers({"Retry-After": "-3"})) == 0
    assert retry_after_seconds(httpx2.Headers({})) is None
    shown = shown_url("https://user:pw-SECRET@hooks.example.com:8443/in/answers?token=SECRET#x")
    assert shown == "https://hooks.example.com:8443/in/answers"
    assert shown_url("http://[::1]/") == "http://[::1]/"


async def test_notify_never_blocks_when_the_receiver_hangs(nursery, receiver, caplog):
    receiver.default = Reply(hang=True)
    webhooks = await started(nursery, receiver.url(), WEBHOOK_TIMEOUT="0.3", WEBHOOK_RETRIES="1")
    assert not inspect.iscoroutinefunction(Webhooks.notify)
    with trio.CancelScope() as scope:  # noqa: ASYNC100 - the point: no checkpoint inside
        scope.cancel()  # notify takes no checkpoint: it queues and returns, even here
        assert webhooks.notify(EVENT) is True
        assert webhooks.notify(EVENT) is True
    first, second, *_ = await receiver.wait_for(2)
    assert webhooks.pending == 2
    assert webhooks.notify(EVENT) is True  # while both hang
    await receiver.wait_dropped(2)  # each attempt is abandoned after WEBHOOK_TIMEOUT
    requests = await receiver.wait_for(6)  # 3 events, each tried twice
    by_id: dict[str, list[float]] = {}
    for request in requests:
        by_id.setdefault(request.headers["x-easybackend-delivery"], []).append(request.at)
    assert sorted(len(times) for times in by_id.values()) == [2, 2, 2]
    for first_at, retried_at in by_id.values():
        assert 0.3 <= retried_at - first_at < 3, (first_at, retried_at)
    with trio.fail_after(5):
        await webhooks.stop(grace=5)
    assert webhooks.pending == 0
    assert any("no answer within 0.3 s" in line for line in warnings_of(caplog))


async def test_too_many_pending_deliveries_are_refused_with_one_warning(nursery, receiver, caplog):
    receiver.default = Reply(hang=True)
    webhooks = await started(nursery, receiver.url(), WEBHOOK_TIMEOUT="30")
    webhooks.max_pending = 3
    assert [webhooks.notify(EVENT) for _ in range(6)] == [True, True, True, False, False, False]
    overflow = [line for line in warnings_of(caplog) if "pending" in line]
    assert len(overflow) == 1, overflow
    await receiver.wait_for(3)
    await webhooks.stop(grace=0)


async def test_stop_cancels_what_the_grace_did_not_finish(nursery, receiver):
    receiver.default = Reply(hang=True)
    webhooks = await started(nursery, receiver.url(), WEBHOOK_TIMEOUT="30")
    assert webhooks.notify(EVENT)
    await receiver.wait_for(1)
    began = trio.current_time()
    with trio.fail_after(5):
        await webhooks.stop(grace=0.3)
    assert 0.3 <= trio.current_time() - began < 5
    assert webhooks.pending == 0
    await receiver.wait_dropped(1)  # the request in flight was dropped, its connection closed
    assert len(receiver.requests) == 1
    assert webhooks.notify(EVENT) is False


async def test_stop_lets_a_pending_delivery_finish_within_the_grace(nursery, receiver):
    receiver.replies.extend([Reply(500), Reply(500)])
    webhooks = await started(nursery, receiver.url())
    webhooks.backoff_base = 0.2
    assert webhooks.notify(EVENT)
    await receiver.wait_for(1)
    with trio.fail_after(10):
        await webhooks.stop(grace=10)  # the two retries happen during the grace
    assert len(receiver.requests) == 3
    assert (
        receiver.requests[-1].headers["x-easybackend-delivery"]
        == (receiver.requests[0].headers["x-easybackend-delivery"])
    )


async def test_notify_is_refused_without_a_webhook_or_a_running_service(nursery, receiver):
    unconfigured = Webhooks(load_settings(environ={}, env_file=None, need_api_key=False))
    assert unconfigured.configured is False
    await nursery.start(unconfigured.run)  # returns at once
    assert unconfigured.notify(EVENT) is False
    await unconfigured.stop(grace=1)

    not_running = Webhooks(webhook_settings(receiver.url()))
    assert not_running.notify(EVENT) is False
    await not_running.stop(grace=1)  # run never ran: at once

    webhooks = await started(nursery, receiver.url())
    assert webhooks.notify({"type": "answer.completed", "text": object()}) is False
    assert webhooks.notify({"type": "answer.completed", "score": float("nan")}) is False
    await webhooks.stop(grace=1)
    assert receiver.requests == []


@pytest.mark.parametrize(
    "env, mentions",
    [
        ({"WEBHOOK_URL": "https://hooks.example.com/x"}, "WEBHOOK_SECRET must be set"),
        (
            {"WEBHOOK_URL": "ftp://hooks.example.com/x", "WEBHOOK_SECRET": WEBHOOK_SECRET},
            "WEBHOOK_URL",
        ),
        ({"WEBHOOK_URL": "hooks.example.com/x", "WEBHOOK_SECRET": WEBHOOK_SECRET}, "WEBHOOK_URL"),
        ({"WEBHOOK_URL": "http://:80/x", "WEBHOOK_SECRET": WEBHOOK_SECRET}, "WEBHOOK_URL"),
        ({"WEBHOOK_URL": "https://h/x", "WEBHOOK_SECRET": "short-SECRET"}, "WEBHOOK_SECRET"),
        ({"WEBHOOK_TIMEOUT": "0"}, "WEBHOOK_TIMEOUT"),
        ({"WEBHOOK_RETRIES": "-1"}, "WEBHOOK_RETRIES"),
    ],
)
def test_bad_webhook_settings_are_refused(env, mentions):
    with pytest.raises(ConfigError) as refused:
        load_settings(environ=env, env_file=None, need_api_key=False)
    message = str(refused.value)
    assert mentions in message and "\n" not in message, message
    assert "SECRET" not in message.replace("WEBHOOK_SECRET", ""), message  # no value echoed
    assert "hooks.example.com" not in message, message


def test_the_webhook_defaults():
    settings = load_settings(environ={}, env_file=None, need_api_key=False)
    assert (settings.webhook_url, settings.webhook_timeout, settings.webhook_retries) == (
        None,
        10.0,
        5,
    )
    settings = webhook_settings("https://hooks.example.com/x", WEBHOOK_RETRIES="0")
    assert settings.webhook_retries == 0
    assert WEBHOOK_SECRET not in repr(settings) and "hooks.example.com" not in repr(settings)


async def test_start_up_without_the_secret_stops_with_one_line(tmp_path):
    env = clean_env(
        OPENAI_API_KEY=UPSTREAM_KEY,
        HOST="127.0.0.1",
        HTTP_PORT=str(free_port()),
        GRPC_PORT="off",
        WS_PORT="off",
        WEBHOOK_URL=f"https://hooks.example.com/x?{QUERY_TOKEN}",
    )
    result = await run_cli(tmp_path, env)
    assert result.returncode == 2
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("easybackend: error: WEBHOOK_SECRET must be set"), lines
    assert "query-SECRET" not in lines[0]


def test_the_secret_is_blanked_out_of_every_log_line():
    settings = webhook_settings("https://hooks.example.com/x")
    assert WEBHOOK_SECRET in secrets_of(settings)
    formatter = RedactingFormatter(logging.Formatter("%(message)s"), secrets_of(settings))
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "key %s", (WEBHOOK_SECRET,), None)
    assert formatter.format(record) == "key ***"


async def test_the_verification_example_of_the_docs_accepts_a_real_delivery(nursery, receiver):
    deploy = (REPO / "docs" / "deploy.md").read_text()
    section = deploy.split("## Webhook", 1)[1]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, object] = {}
    exec(compile(example, "docs/deploy.md", "exec"), namespace)
    namespace["SECRET"] = WEBHOOK_SECRET.encode()
    verified_event = namespace["verified_event"]

    webhooks = await started(nursery, receiver.url())
    assert webhooks.notify(EVENT)
    (request,) = await receiver.wait_for(1)
    await webhooks.stop(grace=5)
    headers = {
        name: request.headers[name.lower()]
        for name in ("X-EasyBackend-Timestamp", "X-EasyBackend-Signature")
    }
    assert verified_event(headers, request.body) == EVENT
    assert verified_event(headers, request.body.replace(b"123", b"124")) is None
    stale = {**headers, "X-EasyBackend-Timestamp": str(int(time.time()) - 301)}
    assert verified_event(stale, request.body) is None


def test_the_webhook_settings_are_documented_and_in_the_help():
    for readme in ("README.md", "README.zh-CN.md"):
        text = (REPO / readme).read_text()
        for variable in ("WEBHOOK_URL", "WEBHOOK_SECRET", "WEBHOOK_TIMEOUT", "WEBHOOK_RETRIES"):
            assert (
                f"| `{variable}`" in text or f"`{variable}`、" in text or f"`{variable}`," in text
            ), (
                readme,
                variable,
            )
    deploy = (REPO / "docs" / "deploy.md").read_text()
    assert "## Webhook" in deploy and "verify_signature" in deploy
    helped = subprocess.run(
        [sys.executable, "-m", "easybackend.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "--webhook-url" in helped.stdout and "WEBHOOK_SECRET" in helped.stdout
