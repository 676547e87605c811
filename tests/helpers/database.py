"""The server's SQLite file, read with connections of the test's own."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any


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


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``root`` with its size and mtime."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
