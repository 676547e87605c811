"""The configuration file's ``[[upstream]]`` tables (``CONFIG_FILE`` or ``--config PATH``; TOML).

Each table is one provider::

    [[upstream]]
    name = "deepseek"                     # required, unique
    base_url = "https://api.deepseek.com/v1"  # required
    api_keys = ["${DEEPSEEK_KEY}"]        # required: one or more; ${VAR} reads the environment
    models = ["deepseek-chat"]            # required: the provider model names it serves
    weight = 1                            # optional: its share among upstreams of a model
    max_concurrency = 64                  # optional: answers in progress at most
    proxy = "socks5://127.0.0.1:1080"     # optional: http://, https://, socks5://, socks5h://
    connect_timeout = 10                  # optional, seconds (UPSTREAM_CONNECT_TIMEOUT)
    idle_timeout = 60                     # optional, seconds (UPSTREAM_IDLE_TIMEOUT)
    timeout = 120                         # optional, seconds (UPSTREAM_TIMEOUT)
    encoding = "cl100k_base"              # optional: tiktoken encoding of its models
    kind = "openai"                       # optional: openai (default) or azure
    api_version = "2024-06-01"            # azure only: the api-version query parameter

A malformed file raises :class:`ValueError` whose message is one line naming
the table (``[[upstream]] #2 "deepseek"``) and the field; the settings turn it
into the start-up error.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path

KINDS = ("openai", "azure")
PROXY_SCHEMES = ("http", "https", "socks5", "socks5h")
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_FIELDS = {
    "name", "base_url", "api_keys", "models", "weight", "max_concurrency", "proxy",
    "connect_timeout", "idle_timeout", "timeout", "encoding", "kind", "api_version",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class UpstreamConfig:
    """One provider of the configuration file (keys hidden from ``repr``)."""

    name: str
    base_url: str
    api_keys: tuple[str, ...] = dataclasses.field(repr=False)
    models: tuple[str, ...]
    weight: float = 1.0
    max_concurrency: int | None = None
    proxy: str | None = dataclasses.field(default=None, repr=False)  # may hold credentials
    connect_timeout: float | None = None
    idle_timeout: float | None = None
    timeout: float | None = None
    encoding: str | None = None
    kind: str = "openai"
    api_version: str | None = None


def load_upstreams(path: Path, environ: Mapping[str, str]) -> tuple[UpstreamConfig, ...]:
    """The upstreams of the file at ``path``; raises ValueError with a one-line reason."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"CONFIG_FILE {path} cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ValueError(f"CONFIG_FILE {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"CONFIG_FILE {path} is not valid TOML ({exc})") from None
    unknown = sorted(set(data) - {"upstream"})
    if unknown:
        raise ValueError(f"CONFIG_FILE {path}: unknown top-level key {unknown[0]!r}")
    tables = data.get("upstream")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise ValueError(f"CONFIG_FILE {path} must hold at least one [[upstream]] table")
    upstreams: list[UpstreamConfig] = []
    for number, table in enumerate(tables, 1):
        upstream = _upstream(table, number, environ, path)
        if any(other.name == upstream.name for other in upstreams):
            raise ValueError(
                f'CONFIG_FILE {path}: [[upstream]] #{number} "{upstream.name}": name is '
                "already used by another [[upstream]]"
            )
        upstreams.append(upstream)
    return tuple(upstreams)


def _upstream(
    table: dict[str, object], number: int, environ: Mapping[str, str], path: Path
) -> UpstreamConfig:
    raw_name = table.get("name")
    label = f"[[upstream]] #{number}" + (
        f' "{raw_name}"' if isinstance(raw_name, str) and raw_name.isprintable() else ""
    )

    def fail(field: str, reason: str) -> ValueError:
        return ValueError(f"CONFIG_FILE {path}: {label}: {field} {reason}")

    for field in table:
        if field not in _FIELDS:
            raise fail(field, "is not a known field")

    def text(field: str, *, required: bool = False, secret: bool = False) -> str | None:
        value = table.get(field)
        if value is None:
            if required:
                raise fail(field, "is missing")
            return None
        if not isinstance(value, str) or not value.strip():
            raise fail(field, "must be a non-empty string")
        return _expanded(value, environ, lambda reason: fail(field, reason))

    def seconds(field: str) -> float | None:
        value = table.get(field)
        if value is None:
            return None
        if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
            raise fail(field, "must be a positive number of seconds")
        return float(value)

    name = text("name", required=True)
    assert name is not None
    base_url = text("base_url", required=True)
    assert base_url is not None
    if not base_url.startswith(("http://", "https://")):
        raise fail("base_url", "must start with http:// or https://")
    keys = table.get("api_keys")
    if keys is None:
        raise fail("api_keys", "is missing")
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
        raise fail("api_keys", "must be a non-empty list of strings")
    api_keys = tuple(
        _expanded(key, environ, lambda reason: fail("api_keys", reason)) for key in keys
    )
    if not all(key.strip() for key in api_keys):
        raise fail("api_keys", "holds an empty key")
    models = table.get("models")
    if models is None:
        raise fail("models", "is missing")
    if (
        not isinstance(models, list)
        or not models
        or not all(isinstance(m, str) and m.strip() for m in models)
    ):
        raise fail("models", "must be a non-empty list of model names")
    weight = table.get("weight", 1)
    if type(weight) not in (int, float) or not math.isfinite(weight) or weight <= 0:
        raise fail("weight", "must be a positive number")
    concurrency = table.get("max_concurrency")
    if concurrency is not None and (type(concurrency) is not int or concurrency < 1):
        raise fail("max_concurrency", "must be a positive whole number")
    proxy = text("proxy", secret=True)
    if proxy is not None:
        scheme = proxy.split("://", 1)[0].lower() if "://" in proxy else ""
        if scheme not in PROXY_SCHEMES:
            raise fail("proxy", "must start with " + ", ".join(f"{s}://" for s in PROXY_SCHEMES))
    kind = text("kind") or "openai"
    if kind not in KINDS:
        raise fail("kind", "must be openai or azure")
    api_version = text("api_version")
    if kind == "azure" and api_version is None:
        raise fail("api_version", 'is missing (kind = "azure" needs it)')
    return UpstreamConfig(
        name=name,
        base_url=base_url.rstrip("/"),
        api_keys=api_keys,
        models=tuple(models),
        weight=float(weight),
        max_concurrency=concurrency,
        proxy=proxy,
        connect_timeout=seconds("connect_timeout"),
        idle_timeout=seconds("idle_timeout"),
        timeout=seconds("timeout"),
        encoding=text("encoding"),
        kind=kind,
        api_version=api_version,
    )


def shown_key(index: int, key: str) -> str:
    """A key as shown anywhere: its number, and its last four characters when it is long enough."""
    return f"#{index + 1} …{key[-4:]}" if len(key) > 8 else f"#{index + 1}"


def _expanded(value: str, environ: Mapping[str, str], fail) -> str:  # type: ignore[no-untyped-def]
    """``value`` with each ``${VAR}`` replaced by that environment variable (which must be set)."""

    def one(match: re.Match[str]) -> str:
        variable = match.group(1)
        if variable not in environ:
            raise fail(f"names ${{{variable}}}, which is not set")
        return environ[variable]

    return _ENV_REFERENCE.sub(one, value)
