"""The statements of memory beyond the window (SPEC §15): settings, summaries, expiry, search.

Written like :mod:`.sql`: each function runs inside a transaction its store
opened, with ``?`` placeholders a :class:`~.sql.Dialect` turns into its own,
and raises the driver's errors (the store turns them into
StorageUnavailable). What the rows mean (which settings apply, when a summary
is due, what expired) is :mod:`easybackend.chat.memory`'s; the tables are
:data:`.schema.MEMORY`'s.

Expiry: a conversation is expired when it has been idle (``updated_at``)
longer than its own ``expires_in`` (0: never), or, without one, than the
server's ``CONVERSATION_TTL`` (None: never). :func:`alive` is that condition
as SQL, for the reads; :func:`forget_if_expired` and :func:`sweep` delete.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .base import (
    ConversationExport,
    ConversationRef,
    ConversationSettings,
    ConversationSummary,
    MemoryContext,
    MemorySummary,
    StoredTurn,
    TurnPosition,
)
from .sql import (
    _BY_REF,
    _C_BY_REF,
    _PK_BY_REF,
    CONTEXT_COLUMNS,
    SETTINGS_COLUMNS,
    SUMMARY_COLUMNS,
    SUMMARY_FROM,
    Connection,
    Dialect,
    _key,
    _summary,
    summary,
)
from .sql import (
    export_batch as _export_batch,
)

# The settings a client may change, as the conversations table names them (system apart).
SETTING_COLUMNS = ("model", "temperature", "max_context_tokens", "memory", "title", "expires_in")
# Turns read past the last one that fits, looking for a summary on the path, before giving up
# (a path with no summary near its tail: the ask then sends no summary).
SUMMARY_SEARCH_TURNS = 2000
# Candidates read per conversation a sweep may delete: room for some being asked (left for later).
SWEEP_SPARE = 4
ROWID_SHIFT = 4294967296  # the FTS document of turn seq of conversation pk: pk * 2^32 + seq

# The path from one turn up to the root, newest first, each turn with its place and whether a
# summary ends there (a lookup by primary key per turn read: the walk stays lazy).
_PATH_WITH_SUMMARIES = f"""
    WITH RECURSIVE path (conversation_pk, {CONTEXT_COLUMNS}, turn_id, depth, parent_seq) AS (
        SELECT conversation_pk, {CONTEXT_COLUMNS}, turn_id, depth, parent_seq FROM turns
        WHERE conversation_pk = {_PK_BY_REF} AND seq = ?
        UNION ALL
        SELECT t.conversation_pk, {", ".join(f"t.{name.strip()}" for name in CONTEXT_COLUMNS.split(","))},
            t.turn_id, t.depth, t.parent_seq
        FROM turns t JOIN path p ON t.conversation_pk = p.conversation_pk AND t.seq = p.parent_seq
    )
    SELECT {CONTEXT_COLUMNS}, turn_id, depth,
        EXISTS (SELECT 1 FROM summaries s
                WHERE s.conversation_pk = path.conversation_pk AND s.end_seq = path.seq)
    FROM path"""

_SUMMARY_AT = (
    "SELECT s.summary, s.tokens, t.seq, t.turn_id, t.depth, s.model, s.updated_at"
    " FROM summaries s JOIN turns t ON t.conversation_pk = s.conversation_pk AND t.seq = s.end_seq"
    f" WHERE s.conversation_pk = {_PK_BY_REF} AND s.end_seq = ?"
)


@dataclasses.dataclass(frozen=True, slots=True)
class PathTurn:
    """A turn of a path as the summary's maker reads it: its text, counts and place."""

    turn: StoredTurn
    position: TurnPosition


# --- expiry


def alive(now: float, ttl: float | None) -> tuple[str, list[Any]]:
    """`` AND <conversation c is not expired>`` and its values (see the module docstring)."""
    if ttl is None:
        return (
            " AND (c.expires_in IS NULL OR c.expires_in <= 0 OR c.updated_at + c.expires_in >= ?)",
            [now],
        )
    return (
        " AND (CASE WHEN c.expires_in IS NULL THEN c.updated_at >= ?"
        " WHEN c.expires_in <= 0 THEN 1 = 1 ELSE c.updated_at + c.expires_in >= ? END)",
        [now - ttl, now],
    )


def forget_if_expired(
    dialect: Dialect, db: Connection, ref: ConversationRef, now: float, ttl: float | None
) -> bool:
    """Delete the conversation if it is expired (its turns, summaries and bookkeeping with it)."""
    condition, values = alive(now, ttl)
    deleted = dialect.execute(
        db,
        f"DELETE FROM conversations WHERE pk IN (SELECT c.pk FROM conversations c"
        f" WHERE {_C_BY_REF} AND NOT ({condition.removeprefix(' AND ')}))",
        (*_key(ref), *values),
    ).rowcount
    if deleted:
        dialect.execute(db, f"DELETE FROM legacy_imports WHERE {_BY_REF}", _key(ref))
    return deleted > 0


# The advisory lock key of a conversation (postgres._lock_key: the first 8 bytes of the SHA-256
# of owner NUL conversation_id, as a signed 64-bit integer), computed by PostgreSQL.
_PG_LOCK_KEY = (
    "('x' || encode(substring(sha256(convert_to(c.owner, 'UTF8') || '\\x00'::bytea"
    " || convert_to(c.conversation_id, 'UTF8')) from 1 for 8), 'hex'))::bit(64)::bigint"
)


def sweep(
    dialect: Dialect,
    db: Connection,
    now: float,
    ttl: float | None,
    limit: int,
    busy: Callable[[str, str], bool],
) -> int:
    """Delete up to ``limit`` expired conversations; how many were deleted.

    A conversation being asked is left for the next sweep: on SQLite ``busy``
    (owner, conversation_id) says so (the server's own locks; one process
    owns the file), on PostgreSQL its advisory lock is held (by an instance
    asking: ``pg_try_advisory_xact_lock`` fails), and rows another sweeper
    has taken are skipped (``FOR UPDATE SKIP LOCKED``), so instances sweeping
    together never wait for each other nor delete a conversation mid-ask.
    """
    condition, values = alive(now, ttl)
    expired = f"NOT ({condition.removeprefix(' AND ')})"
    # Through the two indexes: conversations idle past the TTL, and those past their own expiry.
    branches = ["c.expires_in > 0 AND c.updated_at + c.expires_in < ?"]
    branch_values: list[Any] = [now]
    if ttl is not None:
        branches.insert(0, "c.expires_in IS NULL AND c.updated_at < ?")
        branch_values.insert(0, now - ttl)
    rows: list[tuple[str, str]] = []
    if dialect.name == "postgresql":
        for branch, value in zip(branches, branch_values, strict=True):
            room = limit - len(rows)
            if room <= 0:
                break
            rows += dialect.execute(
                db,
                "DELETE FROM conversations WHERE pk IN (SELECT c.pk FROM"
                f" (SELECT c.pk, c.owner, c.conversation_id FROM conversations c WHERE {branch}"
                f" LIMIT {int(room) * SWEEP_SPARE} FOR UPDATE SKIP LOCKED) c"
                f" WHERE pg_try_advisory_xact_lock({_PG_LOCK_KEY}) LIMIT {int(room)})"
                " RETURNING owner, conversation_id",
                (value,),
            ).fetchall()
    else:
        candidates = []
        for branch, value in zip(branches, branch_values, strict=True):
            candidates += dialect.execute(
                db,
                f"SELECT c.pk, c.owner, c.conversation_id FROM conversations c WHERE {branch}"
                f" LIMIT {int(limit) * SWEEP_SPARE}",
                (value,),
            ).fetchall()
        for pk, owner, conversation_id in candidates:
            if len(rows) == limit:
                break
            if busy(owner, conversation_id):
                continue
            gone = dialect.execute(
                db,
                f"DELETE FROM conversations WHERE pk = ? AND pk IN"
                f" (SELECT c.pk FROM conversations c WHERE c.pk = ? AND {expired})",
                (pk, pk, *values),
            ).rowcount
            if gone:
                rows.append((owner, conversation_id))
    dialect.executemany(
        db, f"DELETE FROM legacy_imports WHERE {_BY_REF}", [tuple(row) for row in rows]
    )
    return len(rows)


# --- settings


def set_settings(
    dialect: Dialect,
    db: Connection,
    ref: ConversationRef,
    changes: Mapping[str, Any],
    now: float,
) -> ConversationSummary:
    """Set the settings named in ``changes`` (conversations' column names: SETTING_COLUMNS,
    ``system_prompt`` and ``system_tokens``; None: back to the server's), creating the
    conversation; the conversation as listed after."""
    columns = [name for name in changes]
    for name in columns:
        if name not in (*SETTING_COLUMNS, "system_prompt", "system_tokens"):
            raise ValueError(f"not a setting: {name}")
    names = ", ".join(("owner", "conversation_id", *columns, "created_at", "updated_at"))
    marks = ", ".join("?" * (len(columns) + 4))
    updates = ", ".join([*(f"{name} = excluded.{name}" for name in columns), "updated_at = ?"])
    dialect.execute(
        db,
        f"INSERT INTO conversations ({names}) VALUES ({marks})"
        f" ON CONFLICT (owner, conversation_id) DO UPDATE SET {updates}",
        (*_key(ref), *(changes[name] for name in columns), now, now, now),
    )
    found = summary(dialect, db, ref)
    assert found is not None  # just written, in this transaction
    return found


def set_title(
    dialect: Dialect,
    db: Connection,
    ref: ConversationRef,
    title: str,
    usage: tuple[int, int],
) -> bool:
    """Give the conversation ``title`` if it has none (a generated title never replaces one a
    client set), adding the call's usage to its totals; False if it had one or is gone. Its
    activity time is left as it is: a title is not activity."""
    row = dialect.execute(
        db,
        f"SELECT pk, title FROM conversations WHERE {_BY_REF}{dialect.for_update}",
        _key(ref),
    ).fetchone()
    if row is None:
        return False
    pk, existing = row
    _add_usage(dialect, db, pk, usage)
    if existing is not None:
        return False
    dialect.execute(db, "UPDATE conversations SET title = ? WHERE pk = ?", (title, pk))
    return True


def _add_usage(dialect: Dialect, db: Connection, pk: int, usage: tuple[int, int]) -> None:
    dialect.execute(
        db,
        "UPDATE conversations SET prompt_tokens = prompt_tokens + ?,"
        " completion_tokens = completion_tokens + ? WHERE pk = ?",
        (*usage, pk),
    )


# --- summaries


def memory_context(
    dialect: Dialect,
    db: Connection,
    ref: ConversationRef,
    last: TurnPosition,
    budget: int,
    cost: Callable[[StoredTurn], int],
    summary_cost: Callable[[int], int],
) -> MemoryContext:
    """The newest summary on the path to ``last`` and the newest turns after it that fit
    ``budget`` with it (see MemoryContext).

    The path is walked from ``last`` up and stops at the first turn a summary
    ends at (or after SUMMARY_SEARCH_TURNS turns past the budget). A summary
    whose cost (``summary_cost(tokens)``) leaves no room is not sent. ``cost``
    and ``summary_cost`` run in the store's worker thread: pure functions.
    """
    kept: list[tuple[StoredTurn, int]] = []  # newest first, with their costs
    spent = dropped = dropped_turns = 0
    summary_end: int | None = None
    with dialect.streamed(db, _PATH_WITH_SUMMARIES, (*_key(ref), last.seq)) as newest_first:
        for row in newest_first:
            if row[-1]:  # a summary ends at this turn: it covers this turn and the rest
                summary_end = row[0]
                break
            turn = StoredTurn(*row[:5])
            price = cost(turn)
            if dropped_turns == 0 and spent + price <= budget:
                kept.append((turn, price))
                spent += price
                continue
            dropped += price
            dropped_turns += 1
            if dropped_turns > SUMMARY_SEARCH_TURNS:
                break
    found = _summary_at(dialect, db, ref, summary_end) if summary_end is not None else None
    if found is not None:
        price = summary_cost(found.tokens)
        if price > budget:
            found = None  # the prompt leaves no room for it: the turns alone, as truncate
        else:
            while kept and spent + price > budget:
                turn, turn_price = kept.pop()
                spent -= turn_price
                dropped += turn_price
                dropped_turns += 1
    return MemoryContext(found, [turn for turn, _ in reversed(kept)], dropped, dropped_turns)


def _summary_at(
    dialect: Dialect, db: Connection, ref: ConversationRef, end_seq: int
) -> MemorySummary | None:
    row = dialect.execute(db, _SUMMARY_AT, (*_key(ref), end_seq)).fetchone()
    if row is None:
        return None
    text, tokens, seq, turn_id, depth, model, updated_at = row
    return MemorySummary(text, tokens, TurnPosition(seq, turn_id, depth), model, updated_at)


def path_since_summary(
    dialect: Dialect, db: Connection, ref: ConversationRef, last: TurnPosition, limit: int
) -> tuple[MemorySummary | None, list[PathTurn]]:
    """The newest summary on the path to ``last`` and the turns after it, oldest first (at
    most ``limit`` of the newest: a path longer than that since its summary gives its tail)."""
    turns: list[PathTurn] = []
    summary_end: int | None = None
    with dialect.streamed(db, _PATH_WITH_SUMMARIES, (*_key(ref), last.seq)) as newest_first:
        for row in newest_first:
            if row[-1]:
                summary_end = row[0]
                break
            if len(turns) >= limit:
                break
            turns.append(PathTurn(StoredTurn(*row[:5]), TurnPosition(row[0], row[5], row[6])))
    turns.reverse()
    found = _summary_at(dialect, db, ref, summary_end) if summary_end is not None else None
    return found, turns


def newest_summary(
    dialect: Dialect, db: Connection, ref: ConversationRef, last: TurnPosition
) -> MemorySummary | None:
    """The newest summary on the path to ``last`` (the whole path is read if it has none)."""
    summary_end: int | None = None
    with dialect.streamed(db, _PATH_WITH_SUMMARIES, (*_key(ref), last.seq)) as newest_first:
        for row in newest_first:
            if row[-1]:
                summary_end = row[0]
                break
    return _summary_at(dialect, db, ref, summary_end) if summary_end is not None else None


def store_summary(
    dialect: Dialect,
    db: Connection,
    ref: ConversationRef,
    made: MemorySummary,
    usage: tuple[int, int],
) -> bool:
    """Keep ``made`` as the summary ending at its turn (replacing one there), adding the call's
    usage to the conversation's totals; False when the turn is gone. Not activity: the
    conversation's activity time is left as it is."""
    row = dialect.execute(
        db, f"SELECT pk FROM conversations WHERE {_BY_REF}{dialect.for_update}", _key(ref)
    ).fetchone()
    if row is None:
        return False
    (pk,) = row
    exists = dialect.execute(
        db, "SELECT 1 FROM turns WHERE conversation_pk = ? AND seq = ?", (pk, made.end.seq)
    ).fetchone()
    if exists is None:
        return False
    dialect.execute(
        db,
        "INSERT INTO summaries (conversation_pk, end_seq, summary, tokens, model, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (conversation_pk, end_seq) DO UPDATE SET"
        " summary = excluded.summary, tokens = excluded.tokens, model = excluded.model,"
        " updated_at = excluded.updated_at",
        (pk, made.end.seq, made.text, made.tokens, made.model, made.updated_at),
    )
    if any(usage):
        _add_usage(dialect, db, pk, usage)
    return True


# --- transfer (migrate-storage)


def export_batch(
    dialect: Dialect, db: Connection, after: int
) -> tuple[list[ConversationExport], int]:
    """:func:`.sql.export_batch` with each conversation's settings and summaries, read in the
    same snapshot."""
    batch, last = _export_batch(dialect, db, after)
    if not batch:
        return batch, last
    first = after + 1
    settings = {
        row[0]: ConversationSettings(*row[1:])
        for row in dialect.execute(
            db,
            f"SELECT c.pk, {SETTINGS_COLUMNS} FROM conversations c WHERE c.pk BETWEEN ? AND ?",
            (first, last),
        )
    }
    pks = {
        (row[1], row[2]): row[0]
        for row in dialect.execute(
            db,
            "SELECT pk, owner, conversation_id FROM conversations WHERE pk BETWEEN ? AND ?",
            (first, last),
        )
    }
    summaries: dict[int, list[MemorySummary]] = {}
    for pk, text, tokens, seq, turn_id, depth, model, updated_at in dialect.execute(
        db,
        "SELECT s.conversation_pk, s.summary, s.tokens, t.seq, t.turn_id, t.depth, s.model,"
        " s.updated_at FROM summaries s JOIN turns t"
        " ON t.conversation_pk = s.conversation_pk AND t.seq = s.end_seq"
        " WHERE s.conversation_pk BETWEEN ? AND ? ORDER BY s.conversation_pk, s.end_seq",
        (first, last),
    ):
        summaries.setdefault(pk, []).append(
            MemorySummary(text, tokens, TurnPosition(seq, turn_id, depth), model, updated_at)
        )
    enriched = []
    for conversation in batch:
        pk = pks[_key(conversation.ref)]
        enriched.append(
            dataclasses.replace(
                conversation,
                settings=settings[pk],
                summaries=tuple(summaries.get(pk, ())),
            )
        )
    return enriched, last


def import_memory(dialect: Dialect, db: Connection, conversation: ConversationExport) -> None:
    """Write the settings and summaries of a conversation :func:`.sql.import_conversation`
    just wrote (its turns keep their seqs, which the summaries name)."""
    own = conversation.settings
    values = [getattr(own, name) for name in SETTING_COLUMNS]
    if any(value is not None for value in values):
        assignments = ", ".join(f"{name} = ?" for name in SETTING_COLUMNS)
        dialect.execute(
            db,
            f"UPDATE conversations SET {assignments} WHERE {_BY_REF}",
            (*values, *_key(conversation.ref)),
        )
    if conversation.summaries:
        (pk,) = dialect.execute(
            db, f"SELECT pk FROM conversations WHERE {_BY_REF}", _key(conversation.ref)
        ).fetchone()
        dialect.executemany(
            db,
            "INSERT INTO summaries (conversation_pk, end_seq, summary, tokens, model, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [
                (pk, made.end.seq, made.text, made.tokens, made.model, made.updated_at)
                for made in conversation.summaries
            ],
        )


# --- search


def index_pending(dialect: Dialect, db: Connection, owner: str | None, limit: int) -> int:
    """Index the turns stored since their conversation was last indexed (SQLite: see
    schema.MEMORY_SQLITE_SEARCH), the owner's only if ``owner`` is given; at most ``limit``
    turns (a conversation with more is indexed in part, its oldest first). Returns how many were indexed; 0 on PostgreSQL, whose indexes follow
    every write. One transaction: the store's write lock is held while it runs."""
    if dialect.name == "postgresql":
        return 0
    query = "SELECT pk, indexed_seq, last_seq FROM conversations WHERE last_seq > indexed_seq"
    args: list[Any] = []
    if owner is not None:
        query += " AND owner = ?"
        args.append(owner)
    indexed = 0
    for pk, done, last in dialect.execute(db, query + " LIMIT 1000", args).fetchall():
        room = limit - indexed
        turns = dialect.execute(
            db,
            "SELECT seq, prompt || char(10) || answer FROM turns"
            " WHERE conversation_pk = ? AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
            (pk, done, last, room),
        ).fetchall()
        dialect.executemany(
            db,
            "INSERT INTO search_index (rowid, body) VALUES (?, ?)",
            [(pk * ROWID_SHIFT + seq, body) for seq, body in turns],
        )
        reached = last if len(turns) < room else turns[-1][0]
        dialect.execute(db, "UPDATE conversations SET indexed_seq = ? WHERE pk = ?", (reached, pk))
        indexed += len(turns)
        if indexed >= limit:
            break
    return indexed


def search(
    dialect: Dialect,
    db: Connection,
    owner: str,
    terms: Sequence[str],
    limit: int,
    offset: int,
    where: tuple[str, Sequence[Any]],
) -> list[ConversationSummary]:
    """The owner's conversations whose title, or one of whose turns (prompt and answer), holds
    every one of ``terms`` (case-insensitive), best first; ``where`` is a further condition
    on ``c`` (see :func:`alive`).

    Every engine ranks a title match first. SQLite, when every term has three
    characters or more: the FTS5 trigram index, then ranked by bm25 summed over
    the conversation's matching documents (a title counting twice). Otherwise
    (shorter terms, which trigrams cannot match, and PostgreSQL): LIKE / ILIKE,
    through pg_trgm's indexes on PostgreSQL; then ranked by the number of
    matching turns. Ties go to the most recently active. Each result's cursor is
    the offset after it.
    """
    if dialect.name != "postgresql" and all(len(term) >= 3 for term in terms):
        query = " ".join('"' + term.replace('"', '""') + '"' for term in terms)
        # bm25() cannot be used inside an aggregate: each match is scored first, apart.
        ranked = (
            "matched AS MATERIALIZED (SELECT rowid AS doc, bm25(search_index) AS score"
            " FROM search_index WHERE search_index MATCH ?),"
            " hits AS (SELECT doc / 4294967296 AS pk,"
            " max(CASE WHEN doc % 4294967296 = 0 THEN 1 ELSE 0 END) AS title_hit,"
            " sum(CASE WHEN doc % 4294967296 = 0 THEN 2.0 ELSE 1.0 END * score) AS score"
            " FROM matched GROUP BY doc / 4294967296)"
        )
        rows = dialect.execute(
            db,
            f"WITH {ranked} SELECT {SUMMARY_COLUMNS} FROM hits"
            f" JOIN {SUMMARY_FROM.replace('conversations c', 'conversations c ON c.pk = hits.pk', 1)}"
            f" WHERE c.owner = ?{where[0]}"
            " ORDER BY hits.title_hit DESC, hits.score, c.updated_at DESC, c.pk DESC"
            " LIMIT ? OFFSET ?",
            (query, owner, *where[1], limit, offset),
        ).fetchall()
    else:
        like = "ILIKE" if dialect.name == "postgresql" else "LIKE"
        text = (
            "(t.prompt || E'\\n' || t.answer)"
            if dialect.name == "postgresql"
            else ("(t.prompt || char(10) || t.answer)")
        )
        patterns = ["%" + _escaped(term) + "%" for term in terms]
        in_turn = " AND ".join(f"{text} {like} ? ESCAPE '\\'" for _ in terms)
        in_title = " AND ".join(f"c.title {like} ? ESCAPE '\\'" for _ in terms)
        hits = (
            "SELECT pk, max(title_hit) AS title_hit, max(turn_hits) AS turn_hits FROM ("
            f" SELECT c.pk AS pk, 1 AS title_hit, 0 AS turn_hits FROM conversations c"
            f" WHERE c.owner = ? AND {in_title}"
            " UNION ALL"
            " SELECT t.conversation_pk, 0, count(*) FROM turns t"
            " WHERE t.conversation_pk IN (SELECT pk FROM conversations WHERE owner = ?)"
            f" AND {in_turn} GROUP BY t.conversation_pk"
            ") found GROUP BY pk"
        )
        rows = dialect.execute(
            db,
            f"WITH hits AS ({hits}) SELECT {SUMMARY_COLUMNS} FROM hits"
            f" JOIN {SUMMARY_FROM.replace('conversations c', 'conversations c ON c.pk = hits.pk', 1)}"
            f" WHERE c.owner = ?{where[0]} ORDER BY hits.title_hit DESC, hits.turn_hits DESC,"
            " c.updated_at DESC, c.pk DESC LIMIT ? OFFSET ?",
            (owner, *patterns, owner, *patterns, owner, *where[1], limit, offset),
        ).fetchall()
    return [
        _summary(row, cursor=encode_search_cursor(offset + number))
        for number, row in enumerate(rows, 1)
    ]


def _escaped(term: str) -> str:
    """``term`` for a LIKE pattern with ``ESCAPE '\\'``: its own %, _ and \\ taken literally."""
    return term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def encode_search_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"search:{offset}".encode()).decode().rstrip("=")


def decode_search_cursor(cursor: str) -> int:
    """Raises ValueError for anything :func:`encode_search_cursor` did not make."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, offset = raw.split(":")
        if kind != "search" or int(offset) < 0:
            raise ValueError
        return int(offset)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("invalid cursor") from None
