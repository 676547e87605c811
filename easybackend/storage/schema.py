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

# Answers that survive a dropped connection (SPEC §18) and several upstreams (SPEC §16): each
# turn keeps the upstream that answered and the lengths of the pieces its answer was streamed
# in, so a replay numbers its events as the live stream did. The background answers in progress
# on PostgreSQL are noted, so that a client reattaching on another instance than the one that
# generates waits for the stored turn (each with the latest time it can still be in progress:
# an instance that died leaves marks that expire).
RESUME = """
    ALTER TABLE turns ADD COLUMN upstream TEXT NOT NULL DEFAULT '';
    ALTER TABLE turns ADD COLUMN pieces TEXT NOT NULL DEFAULT '';
    CREATE TABLE answers_in_progress (
        owner TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        turn_id TEXT NOT NULL,
        until {time} NOT NULL,
        PRIMARY KEY (owner, conversation_id, turn_id)
    );
"""

# The other instances of PostgreSQL and a background answer: the instance generating it writes
# the answer so far on its mark (text, piece lengths, model) every half second, which a follower
# elsewhere reads; a cancel asked elsewhere is noted on the mark, which the generator reads.
ELSEWHERE = """
    ALTER TABLE answers_in_progress ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE answers_in_progress ADD COLUMN text TEXT NOT NULL DEFAULT '';
    ALTER TABLE answers_in_progress ADD COLUMN pieces TEXT NOT NULL DEFAULT '';
    ALTER TABLE answers_in_progress ADD COLUMN model TEXT NOT NULL DEFAULT '';
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

# Memory beyond the window (SPEC §15; chat/memory.py): each conversation's own settings (NULL:
# the server's), running summaries of the tree's paths, each kept with the turn it ends at (so a
# branch has those of its own path, and a deleted turn takes its summaries along), and the
# indexes of the expiry sweep: conversations by last activity for CONVERSATION_TTL, and by the
# moment they expire for those with an expires_in of their own (0: never). The full-text index
# differs by engine (MEMORY_SQLITE_SEARCH, MEMORY_POSTGRES_SEARCH) and follows in the same
# migration.
MEMORY = """
    ALTER TABLE conversations ADD COLUMN title TEXT;
    ALTER TABLE conversations ADD COLUMN model TEXT;
    ALTER TABLE conversations ADD COLUMN temperature {real};
    ALTER TABLE conversations ADD COLUMN max_context_tokens INTEGER;
    ALTER TABLE conversations ADD COLUMN memory TEXT;
    ALTER TABLE conversations ADD COLUMN expires_in {real};
    CREATE INDEX conversations_by_idle ON conversations (updated_at) WHERE expires_in IS NULL;
    CREATE INDEX conversations_by_expiry ON conversations ((updated_at + expires_in))
        WHERE expires_in > 0;
    CREATE TABLE summaries (
        conversation_pk {reference} NOT NULL,
        end_seq INTEGER NOT NULL,
        summary TEXT NOT NULL,
        tokens INTEGER NOT NULL,
        model TEXT NOT NULL,
        updated_at {time} NOT NULL,
        PRIMARY KEY (conversation_pk, end_seq),
        FOREIGN KEY (conversation_pk, end_seq) REFERENCES turns (conversation_pk, seq)
            ON DELETE CASCADE
    ){turns_options};
"""

# SQLite's full-text index: FTS5 with the trigram tokenizer, which matches any substring of
# three characters or more, so a Chinese word is found inside a sentence with no word
# segmentation (unicode61 would take a whole run of CJK text as one token). Contentless: the
# texts stay in their tables only. One document per turn (its prompt and answer; rowid
# conversation pk * 2^32 + seq) and one per title (seq 0). New turns are indexed off the
# answer's path, in batches (sql_memory.index_pending, run in the background and before a
# search): conversations.indexed_seq is the last seq indexed, turns above it are not yet. A
# contentless index forgets a document by being given its text again ('delete'), which the
# triggers have as old.*: a turn deleted or changed is forgotten in its transaction if it was
# indexed (a conversation's turns are deleted before it, while indexed_seq can be read).
MEMORY_SQLITE_SEARCH = """
    CREATE VIRTUAL TABLE search_index USING fts5(body, tokenize = 'trigram', content = '');
    ALTER TABLE conversations ADD COLUMN indexed_seq INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX conversations_to_index ON conversations (pk) WHERE last_seq > indexed_seq;
    INSERT INTO search_index (rowid, body)
        SELECT conversation_pk * 4294967296 + seq, prompt || char(10) || answer FROM turns;
    INSERT INTO search_index (rowid, body)
        SELECT pk * 4294967296, title FROM conversations WHERE title IS NOT NULL;
    UPDATE conversations SET indexed_seq = last_seq;
    CREATE TRIGGER turns_unindexed AFTER DELETE ON turns
    WHEN old.seq <= (SELECT indexed_seq FROM conversations WHERE pk = old.conversation_pk) BEGIN
        INSERT INTO search_index (search_index, rowid, body) VALUES
            ('delete', old.conversation_pk * 4294967296 + old.seq, old.prompt || char(10) || old.answer);
    END;
    CREATE TRIGGER turns_reindexed AFTER UPDATE OF prompt, answer ON turns
    WHEN old.seq <= (SELECT indexed_seq FROM conversations WHERE pk = old.conversation_pk) BEGIN
        INSERT INTO search_index (search_index, rowid, body) VALUES
            ('delete', old.conversation_pk * 4294967296 + old.seq, old.prompt || char(10) || old.answer);
        INSERT INTO search_index (rowid, body)
            VALUES (new.conversation_pk * 4294967296 + new.seq, new.prompt || char(10) || new.answer);
    END;
    CREATE TRIGGER conversations_unindexed BEFORE DELETE ON conversations BEGIN
        DELETE FROM turns WHERE conversation_pk = old.pk;
    END;
    CREATE TRIGGER titles_indexed AFTER INSERT ON conversations WHEN new.title IS NOT NULL BEGIN
        INSERT INTO search_index (rowid, body) VALUES (new.pk * 4294967296, new.title);
    END;
    CREATE TRIGGER titles_reindexed AFTER UPDATE OF title ON conversations BEGIN
        INSERT INTO search_index (search_index, rowid, body)
            SELECT 'delete', old.pk * 4294967296, old.title WHERE old.title IS NOT NULL;
        INSERT INTO search_index (rowid, body)
            SELECT new.pk * 4294967296, new.title WHERE new.title IS NOT NULL;
    END;
    CREATE TRIGGER titles_unindexed AFTER DELETE ON conversations WHEN old.title IS NOT NULL BEGIN
        INSERT INTO search_index (search_index, rowid, body)
            VALUES ('delete', old.pk * 4294967296, old.title);
    END;
"""

# PostgreSQL's: search matches substrings with ILIKE, which finds CJK words inside sentences
# as it finds any text; pg_trgm's GIN indexes make it fast. The extension is created when the
# database lets this user do so (a trusted extension since PostgreSQL 13: the database owner
# may); without it search still works, reading every turn (the store warns at start-up). The
# index's operator class is named with the extension's schema, which need not be on the
# search_path.
MEMORY_POSTGRES_SEARCH = """
    DO $$
    BEGIN
        CREATE EXTENSION IF NOT EXISTS pg_trgm;
    EXCEPTION WHEN OTHERS THEN
        RAISE NOTICE 'pg_trgm is not available: %', SQLERRM;
    END $$;
""" + "\n"
# The indexes, made as soon as pg_trgm is there: by the migration, and again at every start-up
# (postgres._migrate), so that an extension installed later is used from the next start.
POSTGRES_SEARCH_INDEXES = """
    DO $$
    DECLARE
        ops TEXT;
    BEGIN
        SELECT quote_ident(n.nspname) || '.gin_trgm_ops' INTO ops
            FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
            WHERE e.extname = 'pg_trgm';
        IF ops IS NOT NULL THEN
            EXECUTE format(
                'CREATE INDEX IF NOT EXISTS turns_by_text ON turns'
                ' USING gin ((prompt || E''\\n'' || answer) %s)', ops);
            EXECUTE format(
                'CREATE INDEX IF NOT EXISTS conversations_by_title ON conversations'
                ' USING gin (title %s)', ops);
        END IF;
    END $$;
"""
MEMORY_POSTGRES_SEARCH += POSTGRES_SEARCH_INDEXES

# Usage and limits (SPEC §14; easybackend/governance/limits.py): the tokens of every key (its
# name; "" for asks made with keys off) per UTC day and model, which the budgets, GET /usage and
# `easybackend usage` read, and the rate windows PostgreSQL's instances share (one row per
# window: its GCRA time; SQLite keeps its windows in the process). USAGE_BACKFILL fills the
# usage from the turns stored before (a conversation's owner is its key's name), so budgets
# count what was asked before the upgrade; {day} is the engine's UTC day of turns.created_at.
USAGE = """
    CREATE TABLE key_usage (
        key_name TEXT NOT NULL,
        day TEXT NOT NULL,
        model TEXT NOT NULL,
        requests {total} NOT NULL DEFAULT 0,
        prompt_tokens {total} NOT NULL DEFAULT 0,
        completion_tokens {total} NOT NULL DEFAULT 0,
        PRIMARY KEY (key_name, day, model)
    );
    CREATE INDEX key_usage_by_day ON key_usage (day);
    CREATE TABLE rate_windows (
        name TEXT PRIMARY KEY,
        tat {time} NOT NULL
    );
    CREATE INDEX rate_windows_by_time ON rate_windows (tat);
"""
USAGE_BACKFILL = """
    INSERT INTO key_usage (key_name, day, model, requests, prompt_tokens, completion_tokens)
    SELECT c.owner, {day}, t.model, count(*), sum(t.usage_prompt_tokens),
        sum(t.usage_completion_tokens)
    FROM turns t JOIN conversations c ON c.pk = t.conversation_pk
    WHERE t.model <> ''
    GROUP BY c.owner, {day}, t.model;
"""
USAGE_SQLITE_DAY = "strftime('%Y-%m-%d', t.created_at, 'unixepoch')"
USAGE_POSTGRES_DAY = "to_char(to_timestamp(t.created_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"

# key: the conversation's own id; reference: a turn's pointer to it; total: usage sums;
# time: epoch seconds; real: any other number; turns_options: after the turns table's
# definition; random_id: a new turn id for a row of the turns table (the tree migration).
SQLITE_TYPES = {
    "key": "INTEGER PRIMARY KEY",  # the rowid itself
    "reference": "INTEGER",
    "total": "INTEGER",  # 64-bit in SQLite
    "time": "REAL",
    "real": "REAL",
    "turns_options": " WITHOUT ROWID",  # stored in primary-key order
    "random_id": "lower(hex(randomblob(12)))",  # as sql.new_turn_id makes them: 24 hex digits
}
POSTGRES_TYPES = {
    "key": "BIGSERIAL PRIMARY KEY",
    "reference": "BIGINT",
    "total": "BIGINT",
    "time": "DOUBLE PRECISION",
    "real": "DOUBLE PRECISION",
    "turns_options": "",
    # 24 hex digits; the pk and seq make every input distinct
    "random_id": "substr(md5(random()::text || ':' || turns.conversation_pk || ':' || turns.seq), 1, 24)",
}
