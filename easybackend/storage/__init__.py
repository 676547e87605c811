"""Conversation storage: the protocol and its backends."""

from __future__ import annotations

from ..settings import Settings
from .base import (
    Context,
    ConversationDetail,
    ConversationRef,
    ConversationSummary,
    NewTurn,
    Storage,
    StoredTurn,
    TurnRecord,
)
from .sqlite import SQLiteStorage

__all__ = [
    "Context",
    "ConversationDetail",
    "ConversationRef",
    "ConversationSummary",
    "NewTurn",
    "Storage",
    "StoredTurn",
    "TurnRecord",
    "open_storage",
]


async def open_storage(settings: Settings) -> Storage:
    """Open the backend ``settings.database_url`` names. Raises StorageUnavailable."""
    return await SQLiteStorage.open(settings.sqlite_path)
