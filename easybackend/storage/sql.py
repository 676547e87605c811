"""The SQL both stores speak: every statement and the row → record code, written once.

Statements are written against a tiny DB-API-like interface (:class:`Connection`:
``execute`` returning a cursor) with ``?`` placeholders; a :class:`Dialect`
supplies what differs between engines (the placeholder style, an upsert that
returns the row, bulk inserts, a streamed read, a few spellings). Every
function here runs inside a transaction its store opened (see
:meth:`easybackend.storage.sql_store.SQLStore._transaction`) and raises the
driver's own errors; the store turns them into StorageUnavailable.

The schema itself (the migrations) stays with each store; the columns this
layer reads and writes are named here, once.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import operator
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from .base import (
    ROOT,
    AnswerProgress,
    ConversationDetail,
    ConversationExport,
    ConversationHead,
    ConversationRef,
    ConversationSettings,
    ConversationSummary,
    NewTurn,
    StoredTurn,
    TurnPosition,
    TurnRecord,
)

EXPORT_BATCH = 100  # conversations read per transaction by export_all

# The row a readiness probe writes and deletes again in one transaction (see WriteHealth):
# no conversation has an empty id, so it never meets a real one.
PROBE_ROW = ("", "", "readiness-probe")  # legacy_imports (owner, conversation_id, source)

# A conversation's own settings, in ConversationSettings' field order (``c``: conversations).
SETTINGS_COLUMNS = ", ".join(
    f"c.{field.name}" for field in dataclasses.fields(ConversationSettings)
)
# A conversation as listed (ConversationSummary's fields up to the cursor, its settings, then the
# pk), read from ``conversations c`` joined with its head ``h`` (see SUMMARY_FROM).
SUMMARY_COLUMNS = (
    "c.conversation_id, c.system_prompt, c.turn_count, c.prompt_tokens, c.completion_tokens,"
    f" c.created_at, c.updated_at, h.turn_id, coalesce(h.depth, 0), c.metadata, {SETTINGS_COLUMNS},"
    " c.pk"
)
SUMMARY_FROM = (
    "conversations c LEFT JOIN turns h ON h.conversation_pk = c.pk AND h.seq = c.head_seq"
)
EXPORT_COLUMNS = (
    "owner, conversation_id, system_prompt, system_tokens, turn_count, prompt_tokens,"
    " completion_tokens, created_at, updated_at, head_seq, last_seq, metadata"
)
# A turn's columns in TurnRecord's field order, so a row is a record and a record is a row.
TURN_COLUMNS = ", ".join(field.name for field in dataclasses.fields(TurnRecord))
CONTEXT_COLUMNS = ", ".join(field.name for field in dataclasses.fields(StoredTurn))
# A record's values in that order (a NewTurn's: all but the place in the tree, which comes last).
record_values = operator.attrgetter(*(field.name for field in dataclasses.fields(TurnRecord)))
new_turn_values = operator.attrgetter(*(field.name for field in dataclasses.fields(NewTurn)))
INSERT_TURN = (
    f"INSERT INTO turns (conversation_pk, {TURN_COLUMNS})"
    f" VALUES ({', '.join('?' * (1 + len(dataclasses.fields(TurnRecord))))})"
)
_BY_REF = "owner = ? AND conversation_id = ?"
MARK_KEPT = 86400.0  # seconds a mark outlives its bound (an instance that died with it) at most
_C_BY_REF = "c.owner = ? AND c.conversation_id = ?"  # the same, of ``conversations c``
_PK_BY_REF = f"(SELECT pk FROM conversations WHERE {_BY_REF})"

# The path from one turn up to the root, newest first: a recursive walk up the parents, one
# primary-key lookup a turn, so only the turns read are visited. The rows come in the order the
# walk makes them (the CTE is not sorted, so SQLite and a PostgreSQL server-side cursor produce
# them as they are read, and stopping early stops the walk).
PATH_NEWEST_FIRST = f"""
    WITH RECURSIVE path (conversation_pk, {CONTEXT_COLUMNS}, parent_seq) AS (
        SELECT conversation_pk, {CONTEXT_COLUMNS}, parent_seq FROM turns
        WHERE conversation_pk = {_PK_BY_REF} AND seq = ?
        UNION ALL
        SELECT t.conversation_pk, {", ".join(f"t.{name.strip()}" for name in CONTEXT_COLUMNS.split(","))}, t.parent_seq
        FROM turns t JOIN path p ON t.conversation_pk = p.conversation_pk AND t.seq = p.parent_seq
    )
    SELECT {CONTEXT_COLUMNS} FROM path"""

# The turn ``steps`` turns up the path from a turn (fewer if the path is shorter): the
# walk's rows with their distance, the last of which is the answer.
ANCESTORS = """
    WITH RECURSIVE up (seq, turn_id, depth, parent_seq, steps) AS (
        SELECT seq, turn_id, depth, parent_seq, 0 FROM turns WHERE conversation_pk = ? AND seq = ?
        UNION ALL
        SELECT t.seq, t.turn_id, t.depth, t.parent_seq, up.steps + 1
        FROM turns t JOIN up ON t.conversation_pk = ? AND t.seq = up.parent_seq
        WHERE up.steps < ?
    )
    SELECT seq, turn_id, depth, steps FROM up ORDER BY steps DESC LIMIT 1"""

# A turn and all its descendants: a walk down the children (index turns_by_parent). Used as a
# subquery of the DELETE (a statement that starts with WITH has no row count in Python's sqlite3).
SUBTREE = """
    WITH RECURSIVE subtree (seq) AS (
        SELECT seq FROM turns WHERE conversation_pk = ? AND seq = ?
        UNION ALL
        SELECT t.seq FROM turns t JOIN subtree s ON t.conversation_pk = ? AND t.parent_seq = s.seq
    )"""


def new_turn_id() -> str:
    """A new turn id: 24 random hex digits (96 bits), opaque and URL-safe."""
    return secrets.token_hex(12)


class Cursor(Protocol):
    """What this layer uses of a DB-API cursor."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...

    def close(self) -> None: ...


class Connection(Protocol):
    """What this layer uses of a connection (sqlite3 and psycopg both have it)."""

    def execute(self, query: str, params: Sequence[Any] = ..., /) -> Any: ...


class Dialect:
    """What differs between SQL engines in the statements below; SQLite's spelling by default.

    A subclass changes the placeholder and overrides the methods whose SQL differs.
    """

    name = "sqlite"  # the engine, where a statement of its own is needed (see sql_memory)
    placeholder = "?"
    greatest = "max"  # the scalar maximum of two values
    for_update = ""  # appended to a SELECT whose rows the transaction goes on to change
    alive_query = "SELECT 1"  # the readiness read

    def __init__(self) -> None:
        self._texts: dict[str, str] = {}

    def text(self, query: str) -> str:
        """``query`` (written with ``?``) in this dialect's placeholder style."""
        text = self._texts.get(query)
        if text is None:
            text = self._texts[query] = query.replace("?", self.placeholder)
        return text

    def execute(self, db: Connection, query: str, params: Sequence[Any] = ()) -> Cursor:
        return db.execute(self.text(query), params)

    def executemany(self, db: Any, query: str, rows: Iterable[Sequence[Any]]) -> None:
        db.executemany(self.text(query), rows)

    @contextlib.contextmanager
    def streamed(self, db: Any, query: str, params: Sequence[Any]) -> Iterator[Iterable[Any]]:
        """The rows of ``query``, read as they are iterated (only what is consumed is read)."""
        with contextlib.closing(self.execute(db, query, params)) as cursor:
            yield cursor

    def after(self, updated_at: float, pk: int) -> tuple[str, list[Any]]:
        """The condition (and its values) for a listing resumed after the position given."""
        return " AND (updated_at < ? OR (updated_at = ? AND pk < ?))", [updated_at, updated_at, pk]

    def conversation_for_append(
        self, db: Any, ref: ConversationRef, created_at: float, updated_at: float
    ) -> tuple[int, int]:
        """Create the conversation unless it exists; (its pk, the next turn's seq).

        The transaction already holds the database's write lock (SQLite: BEGIN IMMEDIATE).
        """
        self.execute(
            db,
            "INSERT INTO conversations (owner, conversation_id, created_at, updated_at)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (owner, conversation_id) DO NOTHING",
            (ref.owner, ref.conversation_id, created_at, updated_at),
        )
        return self.execute(
            db, f"SELECT pk, last_seq + 1 FROM conversations WHERE {_BY_REF}", _key(ref)
        ).fetchone()

    def insert_returning_pk(self, db: Any, query: str, params: Sequence[Any]) -> int:
        """Run an INSERT of one conversation row; its new pk."""
        return self.execute(db, query, params).lastrowid

    def insert_turns(self, db: Any, pk: int, turns: Sequence[TurnRecord]) -> None:
        """Write many ``turns`` as they are under conversation ``pk``."""
        self.executemany(db, INSERT_TURN, [(pk, *record_values(turn)) for turn in turns])


def _key(ref: ConversationRef) -> tuple[str, str]:
    return ref.owner, ref.conversation_id


# --- serving


def head(
    dialect: Dialect,
    db: Connection,
    ref: ConversationRef,
    parent_id: str | None,
    sibling_of: str | None,
) -> ConversationHead | None:
    """The conversation's system prompt and the parent of its next turn (see ServingStore)."""
    row = dialect.execute(
        db,
        f"SELECT c.pk, c.system_prompt, c.system_tokens, c.updated_at, {SETTINGS_COLUMNS},"
        f" h.seq, h.turn_id, h.depth FROM {SUMMARY_FROM} WHERE {_C_BY_REF}",
        _key(ref),
    ).fetchone()
    names_a_turn = sibling_of is not None or parent_id not in (None, ROOT)
    if row is None:
        return None if names_a_turn else ConversationHead(None, None, None)
    pk, system_prompt, system_tokens, updated_at, *rest = row
    settings, head_turn = ConversationSettings(*rest[:-3]), rest[-3:]
    if sibling_of is not None:
        found = dialect.execute(
            db,
            "SELECT t.seq, p.seq, p.turn_id, p.depth FROM turns t LEFT JOIN turns p"
            " ON p.conversation_pk = t.conversation_pk AND p.seq = t.parent_seq"
            " WHERE t.turn_id = ? AND t.conversation_pk = ?",
            (sibling_of, pk),
        ).fetchone()
        if found is None:
            return None
        parent = TurnPosition(*found[1:]) if found[1] is not None else None
    elif parent_id is None:
        parent = TurnPosition(*head_turn) if head_turn[0] is not None else None
    elif parent_id == ROOT:
        parent = None
    else:
        found = dialect.execute(
            db,
            "SELECT seq, turn_id, depth FROM turns WHERE turn_id = ? AND conversation_pk = ?",
            (parent_id, pk),
        ).fetchone()
        if found is None:
            return None
        parent = TurnPosition(*found)
    return ConversationHead(system_prompt, system_tokens, parent, settings, updated_at)


def newest_turns(
    dialect: Dialect,
    db: Connection,
    ref: ConversationRef,
    last: TurnPosition,
    budget: int,
    cost: Callable[[StoredTurn], int],
) -> list[StoredTurn]:
    with dialect.streamed(db, PATH_NEWEST_FIRST, (*_key(ref), last.seq)) as newest_first:
        return newest_that_fit(newest_first, budget, cost)


def newest_that_fit(
    newest_first: Iterable[Sequence[Any]], budget: int, cost: Callable[[StoredTurn], int]
) -> list[StoredTurn]:
    """The turns of ``newest_first`` rows (CONTEXT_COLUMNS) whose summed ``cost`` stays within
    ``budget``, oldest first; stops reading at the first that does not fit, so a long history
    costs only the tail that is sent."""
    turns: list[StoredTurn] = []
    spent = 0
    for record in newest_first:
        turn = StoredTurn(*record)
        spent += cost(turn)
        if spent > budget:
            break
        turns.append(turn)
    turns.reverse()
    return turns


def append(
    dialect: Dialect,
    db: Connection,
    ref: ConversationRef,
    turn: NewTurn,
    parent: TurnPosition | None,
    turn_id: str | None = None,
    extra: str | None = None,
) -> TurnPosition:
    """Store ``turn`` as a child of ``parent`` (creating the conversation) and make it the head."""
    pk, seq = dialect.conversation_for_append(db, ref, turn.created_at, turn.finished_at)
    place = TurnPosition(seq, turn_id or new_turn_id(), parent.depth + 1 if parent else 1)
    parent_seq = parent.seq if parent else None
    dialect.execute(
        db,
        INSERT_TURN,
        (pk, *new_turn_values(turn), seq, place.turn_id, parent_seq, place.depth, extra),
    )
    dialect.execute(
        db,
        "UPDATE conversations SET turn_count = turn_count + 1, last_seq = ?, head_seq = ?,"
        f" updated_at = {dialect.greatest}(updated_at, ?),"
        " prompt_tokens = prompt_tokens + ?, completion_tokens = completion_tokens + ?"
        " WHERE pk = ?",
        (seq, seq, turn.finished_at, turn.usage_prompt_tokens, turn.usage_completion_tokens, pk),
    )
    return place


def append_chain(
    dialect: Dialect,
    db: Connection,
    ref: ConversationRef,
    turns: Sequence[tuple[NewTurn, str | None, str | None]],
    parent: TurnPosition | None,
) -> list[TurnPosition]:
    """Store ``turns`` (each with its id and extra) as a chain below ``parent``, each the
    parent of the next; the last becomes the head."""
    positions = []
    for turn, turn_id, extra in turns:
        parent = append(dialect, db, ref, turn, parent, turn_id, extra)
        positions.append(parent)
    return positions


def conversation_of_turn(
    dialect: Dialect,
    db: Connection,
    owner: str,
    turn_id: str,
    where: tuple[str, Sequence[Any]] = ("", ()),
) -> str | None:
    """``where``: a further condition on ``conversations c`` (its text and values)."""
    condition, values = where
    row = dialect.execute(
        db,
        "SELECT c.conversation_id FROM turns t JOIN conversations c ON c.pk = t.conversation_pk"
        f" WHERE t.turn_id = ? AND c.owner = ?{condition}",
        (turn_id, owner, *values),
    ).fetchone()
    return row[0] if row else None


def create_conversation(
    dialect: Dialect, db: Connection, ref: ConversationRef, metadata: str | None, now: float
) -> bool:
    created = dialect.execute(
        db,
        "INSERT INTO conversations (owner, conversation_id, metadata, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (owner, conversation_id) DO NOTHING",
        (*_key(ref), metadata, now, now),
    ).rowcount
    return created > 0


def set_metadata(
    dialect: Dialect, db: Connection, ref: ConversationRef, metadata: str | None, now: float
) -> bool:
    changed = dialect.execute(
        db,
        f"UPDATE conversations SET metadata = ?, updated_at = ? WHERE {_BY_REF}",
        (metadata, now, *_key(ref)),
    ).rowcount
    return changed > 0


def find_turn(
    dialect: Dialect,
    db: Connection,
    ref: ConversationRef,
    turn_id: str,
    where: tuple[str, Sequence[Any]] = ("", ()),
) -> TurnRecord | None:
    """``where``: a further condition on ``conversations c`` (its text and values)."""
    condition, values = where
    row = dialect.execute(
        db,
        f"SELECT {TURN_COLUMNS} FROM turns WHERE turn_id = ? AND conversation_pk ="
        f" (SELECT c.pk FROM conversations c WHERE {_C_BY_REF}{condition})",
        (turn_id, *_key(ref), *values),
    ).fetchone()
    return TurnRecord(*row) if row else None


def mark_answer(
    dialect: Dialect, db: Connection, ref: ConversationRef, turn_id: str, until: float
) -> None:
    """Mark turn ``turn_id``'s answer in progress until ``until`` (see ServingStore)."""
    dialect.execute(db, "DELETE FROM answers_in_progress WHERE until < ?", (until - MARK_KEPT,))
    dialect.execute(
        db,
        "INSERT INTO answers_in_progress (owner, conversation_id, turn_id, until)"
        " VALUES (?, ?, ?, ?)",
        (*_key(ref), turn_id, until),
    )


def unmark_answer(dialect: Dialect, db: Connection, ref: ConversationRef, turn_id: str) -> None:
    dialect.execute(
        db,
        f"DELETE FROM answers_in_progress WHERE {_BY_REF} AND turn_id = ?",
        (*_key(ref), turn_id),
    )


def request_cancel(
    dialect: Dialect, db: Connection, ref: ConversationRef, turn_id: str, now: float
) -> bool:
    """Ask the instance generating turn ``turn_id``'s answer to cancel it; False if no mark
    says it is in progress (see ServingStore)."""
    changed = dialect.execute(
        db,
        f"UPDATE answers_in_progress SET cancel_requested = 1 WHERE {_BY_REF} AND turn_id = ?"
        " AND until >= ?",
        (*_key(ref), turn_id, now),
    ).rowcount
    return changed > 0


def cancels_requested(dialect: Dialect, db: Connection, now: float) -> list[tuple[str, str]]:
    """(owner, turn id) of every answer in progress whose cancel was asked for."""
    rows = dialect.execute(
        db,
        "SELECT owner, turn_id FROM answers_in_progress WHERE cancel_requested = 1 AND until >= ?",
        (now,),
    ).fetchall()
    return [(owner, turn_id) for owner, turn_id in rows]


def answer_progress(
    dialect: Dialect, db: Connection, ref: ConversationRef, turn_id: str, now: float
) -> AnswerProgress | None:
    row = dialect.execute(
        db,
        "SELECT text, pieces, model FROM answers_in_progress"
        f" WHERE {_BY_REF} AND turn_id = ? AND until >= ?",
        (*_key(ref), turn_id, now),
    ).fetchone()
    return AnswerProgress(*row) if row is not None else None


def write_progress(
    dialect: Dialect,
    db: Connection,
    answers: Sequence[tuple[ConversationRef, str, AnswerProgress]],
) -> None:
    """Write each marked answer's progress (see ServingStore.write_progress)."""
    for ref, turn_id, progress in answers:
        dialect.execute(
            db,
            "UPDATE answers_in_progress SET text = ?, pieces = ?, model = ?"
            f" WHERE {_BY_REF} AND turn_id = ?",
            (progress.text, progress.pieces, progress.model, *_key(ref), turn_id),
        )


def conversation_of_answer(
    dialect: Dialect, db: Connection, owner: str, turn_id: str, now: float
) -> str | None:
    row = dialect.execute(
        db,
        "SELECT conversation_id FROM answers_in_progress"
        " WHERE owner = ? AND turn_id = ? AND until >= ?",
        (owner, turn_id, now),
    ).fetchone()
    return row[0] if row else None


def _conversation_for_change(
    dialect: Dialect, db: Connection, ref: ConversationRef
) -> tuple[int, int | None] | None:
    """(pk, head seq) of the conversation, its row locked for the transaction; None if unknown."""
    return dialect.execute(
        db,
        f"SELECT pk, head_seq FROM conversations WHERE {_BY_REF}{dialect.for_update}",
        _key(ref),
    ).fetchone()


def _move_head(dialect: Dialect, db: Connection, pk: int, seq: int | None, now: float) -> None:
    dialect.execute(
        db, "UPDATE conversations SET head_seq = ?, updated_at = ? WHERE pk = ?", (seq, now, pk)
    )


def set_head(
    dialect: Dialect, db: Connection, ref: ConversationRef, turn_id: str, now: float
) -> bool:
    row = _conversation_for_change(dialect, db, ref)
    if row is None:
        return False
    pk = row[0]
    if turn_id == ROOT:
        seq = None
    else:
        found = dialect.execute(
            db, "SELECT seq FROM turns WHERE turn_id = ? AND conversation_pk = ?", (turn_id, pk)
        ).fetchone()
        if found is None:
            return False
        seq = found[0]
    _move_head(dialect, db, pk, seq, now)
    return True


def delete_turn(
    dialect: Dialect, db: Connection, ref: ConversationRef, turn_id: str, now: float
) -> tuple[int, TurnPosition | None] | None:
    row = _conversation_for_change(dialect, db, ref)
    if row is None:
        return None
    pk, head_seq = row
    found = dialect.execute(
        db,
        "SELECT seq, parent_seq FROM turns WHERE turn_id = ? AND conversation_pk = ?",
        (turn_id, pk),
    ).fetchone()
    if found is None:
        return None
    seq, parent_seq = found
    deleted = dialect.execute(
        db,
        f"DELETE FROM turns WHERE conversation_pk = ? AND seq IN ({SUBTREE} SELECT seq FROM subtree)",
        (pk, pk, seq, pk),
    ).rowcount
    head_row = (
        dialect.execute(
            db, "SELECT seq FROM turns WHERE conversation_pk = ? AND seq = ?", (pk, head_seq)
        ).fetchone()
        if head_seq is not None
        else None
    )
    if head_seq is not None and head_row is None:  # the head was in the subtree
        head_seq = parent_seq
    return _removed(dialect, db, pk, deleted, head_seq, now)


def _removed(
    dialect: Dialect, db: Connection, pk: int, removed: int, head_seq: int | None, now: float
) -> tuple[int, TurnPosition | None]:
    """Count ``removed`` turns out of conversation ``pk`` and set its head; (removed, the head)."""
    dialect.execute(
        db,
        "UPDATE conversations SET turn_count = turn_count - ?, head_seq = ?, updated_at = ?"
        " WHERE pk = ?",
        (removed, head_seq, now, pk),
    )
    return removed, _position(dialect, db, pk, head_seq)


def splice_turns(
    dialect: Dialect, db: Connection, ref: ConversationRef, turn_ids: Sequence[str], now: float
) -> tuple[int, TurnPosition | None] | None:
    """Remove each turn of ``turn_ids`` alone: its children become its parent's (their subtrees
    one level shallower) and the head moves to its parent if it was the head. Ids the
    conversation does not hold are skipped. (turns removed, the head after); None for an
    unknown conversation."""
    row = _conversation_for_change(dialect, db, ref)
    if row is None:
        return None
    pk, head_seq = row
    removed = 0
    for turn_id in turn_ids:
        found = dialect.execute(
            db,
            "SELECT seq, parent_seq FROM turns WHERE turn_id = ? AND conversation_pk = ?",
            (turn_id, pk),
        ).fetchone()
        if found is None:
            continue
        seq, parent_seq = found
        dialect.execute(
            db,
            "UPDATE turns SET depth = depth - 1 WHERE conversation_pk = ?"
            f" AND seq IN ({SUBTREE} SELECT seq FROM subtree)",
            (pk, pk, seq, pk),
        )
        dialect.execute(
            db,
            "UPDATE turns SET parent_seq = ? WHERE conversation_pk = ? AND parent_seq = ?",
            (parent_seq, pk, seq),
        )
        dialect.execute(db, "DELETE FROM turns WHERE conversation_pk = ? AND seq = ?", (pk, seq))
        if head_seq == seq:
            head_seq = parent_seq
        removed += 1
    return _removed(dialect, db, pk, removed, head_seq, now)


def set_turn_text(
    dialect: Dialect,
    db: Connection,
    ref: ConversationRef,
    turn_id: str,
    texts: tuple[str, int, str, int],
) -> bool:
    """Replace a turn's prompt and answer (each with its token count); False if no such turn."""
    changed = dialect.execute(
        db,
        "UPDATE turns SET prompt = ?, prompt_tokens = ?, answer = ?, answer_tokens = ?"
        f" WHERE turn_id = ? AND conversation_pk = {_PK_BY_REF}",
        (*texts, turn_id, *_key(ref)),
    ).rowcount
    return changed > 0


def summary(dialect: Dialect, db: Connection, ref: ConversationRef) -> ConversationSummary | None:
    row = dialect.execute(
        db, f"SELECT {SUMMARY_COLUMNS} FROM {SUMMARY_FROM} WHERE {_C_BY_REF}", _key(ref)
    ).fetchone()
    return _summary(row) if row else None


def _position(dialect: Dialect, db: Connection, pk: int, seq: int | None) -> TurnPosition | None:
    if seq is None:
        return None
    row = dialect.execute(
        db, "SELECT seq, turn_id, depth FROM turns WHERE conversation_pk = ? AND seq = ?", (pk, seq)
    ).fetchone()
    return TurnPosition(*row)


def list_page(
    dialect: Dialect,
    db: Connection,
    owner: str,
    limit: int,
    after: tuple[float, int] | None,
    where: tuple[str, Sequence[Any]] = ("", ()),
) -> list[ConversationSummary]:
    """A page of the owner's conversations after ``after`` (a decoded cursor); ``where`` is a
    further condition on ``c`` (`` AND …``) and its values."""
    query = f"SELECT {SUMMARY_COLUMNS} FROM {SUMMARY_FROM} WHERE c.owner = ?{where[0]}"
    args: list[Any] = [owner, *where[1]]
    if after is not None:
        condition, values = dialect.after(*after)
        query += condition
        args += values
    query += " ORDER BY c.updated_at DESC, c.pk DESC LIMIT ?"
    rows = dialect.execute(db, query, [*args, limit]).fetchall()
    return [_summary(row) for row in rows]


def _summary(row: Sequence[Any], cursor: str | None = None) -> ConversationSummary:
    """A SUMMARY_COLUMNS row (the pk last); its cursor is the listing's unless given."""
    return ConversationSummary(
        *row[:10],
        cursor=encode_cursor(row[6], row[-1]) if cursor is None else cursor,
        settings=ConversationSettings(*row[10:-1]),
    )


def detail(dialect: Dialect, db: Connection, ref: ConversationRef) -> ConversationDetail | None:
    row = dialect.execute(
        db,
        f"SELECT {SUMMARY_COLUMNS}, c.head_seq FROM {SUMMARY_FROM} WHERE {_C_BY_REF}",
        _key(ref),
    ).fetchone()
    if row is None:
        return None
    *summary, head_seq = row
    turns = dialect.execute(
        db,
        f"SELECT {TURN_COLUMNS} FROM turns WHERE conversation_pk = ? ORDER BY seq",
        (summary[-1],),
    ).fetchall()
    return ConversationDetail(_summary(summary), [TurnRecord(*turn) for turn in turns], head_seq)


def delete(dialect: Dialect, db: Connection, ref: ConversationRef) -> bool:
    deleted = dialect.execute(db, f"DELETE FROM conversations WHERE {_BY_REF}", _key(ref)).rowcount
    dialect.execute(db, f"DELETE FROM legacy_imports WHERE {_BY_REF}", _key(ref))
    return deleted > 0


def rollback(
    dialect: Dialect, db: Connection, ref: ConversationRef, turns: int, now: float
) -> tuple[int, int, TurnPosition | None] | None:
    """Move the head ``turns`` turns up its path; (moved past, left on the path, new head)."""
    row = _conversation_for_change(dialect, db, ref)
    if row is None:
        return None
    pk, head_seq = row
    if head_seq is None:
        return 0, 0, None
    seq, turn_id, depth, steps = dialect.execute(
        db, ANCESTORS, (pk, head_seq, pk, turns)
    ).fetchone()
    if steps < turns:  # the path is shorter: past its first turn, to no turn at all
        moved, head = steps + 1, None
    else:
        moved, head = steps, TurnPosition(seq, turn_id, depth)
    _move_head(dialect, db, pk, head.seq if head else None, now)
    return moved, head.depth if head else 0, head


def set_system_prompt(
    dialect: Dialect,
    db: Connection,
    ref: ConversationRef,
    prompt: str | None,
    tokens: int | None,
    now: float,
) -> None:
    dialect.execute(
        db,
        "INSERT INTO conversations (owner, conversation_id, system_prompt, system_tokens,"
        " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (owner, conversation_id) DO UPDATE SET"
        " system_prompt = excluded.system_prompt, system_tokens = excluded.system_tokens,"
        " updated_at = excluded.updated_at",
        (ref.owner, ref.conversation_id, prompt, tokens, now, now),
    )


def probe_write(dialect: Dialect, db: Connection) -> None:
    """Write the probe row and delete it again: fails while the store takes no writes."""
    dialect.execute(
        db,
        "INSERT INTO legacy_imports (owner, conversation_id, source, entries)"
        " VALUES (?, ?, ?, 0) ON CONFLICT DO NOTHING",
        PROBE_ROW,
    )
    dialect.execute(
        db,
        f"DELETE FROM legacy_imports WHERE {_BY_REF} AND source = ?",
        PROBE_ROW,
    )


def alive(dialect: Dialect, db: Connection) -> None:
    dialect.execute(db, dialect.alive_query).fetchone()


# --- transfer


def import_turns(
    dialect: Dialect, db: Connection, ref: ConversationRef, source: str, turns: list[NewTurn]
) -> int:
    row = dialect.execute(
        db,
        f"SELECT entries FROM legacy_imports WHERE {_BY_REF} AND source = ?{dialect.for_update}",
        (*_key(ref), source),
    ).fetchone()
    done = row[0] if row else 0
    head_now = head(dialect, db, ref, None, None)
    parent = head_now.parent if head_now else None
    for turn in turns[done:]:
        parent = append(dialect, db, ref, turn, parent)
    dialect.execute(
        db,
        "INSERT INTO legacy_imports VALUES (?, ?, ?, ?) ON CONFLICT (owner, conversation_id,"
        " source) DO UPDATE SET entries = excluded.entries",
        (*_key(ref), source, max(done, len(turns))),
    )
    return max(len(turns) - done, 0)


def totals(dialect: Dialect, db: Connection) -> tuple[int, int]:
    (conversations,) = dialect.execute(db, "SELECT count(*) FROM conversations").fetchone()
    (turns,) = dialect.execute(db, "SELECT count(*) FROM turns").fetchone()
    return conversations, turns


def export_batch(
    dialect: Dialect, db: Connection, after: int
) -> tuple[list[ConversationExport], int]:
    """The next EXPORT_BATCH conversations with pk above ``after``, whole, and the last pk read.

    Run in one snapshot, so each conversation's counters match its turns.
    """
    rows = dialect.execute(
        db,
        f"SELECT pk, {EXPORT_COLUMNS} FROM conversations WHERE pk > ? ORDER BY pk LIMIT ?",
        (after, EXPORT_BATCH),
    ).fetchall()
    if not rows:
        return [], after
    first, last = rows[0][0], rows[-1][0]  # the batch is every pk between the two
    turns: dict[int, list[TurnRecord]] = {row[0]: [] for row in rows}
    for pk, *turn in dialect.execute(
        db,
        f"SELECT conversation_pk, {TURN_COLUMNS} FROM turns"
        " WHERE conversation_pk BETWEEN ? AND ? ORDER BY conversation_pk, seq",
        (first, last),
    ):
        turns[pk].append(TurnRecord(*turn))
    legacy: dict[int, dict[str, int]] = {row[0]: {} for row in rows}
    for pk, source, entries in dialect.execute(
        db,
        "SELECT c.pk, l.source, l.entries FROM legacy_imports l JOIN conversations c"
        " ON c.owner = l.owner AND c.conversation_id = l.conversation_id"
        " WHERE c.pk BETWEEN ? AND ?",
        (first, last),
    ):
        legacy[pk][source] = entries
    batch = [
        ConversationExport(ConversationRef(owner, cid), *values, turns[pk], legacy[pk])
        for pk, owner, cid, *values in rows
    ]
    return batch, last


def import_conversation(dialect: Dialect, db: Connection, conversation: ConversationExport) -> None:
    """Write one exported conversation as it is, replacing any namesake."""
    key = _key(conversation.ref)
    dialect.execute(db, f"DELETE FROM conversations WHERE {_BY_REF}", key)
    dialect.execute(db, f"DELETE FROM legacy_imports WHERE {_BY_REF}", key)
    pk = dialect.insert_returning_pk(
        db,
        f"INSERT INTO conversations ({EXPORT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            *key,
            conversation.system_prompt,
            conversation.system_tokens,
            conversation.turn_count,
            conversation.prompt_tokens,
            conversation.completion_tokens,
            conversation.created_at,
            conversation.updated_at,
            conversation.head_seq,
            conversation.last_seq,
            conversation.metadata,
        ),
    )
    dialect.insert_turns(db, pk, conversation.turns)
    dialect.executemany(
        db,
        "INSERT INTO legacy_imports (owner, conversation_id, source, entries) VALUES (?, ?, ?, ?)",
        [(*key, source, entries) for source, entries in conversation.legacy_imports.items()],
    )


# --- listing cursors


def encode_cursor(updated_at: float, pk: int) -> str:
    return base64.urlsafe_b64encode(f"{updated_at!r}:{pk}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, int]:
    """Raises ValueError for anything :func:`encode_cursor` did not make."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        updated_at, pk = raw.split(":")
        return float(updated_at), int(pk)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("invalid cursor") from None
