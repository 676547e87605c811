"""Conversation storage: the serving and transfer protocols and their backends."""

from __future__ import annotations

from ..database_url import DatabaseURL
from ..settings import Settings
from .base import (
    ROOT,
    AnswerProgress,
    ConversationDetail,
    ConversationHead,
    ConversationRef,
    ConversationSummary,
    NewTurn,
    ServingStore,
    Storage,
    StoredTurn,
    TransferStore,
    TurnPosition,
    TurnRecord,
)
from .sqlite import SQLiteStorage

__all__ = [
    "ROOT",
    "AnswerProgress",
    "ConversationDetail",
    "ConversationHead",
    "ConversationRef",
    "ConversationSummary",
    "NewTurn",
    "ServingStore",
    "Storage",
    "StoredTurn",
    "TransferStore",
    "TurnPosition",
    "TurnRecord",
    "open_storage",
]


async def open_storage(settings: Settings) -> Storage:
    """Open the backend ``settings.database_url`` names. Raises StorageUnavailable."""
    return await open_url(settings.database, settings)


async def open_url(url: DatabaseURL | str, settings: Settings) -> Storage:
    """Open the store at ``url`` (sqlite:///PATH or postgresql://…).

    Raises StorageUnavailable, or ValueError for text that is no database URL.
    """
    if isinstance(url, str):
        url = DatabaseURL.parse(url)
    if url.is_postgres:
        from .postgres import PostgresStorage  # psycopg is only loaded when used

        return await PostgresStorage.open(
            url.text, pool_size=settings.pg_pool_size, pool_timeout=settings.pg_pool_timeout
        )
    return await SQLiteStorage.open(url.sqlite_path)
