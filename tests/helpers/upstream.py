"""The fake upstream's side: what it answers, what it received, the faults queued on it."""

from __future__ import annotations

import re
from typing import Any

import httpx2

from easybackend.fake_upstream import FakeUpstream
from easybackend.settings import DEFAULT_MODEL

# Every key the tests use contains SECRET (see helpers.logs).
UPSTREAM_KEY = "sk-test-upstream-SECRET-0123456789"

# The model tests name in a per-ask override. Only GPT_ENGINE may be named by default (MODELS):
# a server that must take it is started with ALLOW_OTHER_MODEL.
OTHER_MODEL = "other-model"
ALLOW_OTHER_MODEL = {"MODELS": f"{DEFAULT_MODEL},{OTHER_MODEL}"}

# The fake's answer is split into these pieces ("tokens"); see easybackend/fake_upstream.py.
PIECES = re.compile(r"\s*\S+|\s+")


def echo(messages: int, text: str) -> str:
    """The fake upstream's answer to a request of ``messages`` messages whose last user text is ``text``."""
    return f"echo({messages}): {text}"


def full_answer(messages: int, text: str, tokens: int) -> str:
    """The fake's whole answer under ``[[fake:tokens=N]]`` (``text`` without the directives)."""
    pieces = PIECES.findall(echo(messages, text.strip()))
    pieces = (pieces + [f" t{i}" for i in range(1, tokens - len(pieces) + 1)])[:tokens]
    return "".join(pieces)


def user(text: str) -> list[dict[str, str]]:
    """The messages of a one-prompt chat completion request."""
    return [{"role": "user", "content": text}]


def upstream_messages(fake: FakeUpstream, index: int = -1) -> list[dict[str, str]]:
    """The ``messages`` of one completion request the fake received."""
    return fake.requests[index]["body"]["messages"]


def roles_and_contents(messages: list[dict[str, str]]) -> list[tuple[str, str]]:
    """(role, content) of each message: ``roles_and_contents(upstream_messages(fake))``."""
    return [(m["role"], m["content"]) for m in messages]


def history_of(messages: list[dict[str, str]]) -> list[tuple[str, str]]:
    """The (prompt, answer) turns a request carried before its new prompt; checks the roles."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    roles = [m["role"] for m in body]
    assert roles == ["user", "assistant"] * (len(body) // 2) + ["user"], roles
    return [(body[i]["content"], body[i + 1]["content"]) for i in range(0, len(body) - 1, 2)]


def events_of(fake: FakeUpstream, request_id: str) -> list[str]:
    return [e["event"] for e in fake.events if e["id"] == request_id]


def started_times(fake: FakeUpstream) -> list[float]:
    return [event["time"] for event in fake.events if event["event"] == "started"]


async def queue_faults(fake: FakeUpstream, *faults: dict[str, Any]) -> None:
    """Queue faults on the fake (FIFO, one per completion request), through its HTTP endpoint."""
    async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{fake.port}", timeout=5) as client:
        response = await client.post("/_fake/faults", json=list(faults))
    assert response.status_code == 200, response.text
