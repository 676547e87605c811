"""Answer pieces cut to fit a message limit, for the transports whose messages have one.

A model (or a fast stream read in one go) can hand over a piece larger than the
largest message a client accepts: MAX_BODY_BYTES, which the WebSocket and gRPC
clients are told to use. :func:`split_utf8` cuts such a piece into consecutive
pieces of at most so many bytes of UTF-8, never inside a character;
:func:`split_json_text` does the same for text sent inside a JSON string, where
escapes (``\\n``, ``\\"``, ``\\u0001``) take more bytes than the characters.
Joined, the pieces give the text back exactly. A piece that fits is returned
as it is, without being encoded (the common case costs a length check).
"""

from __future__ import annotations

import json

MAX_UTF8_BYTES = 4  # per character (a lone surrogate, passed through, takes 3)
MAX_JSON_ESCAPE_BYTES = 6  # per byte of UTF-8: a control character becomes \u00XX
MAX_JSON_BYTES_PER_CHAR = MAX_UTF8_BYTES * MAX_JSON_ESCAPE_BYTES


def split_utf8(text: str, max_bytes: int) -> list[str]:
    """``text`` in pieces of at most ``max_bytes`` bytes of UTF-8 each (``max_bytes`` >= 4)."""
    if len(text) * MAX_UTF8_BYTES <= max_bytes:
        return [text]
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= max_bytes:
        return [text]
    max_bytes = max(max_bytes, MAX_UTF8_BYTES)
    pieces = []
    start = 0
    while start < len(data):
        end = start + max_bytes
        if end < len(data):
            while data[end] & 0xC0 == 0x80:  # a continuation byte: the character starts before
                end -= 1
        pieces.append(data[start:end].decode("utf-8", "surrogatepass"))
        start = end
    return pieces


def split_json_text(text: str, max_bytes: int) -> list[str]:
    """``text`` in pieces whose JSON string encoding (UTF-8, quotes excluded) is at most ``max_bytes``."""
    if len(text) * MAX_JSON_BYTES_PER_CHAR <= max_bytes:
        return [text]
    pieces = []
    for piece in split_utf8(text, max_bytes):
        if json_text_bytes(piece) <= max_bytes:
            pieces.append(piece)
        else:  # escapes made it longer: cut it where even all-escapes would fit
            pieces.extend(split_utf8(piece, max_bytes // MAX_JSON_ESCAPE_BYTES))
    return pieces


def json_text_bytes(text: str) -> int:
    """The bytes of ``text`` as a JSON string (as sent: ``ensure_ascii=False``), without its quotes."""
    return len(json.dumps(text, ensure_ascii=False).encode("utf-8", "surrogatepass")) - 2
