"""Schemas on the local PostgreSQL server (127.0.0.1:5432, trust auth, database ``test``).

Each test gets a schema of its own (``new_schema``), so tests run side by side
on one server; URLs select it through ``search_path``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Iterator

import psycopg
import pytest

from .database import LINEAR_POSTGRES_DDL, LinearConversation, linear_rows

PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_ADMIN = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/test"


def pg_url(schema: str, port: int = PG_PORT) -> str:
    """A DATABASE_URL whose connections use ``schema``."""
    return f"postgresql://postgres@{PG_HOST}:{port}/test?options=-csearch_path%3D{schema}"


# Held while the extensions are put in place (several test processes start at once).
EXTENSIONS_LOCK = 0x45617379_54657374


def _shared_extensions(admin: psycopg.Connection) -> None:
    """pg_trgm in ``public``, where no test drops it. Created by a store's migration, it would
    go in that test's schema (the first of its search_path), and dropping that schema with
    CASCADE would drop the extension with the search indexes of every other test's schema,
    locking their tables while those tests write to them: a deadlock."""
    with admin.transaction():
        admin.execute("SELECT pg_advisory_xact_lock(%s)", (EXTENSIONS_LOCK,))
        found = admin.execute(
            "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace"
            " WHERE e.extname = 'pg_trgm'"
        ).fetchone()
        if found is None:
            admin.execute("CREATE EXTENSION pg_trgm SCHEMA public")
        elif found[0] != "public":
            admin.execute("ALTER EXTENSION pg_trgm SET SCHEMA public")


def new_schema() -> Iterator[str]:
    """A fresh, empty schema, dropped with everything in it afterwards even when the test
    fails; the test is skipped without a server, except in CI (where it fails)."""
    schema = f"eb_{secrets.token_hex(6)}"
    try:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as admin:
            _shared_extensions(admin)
            admin.execute(f"CREATE SCHEMA {schema}")
    except psycopg.OperationalError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no PostgreSQL server at {PG_HOST}:{PG_PORT} ({exc.__class__.__name__})")
    try:
        yield schema
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as admin:
            admin.execute("SET lock_timeout = '10s'")
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def write_linear_postgres(schema: str, conversations: Iterable[LinearConversation]) -> None:
    """The tables and rows of the previous release in ``schema`` (easybackend_schema version 1)."""
    with psycopg.connect(pg_url(schema), connect_timeout=5) as connection:
        with connection.transaction():
            connection.execute(LINEAR_POSTGRES_DDL)
            for statement, params in linear_rows(conversations):
                connection.execute(statement.replace("?", "%s"), params)
