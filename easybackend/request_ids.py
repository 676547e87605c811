"""Request ids: taken from the client (``X-Request-Id``, gRPC ``x-request-id``) or made up.

Every ask carries one into its access log line, and every transport returns
it to the client, so one id follows a request through client and server logs.
The id travels in the request's :class:`~easybackend.chat.caller.Caller`.
"""

from __future__ import annotations

import re
import uuid

ACCEPTABLE = re.compile(r"[A-Za-z0-9._:\-]{1,64}")


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def accept_request_id(presented: object) -> str:
    """The client's id if it is 1-64 characters of ``A-Z a-z 0-9 . _ : -``, else a new one.

    Anything else (None, a number from a JSON message, a longer string) gets a new id.
    """
    if isinstance(presented, str) and ACCEPTABLE.fullmatch(presented):
        return presented
    return new_request_id()
