"""The server's SQLite file, read with connections of the test's own; turns to store; and the
schema of the previous release, frozen, with the rows its writes left behind (the upgrade tests)."""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from easybackend.storage import NewTurn


def db_rows(path: Path, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
    """Run one read query on the database file with a connection of our own."""
    db = sqlite3.connect(path)
    try:
        db.row_factory = sqlite3.Row
        return db.execute(sql, tuple(params)).fetchall()
    finally:
        db.close()


def stored_turns(path: Path, conversation_id: str, owner: str = "") -> list[sqlite3.Row]:
    """The turns of one conversation, in seq order."""
    if not path.exists():
        return []
    return db_rows(
        path,
        "SELECT t.* FROM turns t JOIN conversations c ON c.pk = t.conversation_pk"
        " WHERE c.owner = ? AND c.conversation_id = ? ORDER BY t.seq",
        (owner, conversation_id),
    )


def turn_count(path: Path) -> int:
    if not path.exists():
        return 0
    return db_rows(path, "SELECT count(*) FROM turns")[0][0]


def sample_turn(
    prompt: str, answer: str = "", *, tokens: int = 10, at: float | None = None
) -> NewTurn:
    """A finished turn to append through the storage API (usage 3 prompt + 4 completion)."""
    now = time.time() if at is None else at
    return NewTurn(
        prompt=prompt,
        prompt_tokens=tokens,
        answer=answer or f"answer to {prompt}",
        answer_tokens=tokens,
        model="m",
        finish_reason="stop",
        usage_prompt_tokens=3,
        usage_completion_tokens=4,
        created_at=now,
        finished_at=now,
        upstream="",
        pieces="",
    )


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``root`` with its size and mtime."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# -- the schema of the previous release, frozen ------------------------------------------------
#
# What EasyBackend wrote before conversations became trees (commit 5b3c012): linear
# conversations, turns numbered 1..n, no turn ids, no parents, no head. Spelled out literally
# (not imported), so a change of today's migrations cannot change what "the previous schema"
# means to the tests of the upgrade.

LINEAR_SQLITE_VERSION = 2  # PRAGMA user_version of the previous release
LINEAR_SQLITE_DDL = """
    CREATE TABLE conversations (
        pk INTEGER PRIMARY KEY,
        owner TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        system_prompt TEXT,
        system_tokens INTEGER,
        turn_count INTEGER NOT NULL DEFAULT 0,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        UNIQUE (owner, conversation_id)
    );
    CREATE TABLE turns (
        conversation_pk INTEGER NOT NULL REFERENCES conversations (pk) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        prompt TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        answer TEXT NOT NULL,
        answer_tokens INTEGER NOT NULL,
        model TEXT NOT NULL,
        finish_reason TEXT NOT NULL,
        usage_prompt_tokens INTEGER NOT NULL,
        usage_completion_tokens INTEGER NOT NULL,
        created_at REAL NOT NULL,
        finished_at REAL NOT NULL,
        PRIMARY KEY (conversation_pk, seq)
    ) WITHOUT ROWID;
    CREATE INDEX conversations_by_activity ON conversations (owner, updated_at DESC);
    CREATE TABLE legacy_imports (
        owner TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        source TEXT NOT NULL,
        entries INTEGER NOT NULL,
        PRIMARY KEY (owner, conversation_id, source)
    );
    PRAGMA user_version = 2;
"""

LINEAR_POSTGRES_VERSION = 1  # easybackend_schema.version of the previous release
LINEAR_POSTGRES_DDL = """
    CREATE TABLE easybackend_schema (version INTEGER NOT NULL);
    INSERT INTO easybackend_schema VALUES (1);
    CREATE TABLE conversations (
        pk BIGSERIAL PRIMARY KEY,
        owner TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        system_prompt TEXT,
        system_tokens INTEGER,
        turn_count INTEGER NOT NULL DEFAULT 0,
        prompt_tokens BIGINT NOT NULL DEFAULT 0,
        completion_tokens BIGINT NOT NULL DEFAULT 0,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        UNIQUE (owner, conversation_id)
    );
    CREATE TABLE turns (
        conversation_pk BIGINT NOT NULL REFERENCES conversations (pk) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        prompt TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        answer TEXT NOT NULL,
        answer_tokens INTEGER NOT NULL,
        model TEXT NOT NULL,
        finish_reason TEXT NOT NULL,
        usage_prompt_tokens INTEGER NOT NULL,
        usage_completion_tokens INTEGER NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        finished_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (conversation_pk, seq)
    );
    CREATE INDEX conversations_by_activity ON conversations (owner, updated_at DESC, pk DESC);
    CREATE TABLE legacy_imports (
        owner TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        source TEXT NOT NULL,
        entries INTEGER NOT NULL,
        PRIMARY KEY (owner, conversation_id, source)
    );
"""


@dataclasses.dataclass(frozen=True)
class LinearConversation:
    """A conversation as the previous release stored it: turns 1..n in order.

    ``rolled_back`` turns were answered and then removed by the old rollback, which deleted
    them: they are not stored, but their usage stays in the conversation's totals.
    """

    owner: str
    conversation_id: str
    prompts: tuple[str, ...]
    system_prompt: str | None = None
    system_tokens: int | None = None
    rolled_back: int = 0
    legacy_source: str | None = None  # import-json bookkeeping: every entry came from this file

    def kept(self) -> tuple[str, ...]:
        return self.prompts[: len(self.prompts) - self.rolled_back]


LINEAR_USAGE = (5, 7)  # (prompt, completion) tokens each old turn was billed


def linear_turn_values(prompt: str, seq: int, at: float) -> tuple[Any, ...]:
    """The columns after (conversation_pk, seq) of one old turn."""
    return (
        prompt,
        len(prompt.split()),
        f"answer to {prompt}",
        len(prompt.split()) + 2,
        "gpt-old",
        "stop",
        *LINEAR_USAGE,
        at + seq,
        at + seq + 0.5,
    )


def linear_rows(
    conversations: Iterable[LinearConversation], at: float = 1_700_000_000.0
) -> Iterable[tuple[str, tuple[Any, ...]]]:
    """The statements (``?`` placeholders) the previous release's writes left behind.

    Each conversation row, then its kept turns, numbered 1..n; counters as the old code kept
    them (turn_count = turns stored; usage summed over every answered turn, rolled back too).
    """
    for index, conversation in enumerate(conversations):
        kept = conversation.kept()
        answered = len(conversation.prompts)
        yield (
            "INSERT INTO conversations (owner, conversation_id, system_prompt, system_tokens,"
            " turn_count, prompt_tokens, completion_tokens, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                conversation.owner,
                conversation.conversation_id,
                conversation.system_prompt,
                conversation.system_tokens,
                len(kept),
                answered * LINEAR_USAGE[0],
                answered * LINEAR_USAGE[1],
                at + index,
                at + index + 100,
            ),
        )
        for seq, prompt in enumerate(kept, 1):
            yield (
                "INSERT INTO turns VALUES ((SELECT pk FROM conversations WHERE owner = ? AND"
                " conversation_id = ?), ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    conversation.owner,
                    conversation.conversation_id,
                    seq,
                    *linear_turn_values(prompt, seq, at),
                ),
            )
        if conversation.legacy_source is not None:
            yield (
                "INSERT INTO legacy_imports VALUES (?, ?, ?, ?)",
                (
                    conversation.owner,
                    conversation.conversation_id,
                    conversation.legacy_source,
                    answered,
                ),
            )


def write_linear_sqlite(path: Path, conversations: Iterable[LinearConversation]) -> None:
    """A SQLite file exactly as the previous release wrote it (WAL, user_version 2)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.executescript(LINEAR_SQLITE_DDL)
        db.execute("BEGIN")
        for statement, params in linear_rows(conversations):
            db.execute(statement, params)
        db.execute("COMMIT")
    finally:
        db.close()
