"""Secrets the settings hold are blanked out of every log line, whatever logged them."""

from __future__ import annotations

import io
import logging

from easybackend.logs import RedactingFormatter, redact, secrets_of
from easybackend.settings import load_settings


def test_every_configured_secret_is_redacted_from_log_lines():
    settings = load_settings(
        {
            "OPENAI_API_KEY": "sk-upstream-123456",
            "API_KEYS": "app:backend-key-987",
            "DATABASE_URL": "postgresql://user:p%40ss-word@db.example/easy",
        },
        environ={},
        env_file=None,
    )
    secrets = secrets_of(settings)
    assert set(secrets) >= {"sk-upstream-123456", "backend-key-987", "p@ss-word", "p%40ss-word"}
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter(logging.Formatter("%(message)s"), secrets))
    logger = logging.getLogger("redaction-test")
    logger.addHandler(handler)
    try:
        logger.warning("bad url: invalid percent-encoded token: %s", "p@ss-word")
        logger.warning("keys sk-upstream-123456 and backend-key-987 and p%40ss-word")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "p@ss-word" not in text and "sk-upstream" not in text and "backend-key" not in text
    assert text.count("***") == 4
    assert redact("nothing secret here", secrets) == "nothing secret here"
