"""JSON from clients: the one parser every transport uses for what a client sends as JSON.

Whatever is wrong with the text (not UTF-8, not JSON, ``NaN`` or ``Infinity``, nested so
deep that the parser would run out of stack) becomes :class:`~easybackend.errors.InvalidInput` with a message
that says which, never another exception. A document is also refused when it nests arrays
and objects deeper than :data:`MAX_DEPTH` levels, so that nothing downstream (validation,
echoing an ``id`` back, logging) can meet a structure deep enough to exhaust the stack.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import InvalidInput

MAX_DEPTH = 32  # levels of arrays and objects; an ask needs 2


def parse_client_json(data: str | bytes, what: str) -> Any:
    """``data`` parsed as JSON; raises InvalidInput naming ``what`` ("the message", ...) if it is not.

    Bytes must be UTF-8. Pure: no I/O, nothing to cancel.
    """
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"{what} must be JSON encoded as UTF-8") from None
    try:
        value = json.loads(data, parse_constant=_refuse_constant)
    except RecursionError:
        raise InvalidInput(_too_deep(what)) from None
    except ValueError as exc:
        raise InvalidInput(f"{what} is not valid JSON ({exc})") from None
    if _deeper_than(value, MAX_DEPTH):
        raise InvalidInput(_too_deep(what))
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _too_deep(what: str) -> str:
    return f"{what} nests arrays and objects deeper than {MAX_DEPTH} levels"


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects in ``value`` nest more than ``limit`` levels (walked without recursion)."""
    pending = [(value, 1)] if isinstance(value, dict | list) else []
    while pending:
        item, depth = pending.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        pending.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False
