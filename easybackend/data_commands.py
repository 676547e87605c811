"""``easybackend import-json DIR`` and ``easybackend export ID``: storage work without the model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio

from .chat.service import validate_conversation_id
from .chat.tokens import TokenCounter, encoding_name_for, load_encoding
from .chat.views import conversation_detail
from .errors import ChatError
from .settings import Settings
from .storage import ConversationRef, open_storage
from .storage.legacy_json import import_directory


class CommandError(Exception):
    """The command cannot do what was asked; the message says why."""


async def import_json(settings: Settings, args: dict[str, str]) -> int:
    """Import the original's files; prints skipped files and one summary line. Exit 0 unless nothing could be read."""
    directory = Path(args["directory"])
    if not await trio.Path(directory).is_dir():
        raise CommandError(f"{directory} is not a directory")
    counter = TokenCounter(load_encoding(encoding_name_for(settings.model, settings.encoding_name)))
    storage = await open_storage(settings)
    try:
        report = await import_directory(directory, storage, counter.text)
    finally:
        await storage.close()
    for skipped in report.skipped:
        print(f"skipped {skipped}", file=sys.stderr)
    print(report.summary())
    return 0


async def export(settings: Settings, args: dict[str, str]) -> int:
    """Write one conversation as JSON (the shape of GET /conversations/{id})."""
    try:
        ref = ConversationRef("", validate_conversation_id(args["conversation_id"]))
    except ChatError as exc:
        raise CommandError(exc.message) from None
    storage = await open_storage(settings)
    try:
        detail = await storage.get_conversation(ref)
    finally:
        await storage.close()
    if detail is None:
        raise CommandError(f"no conversation {ref.conversation_id!r} in {settings.database_url}")
    text = json.dumps(conversation_detail(detail), ensure_ascii=False, indent=2) + "\n"
    if args.get("output"):
        await trio.Path(args["output"]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


COMMANDS = {"import-json": import_json, "export": export}
