"""The one settings object, built once at start-up and passed down explicitly.

Sources, strongest first: command-line flags, the process environment, a
``.env`` file in the working directory (or ``--env-file``), the defaults.
Every value is parsed and checked here; a bad one raises :class:`ConfigError`
whose message is the single line the command prints before exiting.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

import dotenv

from .auth import parse_api_keys
from .database_url import DatabaseURL
from .governance.models import ModelEntry, parse_models
from .upstream.config import UpstreamConfig, load_upstreams

DEFAULT_MODEL = "gpt-4.1-mini"
MIN_ADMIN_KEY = 16  # characters of ADMIN_KEY at least
MIN_WEBHOOK_SECRET = 16  # characters of WEBHOOK_SECRET at least


class ConfigError(Exception):
    """A setting is missing or malformed; the message names it and says why."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Validated configuration. Ports are ``None`` when that listener is off."""

    openai_api_key: str = dataclasses.field(default="", repr=False)
    openai_base_url: str | None = None
    config_file: Path | None = None  # CONFIG_FILE: its [[upstream]] tables are ``upstreams``
    upstreams: tuple[UpstreamConfig, ...] = ()  # empty: OPENAI_BASE_URL + OPENAI_API_KEY
    model: str = DEFAULT_MODEL
    models: tuple[ModelEntry, ...] = ()  # MODELS: the allow-list; empty: GPT_ENGINE alone
    encoding_name: str | None = None
    first_prompt: str | None = None
    temperature: float = 0.5
    max_context_tokens: int = 4096
    max_response_tokens: int | None = None
    strip_blank_lines: bool = False
    host: str = "0.0.0.0"
    http_port: int | None = 8000
    grpc_port: int | None = 9000
    ws_port: int | None = 9001
    conversations_dir: Path = Path("conversations")
    database_url: str = ""
    pg_pool_size: int = 20
    pg_pool_timeout: float = 5.0
    log_level: str = "INFO"
    log_format: str = "console"
    log_file: Path | None = None
    upstream_timeout: float = 120.0
    upstream_connect_timeout: float = 10.0
    upstream_idle_timeout: float = 60.0
    upstream_retries: int = 2
    upstream_transport: str = "lean"  # lean (upstream/transport.py) or httpx (httpx's own)
    shutdown_grace: float = 30.0
    max_body_bytes: int = 1024 * 1024
    max_prompt_chars: int = 100_000
    api_keys: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)
    max_streams_per_key: int = 64
    user_rpm: int | None = None  # requests per minute of each end user (an ask's user) of a key
    admin_key: str = dataclasses.field(default="", repr=False)  # the admin API's; "" turns it off
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    cors_origins: tuple[str, ...] = ("*",)
    public_docs: bool = True
    console: bool = True  # CONSOLE: the web console at / (easybackend/console/)
    public_metrics: bool = True
    ws_handshake_timeout: float = 10.0
    ws_idle_timeout: float = 300.0
    # Hostile-input limits (README "Hostile input")
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    client_send_timeout: float = 30.0  # seconds one send to a client may block
    max_answer_chars: int = 1_000_000  # longest answer kept; beyond it the answer ends "length"
    http_header_timeout: float = 10.0  # seconds a client may take to send a request head
    # Memory beyond the window (SPEC §15; README "Memory"): each conversation's own settings
    # override these.
    memory: str = "truncate"  # MEMORY: truncate or summarize
    conversation_ttl: float | None = None  # seconds idle before a conversation is forgotten
    summary_model: str | None = None  # None: the model the conversation asks
    summary_prompt: str | None = None  # None: the built-in one (chat/memory.py)
    summary_threshold: int | None = None  # tokens dropped before a summary; None: budget / 4
    summary_max_tokens: int | None = None  # cap on a summary's length; None: see memory.py
    auto_title: bool = False  # the model names a conversation after its first turn
    title_prompt: str | None = None  # None: the built-in one (chat/memory.py)
    sweep_interval: float = 60.0  # seconds between two sweeps of expired conversations
    background_jobs: int = 4  # summaries and titles made at once
    # The webhook of background answers (chat/webhooks.py; docs/deploy.md "Webhook")
    webhook_url: str | None = dataclasses.field(default=None, repr=False)  # may hold a token
    webhook_secret: str = dataclasses.field(default="", repr=False)  # the HMAC key
    webhook_timeout: float = 10.0  # seconds one delivery attempt may take
    webhook_retries: int = 5  # retries of a delivery after the first attempt
    demo: bool = False

    @property
    def database(self) -> DatabaseURL:
        """``database_url`` as the checked type every user of it goes through."""
        return DatabaseURL(self.database_url)

    @property
    def sqlite_path(self) -> Path:
        """The SQLite database file named by ``database_url``."""
        return self.database.sqlite_path


# variable name -> (field, parser). Parsers raise ValueError with a short reason.
def _text(value: str) -> str:
    return value


def _optional_text(value: str) -> str | None:
    return value or None


def _port(value: str) -> int | None:
    if value.strip().lower() in ("", "0", "off", "none", "disabled"):
        return None
    port = int(value)
    if not 1 <= port <= 65535:
        raise ValueError("must be 1-65535, or 0/off to disable the listener")
    return port


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("must be a positive whole number")
    return number


def _optional_positive_int(value: str) -> int | None:
    return _positive_int(value) if value.strip() else None


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def _seconds(value: str) -> float:
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError("must be a positive number of seconds")
    return number


def _temperature(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 2.0:
        raise ValueError("must be between 0 and 2")
    return number


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def _memory(value: str) -> str:
    policy = value.strip().lower()
    if policy not in ("truncate", "summarize"):
        raise ValueError("must be truncate or summarize")
    return policy


def _optional_seconds(value: str) -> float | None:
    """Seconds, or unset: empty, 0, off, never or none."""
    if value.strip().lower() in ("", "0", "off", "never", "none"):
        return None
    return _seconds(value)


def _log_level(value: str) -> str:
    level = value.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return level


def _log_format(value: str) -> str:
    if value.strip().lower() not in ("console", "json"):
        raise ValueError("must be console or json")
    return value.strip().lower()


def _upstream_transport(value: str) -> str:
    if value.strip().lower() not in ("lean", "httpx"):
        raise ValueError("must be lean or httpx")
    return value.strip().lower()


def _admin_key(value: str) -> str:
    secret = value.strip()
    if secret and (len(secret) < MIN_ADMIN_KEY or any(c.isspace() for c in secret)):
        raise ValueError(f"must be at least {MIN_ADMIN_KEY} characters without blanks")
    return secret


def _webhook_url(value: str) -> str | None:
    url = value.strip()
    if not url:
        return None
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise ValueError("must be an http:// or https:// URL") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    return url


def _webhook_secret(value: str) -> str:
    secret = value.strip()
    if secret and len(secret) < MIN_WEBHOOK_SECRET:
        raise ValueError(f"must be at least {MIN_WEBHOOK_SECRET} characters")
    return secret


def _optional_path(value: str) -> Path | None:
    return Path(value) if value.strip() else None


def _origins(value: str) -> tuple[str, ...]:
    origins = tuple(origin.strip().rstrip("/") for origin in value.split(",") if origin.strip())
    for origin in origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ValueError("must be * or origins like https://example.com, separated by commas")
    return origins


def _networks(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    try:
        return tuple(
            ipaddress.ip_network(item.strip(), strict=False)
            for item in value.split(",")
            if item.strip()
        )
    except ValueError:
        raise ValueError(
            "must be IP addresses or networks (10.0.0.0/8), separated by commas"
        ) from None


ENVIRONMENT = {
    "OPENAI_API_KEY": ("openai_api_key", _text),
    "OPENAI_BASE_URL": ("openai_base_url", _optional_text),
    "CONFIG_FILE": ("config_file", _optional_path),
    "GPT_ENGINE": ("model", _text),
    "MODELS": ("models", parse_models),
    "ENCODING_NAME": ("encoding_name", _optional_text),
    "FIRST_PROMPT": ("first_prompt", _optional_text),
    "TEMPERATURE": ("temperature", _temperature),
    "MAX_CONTEXT_TOKENS": ("max_context_tokens", _positive_int),
    "MAX_RESPONSE_TOKENS": ("max_response_tokens", _optional_positive_int),
    "STRIP_BLANK_LINES": ("strip_blank_lines", _bool),
    "HOST": ("host", _text),
    "HTTP_PORT": ("http_port", _port),
    "GRPC_PORT": ("grpc_port", _port),
    "WS_PORT": ("ws_port", _port),
    "CONVERSATIONS_DIR": ("conversations_dir", Path),
    "DATABASE_URL": ("database_url", _text),
    "PG_POOL_SIZE": ("pg_pool_size", _positive_int),
    "PG_POOL_TIMEOUT": ("pg_pool_timeout", _seconds),
    "LOG_LEVEL": ("log_level", _log_level),
    "LOG_FORMAT": ("log_format", _log_format),
    "LOG_FILE": ("log_file", _optional_path),
    "UPSTREAM_TIMEOUT": ("upstream_timeout", _seconds),
    "UPSTREAM_CONNECT_TIMEOUT": ("upstream_connect_timeout", _seconds),
    "UPSTREAM_IDLE_TIMEOUT": ("upstream_idle_timeout", _seconds),
    "UPSTREAM_RETRIES": ("upstream_retries", _non_negative_int),
    "UPSTREAM_TRANSPORT": ("upstream_transport", _upstream_transport),
    "SHUTDOWN_GRACE": ("shutdown_grace", _seconds),
    "MAX_BODY_BYTES": ("max_body_bytes", _positive_int),
    "MAX_PROMPT_CHARS": ("max_prompt_chars", _positive_int),
    "API_KEYS": ("api_keys", parse_api_keys),
    "ADMIN_KEY": ("admin_key", _admin_key),
    "MAX_STREAMS_PER_KEY": ("max_streams_per_key", _positive_int),
    "USER_RPM": ("user_rpm", _optional_positive_int),
    "TLS_CERTFILE": ("tls_certfile", _optional_path),
    "TLS_KEYFILE": ("tls_keyfile", _optional_path),
    "CORS_ORIGINS": ("cors_origins", _origins),
    "PUBLIC_DOCS": ("public_docs", _bool),
    "CONSOLE": ("console", _bool),
    "PUBLIC_METRICS": ("public_metrics", _bool),
    "WS_HANDSHAKE_TIMEOUT": ("ws_handshake_timeout", _seconds),
    "WS_IDLE_TIMEOUT": ("ws_idle_timeout", _seconds),
    "TRUSTED_PROXIES": ("trusted_proxies", _networks),
    "CLIENT_SEND_TIMEOUT": ("client_send_timeout", _seconds),
    "MAX_ANSWER_CHARS": ("max_answer_chars", _positive_int),
    "HTTP_HEADER_TIMEOUT": ("http_header_timeout", _seconds),
    "MEMORY": ("memory", _memory),
    "CONVERSATION_TTL": ("conversation_ttl", _optional_seconds),
    "SUMMARY_MODEL": ("summary_model", _optional_text),
    "SUMMARY_PROMPT": ("summary_prompt", _optional_text),
    "SUMMARY_THRESHOLD": ("summary_threshold", _optional_positive_int),
    "SUMMARY_MAX_TOKENS": ("summary_max_tokens", _optional_positive_int),
    "AUTO_TITLE": ("auto_title", _bool),
    "TITLE_PROMPT": ("title_prompt", _optional_text),
    "SWEEP_INTERVAL": ("sweep_interval", _seconds),
    "BACKGROUND_JOBS": ("background_jobs", _positive_int),
    "WEBHOOK_URL": ("webhook_url", _webhook_url),
    "WEBHOOK_SECRET": ("webhook_secret", _webhook_secret),
    "WEBHOOK_TIMEOUT": ("webhook_timeout", _seconds),
    "WEBHOOK_RETRIES": ("webhook_retries", _non_negative_int),
}
# never echoed in an error (a webhook URL may carry a token in its query or user part)
SECRET_VARIABLES = {"OPENAI_API_KEY", "API_KEYS", "ADMIN_KEY", "WEBHOOK_URL", "WEBHOOK_SECRET"}


def load_settings(
    overrides: Mapping[str, str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    env_file: str | os.PathLike[str] | None = ".env",
    demo: bool = False,
    need_api_key: bool = True,
) -> Settings:
    """Build and validate the settings.

    ``overrides`` holds values from command-line flags, keyed by the
    environment variable they stand for. ``need_api_key=False`` is for
    commands that never call the model (import, export). Raises
    :class:`ConfigError`.
    """
    merged: dict[str, str] = {}
    if env_file is not None and Path(env_file).is_file():
        merged.update({k: v for k, v in dotenv.dotenv_values(env_file).items() if v is not None})
    merged.update(os.environ if environ is None else environ)
    merged.update(overrides or {})

    values: dict[str, object] = {"demo": demo}
    for variable, (field, parse) in ENVIRONMENT.items():
        raw = merged.get(variable)
        if raw is None:
            continue
        try:
            values[field] = parse(raw)
        except ValueError as exc:
            reason = str(exc) if "must" in str(exc) else "is not a valid value"
            shown = variable if variable in SECRET_VARIABLES else f"{variable}={raw!r}"
            raise ConfigError(f"{shown} {reason}") from None

    config_file = values.get("config_file")
    if isinstance(config_file, Path):
        try:
            values["upstreams"] = load_upstreams(config_file, merged)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    settings = Settings(**values)  # type: ignore[arg-type]
    return _checked(settings, need_api_key)


def _checked(settings: Settings, need_api_key: bool) -> Settings:
    if not settings.model.strip():
        raise ConfigError("GPT_ENGINE must name a model")
    if settings.models and not any(
        settings.model in (entry.name, entry.model) for entry in settings.models
    ):
        raise ConfigError(
            f"GPT_ENGINE ({settings.model}) must be in MODELS, as a name or as the model of an"
            " alias: it is the model of every ask that names none"
        )
    if settings.admin_key and settings.admin_key in settings.api_keys.values():
        raise ConfigError("ADMIN_KEY must differ from every secret of API_KEYS")
    if (
        not settings.openai_api_key
        and not settings.upstreams
        and not settings.demo
        and need_api_key
    ):
        raise ConfigError(
            "OPENAI_API_KEY is not set: export it (or put it in .env), or start with --demo"
        )
    if settings.webhook_url and not settings.webhook_secret:
        raise ConfigError(
            "WEBHOOK_SECRET must be set when WEBHOOK_URL is: every delivery is signed with it"
        )
    if (settings.tls_certfile is None) != (settings.tls_keyfile is None):
        raise ConfigError("TLS_CERTFILE and TLS_KEYFILE must be set together")
    budget = settings.max_context_tokens - (settings.max_response_tokens or 0)
    if budget < 16:
        raise ConfigError(
            "MAX_CONTEXT_TOKENS minus MAX_RESPONSE_TOKENS leaves no room for a prompt"
        )
    if settings.summary_max_tokens is not None and settings.summary_max_tokens * 2 > budget:
        raise ConfigError(
            "SUMMARY_MAX_TOKENS must be at most half of MAX_CONTEXT_TOKENS minus"
            " MAX_RESPONSE_TOKENS: a summary is sent with the turns it leaves room for"
        )
    database_url = (
        settings.database_url or f"sqlite:///{settings.conversations_dir / 'easybackend.sqlite3'}"
    )
    try:
        DatabaseURL.parse(database_url)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return dataclasses.replace(settings, database_url=database_url)
