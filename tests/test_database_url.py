"""DatabaseURL: parsing, and every place a PostgreSQL URL can hold a password."""

from __future__ import annotations

import pytest

from easybackend.database_url import DatabaseURL
from easybackend.logs import redact, secrets_of
from easybackend.settings import ConfigError, load_settings

# (URL, the passwords as they may appear in text, as written and decoded)
SECRET_PLACES = [
    ("postgresql://app:PW-SECRET-1@db:5432/chat", {"PW-SECRET-1"}),
    ("postgres://app:PW-SECRET-2@db/chat", {"PW-SECRET-2"}),
    ("postgresql://app:PW%40SECRET%3A3@db/chat", {"PW%40SECRET%3A3", "PW@SECRET:3"}),
    ("postgresql://app@db/chat?password=PW-SECRET-4", {"PW-SECRET-4"}),
    ("postgresql://app@db/chat?sslmode=require&PASSWORD=PW-SECRET-5", {"PW-SECRET-5"}),
    ("postgresql://app@db/chat?pass%77ord=PW-SECRET-6", {"PW-SECRET-6"}),
    ("postgresql://app@db/chat?password=PW+SECRET%2B7", {"PW+SECRET%2B7", "PW+SECRET+7"}),
    (
        "postgresql://app:PW-SECRET-8a@db/chat?password=PW-SECRET-8b",
        {"PW-SECRET-8a", "PW-SECRET-8b"},
    ),
]


@pytest.mark.parametrize(("text", "passwords"), SECRET_PLACES)
def test_every_password_is_found_and_hidden(text: str, passwords: set[str]) -> None:
    url = DatabaseURL.parse(text)
    assert url.is_postgres
    assert passwords <= set(url.secrets)
    shown = url.redacted()
    assert "SECRET" not in shown and "***" in shown
    assert "SECRET" not in str(url) and "SECRET" not in repr(url)
    assert "SECRET" not in url.scrub(f"could not connect to {text} with {' '.join(passwords)}")


@pytest.mark.parametrize(("text", "passwords"), SECRET_PLACES)
def test_log_redaction_knows_every_place(text: str, passwords: set[str]) -> None:
    settings = load_settings({"DATABASE_URL": text}, environ={}, env_file=None, demo=True)
    secrets = secrets_of(settings)
    for password in passwords:
        assert "SECRET" not in redact(f"connecting with {password}", secrets)


def test_redacted_keeps_what_is_not_secret() -> None:
    url = DatabaseURL.parse("postgresql://app:PW-SECRET@db:5432/chat?sslmode=require")
    assert url.redacted() == "postgresql://app:***@db:5432/chat?sslmode=require"
    assert DatabaseURL.parse("postgresql://app@db/chat").secrets == []


def test_sqlite_urls() -> None:
    url = DatabaseURL.parse("sqlite:///data/chat.sqlite3")
    assert not url.is_postgres and url.secrets == []
    assert str(url.sqlite_path) == "data/chat.sqlite3"
    assert url.same_store(DatabaseURL.parse("sqlite:///./data/chat.sqlite3"))
    assert not url.same_store(DatabaseURL.parse("postgresql://db/chat"))


@pytest.mark.parametrize("text", ["mysql://root:PW-SECRET@db/x", "sqlite:///", "chat.db", ""])
def test_unsupported_urls_are_refused_without_their_secret(text: str) -> None:
    with pytest.raises(ValueError, match="not a supported database URL") as refused:
        DatabaseURL.parse(text, name="--to")
    assert "SECRET" not in str(refused.value) and "--to" in str(refused.value)
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        load_settings({"DATABASE_URL": text or "x"}, environ={}, env_file=None, demo=True)
