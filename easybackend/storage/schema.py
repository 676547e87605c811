"""The tables both stores hold, written once; each store's migrations fill in its types.

Each ``{name}`` field is a column type (or a table option) that differs
between engines: :data:`SQLITE_TYPES` and :data:`POSTGRES_TYPES` spell them.
The migrations (which of these run at which schema version, and the indexes)
stay with each store. A change of the tables adds a migration to both.
"""

from __future__ import annotations

CONVERSATIONS = """
    CREATE TABLE conversations (
        pk {key},
        owner TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        system_prompt TEXT,
        system_tokens INTEGER,
        turn_count INTEGER NOT NULL DEFAULT 0,
        prompt_tokens {total} NOT NULL DEFAULT 0,
        completion_tokens {total} NOT NULL DEFAULT 0,
        created_at {time} NOT NULL,
        updated_at {time} NOT NULL,
        UNIQUE (owner, conversation_id)
    );"""

TURNS = """
    CREATE TABLE turns (
        conversation_pk {reference} NOT NULL REFERENCES conversations (pk) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        prompt TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        answer TEXT NOT NULL,
        answer_tokens INTEGER NOT NULL,
        model TEXT NOT NULL,
        finish_reason TEXT NOT NULL,
        usage_prompt_tokens INTEGER NOT NULL,
        usage_completion_tokens INTEGER NOT NULL,
        created_at {time} NOT NULL,
        finished_at {time} NOT NULL,
        PRIMARY KEY (conversation_pk, seq)
    ){turns_options};"""

LEGACY_IMPORTS = """
    CREATE TABLE legacy_imports (
        owner TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        source TEXT NOT NULL,
        entries INTEGER NOT NULL,
        PRIMARY KEY (owner, conversation_id, source)
    );"""

# key: the conversation's own id; reference: a turn's pointer to it; total: usage sums;
# time: epoch seconds; turns_options: after the turns table's definition.
SQLITE_TYPES = {
    "key": "INTEGER PRIMARY KEY",  # the rowid itself
    "reference": "INTEGER",
    "total": "INTEGER",  # 64-bit in SQLite
    "time": "REAL",
    "turns_options": " WITHOUT ROWID",  # stored in primary-key order
}
POSTGRES_TYPES = {
    "key": "BIGSERIAL PRIMARY KEY",
    "reference": "BIGINT",
    "total": "BIGINT",
    "time": "DOUBLE PRECISION",
    "turns_options": "",
}
