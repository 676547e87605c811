"""Logging: console or JSON lines, to stderr and optionally to a rotating file.

``LOG_FORMAT=json`` writes one JSON object per line with ``time``, ``level``,
``logger``, ``message`` and, for access lines, their fields (``request_id``,
``protocol``, ``conversation_id``, ``key``, ``upstream``, ``outcome``, ``ttft_ms``,
``duration_ms``, ``prompt_tokens``, ``completion_tokens``). ``LOG_FILE``
adds a file rotated at :data:`FILE_MAX_BYTES` with :data:`FILE_BACKUPS` old
files kept. Every line is checked for the secrets the settings hold (keys, a
database password) and they are blanked out, whatever logged them. hypercorn's own messages go through the same handlers. Loggers of
libraries that would log request bodies or URLs stay at WARNING.
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import sys

from .settings import Settings

FILE_MAX_BYTES = 10 * 1024 * 1024
FILE_BACKUPS = 5
CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET_LIBRARIES = ("httpx", "httpx2", "httpcore", "httpcore2", "openai", "hpack", "h2", "purerpc")


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        data: dict[str, object] = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update(getattr(record, "access", None) or {})
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def secrets_of(settings: Settings) -> list[str]:
    """Every secret the settings hold: the upstream key, the backend keys, the admin key, the
    webhook's signing secret, a database password."""
    found = [
        settings.openai_api_key,
        *settings.api_keys.values(),
        settings.admin_key,
        settings.webhook_secret,
        *settings.database.secrets,
    ]
    return [secret for secret in found if secret and len(secret) >= 4]


def redact(text: str, secrets: list[str]) -> str:
    """``text`` with every secret replaced by ``***``."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


class RedactingFormatter(logging.Formatter):
    """Formats with ``inner``, then blanks out the secrets: a last guard, should any reach a line."""

    def __init__(self, inner: logging.Formatter, secrets: list[str]) -> None:
        super().__init__()
        self.inner = inner
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record), self.secrets)


def configure_logging(settings: Settings) -> None:
    """Install the handlers on the root logger (replacing any), as the settings say."""
    inner = JsonFormatter() if settings.log_format == "json" else logging.Formatter(CONSOLE_FORMAT)
    formatter = RedactingFormatter(inner, secrets_of(settings))
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if settings.log_file is not None:
        settings.log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.RotatingFileHandler(
                settings.log_file,
                maxBytes=FILE_MAX_BYTES,
                backupCount=FILE_BACKUPS,
                encoding="utf-8",
            )
        )
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(settings.log_level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(
            max(logging.WARNING, logging.getLevelName(settings.log_level))
        )
