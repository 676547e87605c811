"""Storage work without the model: ``easybackend import-json DIR``, ``easybackend export ID``
and ``easybackend migrate-storage --from URL --to URL``."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import trio

from .chat.service import validate_conversation_id
from .chat.tokens import TokenCounter, encoding_name_for, load_encoding
from .chat.views import conversation_detail
from .database_url import DatabaseURL
from .errors import ChatError, StorageUnavailable
from .settings import Settings
from .storage import ConversationRef, Storage, open_url
from .storage.legacy_json import import_directory
from .storage.migrate import TargetNotEmpty, copy_conversations


class CommandError(Exception):
    """The command cannot do what was asked; the message says why."""


async def import_json(settings: Settings, args: dict[str, str]) -> int:
    """Import the original's files; prints skipped files and one summary line. Exit 0 unless nothing could be read."""
    directory = Path(args["directory"])
    if not await trio.Path(directory).is_dir():
        raise CommandError(f"{directory} is not a directory")
    counter = TokenCounter(load_encoding(encoding_name_for(settings.model, settings.encoding_name)))
    storage = await _open("DATABASE_URL", settings.database, settings)
    try:
        report = await import_directory(directory, storage, counter.text)
    finally:
        await storage.close()
    for skipped in report.skipped:
        print(f"skipped {skipped}", file=sys.stderr)
    print(report.summary())
    return 0


async def export(settings: Settings, args: dict[str, str]) -> int:
    """Write one conversation as JSON (the shape of GET /conversations/{id}?view=tree: the
    active path as ``history``, every turn with its id and parent as ``tree``)."""
    try:
        ref = ConversationRef("", validate_conversation_id(args["conversation_id"]))
    except ChatError as exc:
        raise CommandError(exc.message) from None
    storage = await _open("DATABASE_URL", settings.database, settings)
    try:
        detail = await storage.get_conversation(ref)
    finally:
        await storage.close()
    if detail is None:
        raise CommandError(
            f"no conversation {ref.conversation_id!r} in {settings.database.redacted()}"
        )
    text = json.dumps(conversation_detail(detail, tree=True), ensure_ascii=False, indent=2) + "\n"
    if args.get("output"):
        await trio.Path(args["output"]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


async def migrate_storage(settings: Settings, args: dict[str, str]) -> int:
    """Copy every conversation from ``--from`` to ``--to`` (see :mod:`easybackend.storage.migrate`).

    Prints one summary line. Refuses a target that holds conversations unless
    ``--force``. Messages never show a password of either URL.
    """
    try:
        source_url = DatabaseURL.parse(args["source"], name="--from")
        target_url = DatabaseURL.parse(args["target"], name="--to")
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if source_url.same_store(target_url):
        raise CommandError("--from and --to name the same database")
    if not source_url.is_postgres and not await trio.Path(source_url.sqlite_path).is_file():
        raise CommandError(f"--from {source_url.redacted()}: no such database file")
    try:
        source = await _open("--from", source_url, settings)
        try:
            target = await _open("--to", target_url, settings)
            try:
                report = await copy_conversations(source, target, force=bool(args.get("force")))
            finally:
                await target.close()
        finally:
            await source.close()
    except (StorageUnavailable, TargetNotEmpty) as exc:
        raise CommandError(target_url.scrub(source_url.scrub(str(exc)))) from None
    print(report.summary(source_url.redacted(), target_url.redacted()))
    return 0


async def _open(flag: str, url: DatabaseURL, settings: Settings) -> Storage:
    """Open the store at ``url``; a PostgreSQL error names ``flag`` and the URL without its password.

    (A SQLite error names its file already.)
    """
    _quiet_driver_logs()
    try:
        return await open_url(url, settings)
    except StorageUnavailable as exc:
        if not url.is_postgres:
            raise StorageUnavailable(f"{flag}: {exc.message}") from None
        reason = await _connection_failure(url, settings) or exc.message
        raise StorageUnavailable(f"{flag} {url.redacted()}: {url.scrub(reason)}") from None


async def _connection_failure(url: DatabaseURL, settings: Settings) -> str | None:
    """Why one plain connection to ``url`` fails (the pool only says it timed out), or None."""
    import psycopg  # only loaded for PostgreSQL URLs

    def probe() -> str | None:
        try:
            psycopg.connect(url.text, connect_timeout=max(1, int(settings.pg_pool_timeout))).close()
        except psycopg.Error as exc:
            lines = str(exc).strip().splitlines()
            return f"cannot connect: {lines[0] if lines else type(exc).__name__}"[:300]
        return None

    return await trio.to_thread.run_sync(probe)


def _quiet_driver_logs() -> None:
    """Keep the connection pool's retry warnings off the terminal: the error line says why.

    These commands configure no logging, so Python would print the pool's
    warnings (which can quote the connection string) to stderr.
    """
    driver = logging.getLogger("psycopg")
    if not driver.handlers:
        driver.addHandler(logging.NullHandler())


COMMANDS = {"import-json": import_json, "export": export, "migrate-storage": migrate_storage}
