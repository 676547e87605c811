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

# Conversations become trees (SPEC §12): every turn gets its opaque id, its parent and its
# depth; every conversation its head and the last seq it gave (seqs are never reused, so a
# deleted branch's numbers are not handed out again). A database of the linear schema becomes
# chains: each turn's parent is the turn before it, the head its last turn. Turns and
# conversations also get the JSON an API keeps with them (a response's settings and metadata,
# a conversation's metadata: SPEC §13), which the store does not read.
TREE = """
    ALTER TABLE turns ADD COLUMN turn_id TEXT NOT NULL DEFAULT '';
    ALTER TABLE turns ADD COLUMN parent_seq INTEGER;
    ALTER TABLE turns ADD COLUMN depth INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE turns ADD COLUMN extra TEXT;
    ALTER TABLE conversations ADD COLUMN metadata TEXT;
    UPDATE turns SET turn_id = {random_id}, parent_seq = chain.previous, depth = chain.position
    FROM (
        SELECT conversation_pk AS pk, seq AS at,
            row_number() OVER (PARTITION BY conversation_pk ORDER BY seq) AS position,
            lag(seq) OVER (PARTITION BY conversation_pk ORDER BY seq) AS previous
        FROM turns
    ) AS chain
    WHERE turns.conversation_pk = chain.pk AND turns.seq = chain.at;
    CREATE UNIQUE INDEX turns_by_id ON turns (turn_id);
    CREATE INDEX turns_by_parent ON turns (conversation_pk, parent_seq);
    ALTER TABLE conversations ADD COLUMN head_seq INTEGER;
    ALTER TABLE conversations ADD COLUMN last_seq INTEGER NOT NULL DEFAULT 0;
    UPDATE conversations SET
        head_seq = (SELECT max(seq) FROM turns WHERE conversation_pk = conversations.pk),
        last_seq = coalesce((SELECT max(seq) FROM turns WHERE conversation_pk = conversations.pk), 0);
"""

LEGACY_IMPORTS = """
    CREATE TABLE legacy_imports (
        owner TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        source TEXT NOT NULL,
        entries INTEGER NOT NULL,
        PRIMARY KEY (owner, conversation_id, source)
    );"""

# Backend keys created at run time (SPEC §14; see easybackend/governance/keys.py): only the
# SHA-256 of each secret is kept. A revoked key keeps its row (its name owns conversations and
# is never given again); disabled is 0 or 1; models is a JSON list of names, NULL for every
# model; the limits are NULL when there is none.
API_KEYS = """
    CREATE TABLE api_keys (
        name TEXT PRIMARY KEY,
        secret_sha256 TEXT NOT NULL UNIQUE,
        created_at {time} NOT NULL,
        updated_at {time} NOT NULL,
        expires_at {time},
        revoked_at {time},
        disabled INTEGER NOT NULL DEFAULT 0,
        rpm INTEGER,
        tpm INTEGER,
        tokens_per_day {total},
        tokens_per_month {total},
        models TEXT
    );"""

# key: the conversation's own id; reference: a turn's pointer to it; total: usage sums;
# time: epoch seconds; turns_options: after the turns table's definition; random_id: a new
# turn id for a row of the turns table (the tree migration).
SQLITE_TYPES = {
    "key": "INTEGER PRIMARY KEY",  # the rowid itself
    "reference": "INTEGER",
    "total": "INTEGER",  # 64-bit in SQLite
    "time": "REAL",
    "turns_options": " WITHOUT ROWID",  # stored in primary-key order
    "random_id": "lower(hex(randomblob(12)))",  # as sql.new_turn_id makes them: 24 hex digits
}
POSTGRES_TYPES = {
    "key": "BIGSERIAL PRIMARY KEY",
    "reference": "BIGINT",
    "total": "BIGINT",
    "time": "DOUBLE PRECISION",
    "turns_options": "",
    # 24 hex digits; the pk and seq make every input distinct
    "random_id": "substr(md5(random()::text || ':' || turns.conversation_pk || ':' || turns.seq), 1, 24)",
}
