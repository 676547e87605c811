"""Memory beyond the window (easybackend/chat/memory.py): summary calls the fake received, the
asks among them, conversations made to look idle, waiting for background work."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import httpx2
import psycopg
import trio

from easybackend.chat.memory import DEFAULT_SUMMARY_PROMPT, DEFAULT_TITLE_PROMPT, SUMMARY_PREFIX
from easybackend.fake_upstream import FakeUpstream
from easybackend.settings import Settings

from .database import db_rows
from .waiting import wait_until


def _system(request: dict[str, Any]) -> str | None:
    messages = request["body"]["messages"]
    return messages[0]["content"] if messages and messages[0]["role"] == "system" else None


def summary_requests(fake: FakeUpstream, prompt: str = DEFAULT_SUMMARY_PROMPT) -> list[dict]:
    """The completion requests that were summary calls (their system message is the prompt)."""
    return [request for request in fake.requests if _system(request) == prompt]


def title_requests(fake: FakeUpstream) -> list[dict]:
    return summary_requests(fake, DEFAULT_TITLE_PROMPT)


def ask_requests(fake: FakeUpstream) -> list[dict]:
    """The completion requests that were asks (not summary or title calls)."""
    calls = (DEFAULT_SUMMARY_PROMPT, DEFAULT_TITLE_PROMPT)
    return [request for request in fake.requests if _system(request) not in calls]


def summary_message(messages: list[dict[str, str]]) -> str | None:
    """The summary an ask's request carried (the text after SUMMARY_PREFIX), or None."""
    for message in messages:
        if message["role"] == "system" and message["content"].startswith(SUMMARY_PREFIX):
            return message["content"].removeprefix(SUMMARY_PREFIX)
    return None


async def summary_of(client: httpx2.AsyncClient, conversation_id: str) -> dict[str, Any]:
    response = await client.get(f"/conversations/{conversation_id}/summary")
    assert response.status_code == 200, response.text
    return response.json()


async def wait_for_summary(
    client: httpx2.AsyncClient,
    conversation_id: str,
    done: Callable[[dict[str, Any]], bool] = lambda body: body["covers"] > 0,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Poll GET …/summary until ``done`` holds for its body; returns the body."""
    seen: dict[str, Any] = {}

    async def check() -> bool:
        seen.update(await summary_of(client, conversation_id))
        return done(seen)

    with trio.fail_after(timeout):
        while not await check():
            await trio.sleep(0.02)
    return seen


def age(settings: Settings, conversation_id: str, seconds: float, owner: str = "") -> None:
    """Make the conversation look idle for ``seconds`` more: move its last activity back."""
    if settings.database.is_postgres:
        with psycopg.connect(settings.database_url, autocommit=True) as connection:
            changed = connection.execute(
                "UPDATE conversations SET updated_at = updated_at - %s"
                " WHERE owner = %s AND conversation_id = %s",
                (seconds, owner, conversation_id),
            ).rowcount
    else:
        db = sqlite3.connect(settings.sqlite_path)
        try:
            with db:
                changed = db.execute(
                    "UPDATE conversations SET updated_at = updated_at - ?"
                    " WHERE owner = ? AND conversation_id = ?",
                    (seconds, owner, conversation_id),
                ).rowcount
        finally:
            db.close()
    assert changed == 1, f"no conversation {conversation_id!r} to age"


def conversation_ids(settings: Settings) -> set[str]:
    """Every conversation id the server's database holds (expired ones included)."""
    if settings.database.is_postgres:
        with psycopg.connect(settings.database_url, autocommit=True) as connection:
            return {
                row[0] for row in connection.execute("SELECT conversation_id FROM conversations")
            }
    return {
        row[0] for row in db_rows(settings.sqlite_path, "SELECT conversation_id FROM conversations")
    }


async def wait_gone(settings: Settings, conversation_id: str, timeout: float = 10.0) -> None:
    """Wait until the database no longer holds the conversation (the sweep deleted it)."""
    await wait_until(lambda: conversation_id not in conversation_ids(settings), timeout)
