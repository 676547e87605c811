"""Request ids: taken from the client (``X-Request-Id``, gRPC ``x-request-id``) or made up.

Every ask carries one into its access log line, and every transport returns
it to the client, so one id follows a request through client and server logs.
"""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

ACCEPTABLE = re.compile(r"[A-Za-z0-9._:\-]{1,64}")

# Set by a transport whose handlers cannot be handed the id explicitly (gRPC).
CURRENT: ContextVar[str | None] = ContextVar("easybackend_request_id", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def accept_request_id(presented: str | None) -> str:
    """The client's id if it is 1-64 characters of ``A-Z a-z 0-9 . _ : -``, else a new one."""
    if presented and ACCEPTABLE.fullmatch(presented):
        return presented
    return new_request_id()


def current_request_id() -> str:
    """The id the transport set for this task, else a new one."""
    return CURRENT.get() or new_request_id()
