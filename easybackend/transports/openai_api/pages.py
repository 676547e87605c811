"""OpenAI's cursor lists: ``after`` (an item id), ``limit`` (1-100, default 20), ``order``.

A page is ``{"object": "list", "data", "first_id", "last_id", "has_more"}``
(``ResponseItemList``, ``ConversationItemList``); the SDKs ask for the next
page with ``after`` set to the last id of the page they hold.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

import pydantic
from quart import Response

from ...errors import InvalidInput

MAX_LIMIT = 100


class ListQuery(pydantic.BaseModel):
    """The query of a list of items."""

    after: str | None = pydantic.Field(
        None, description="An item id: the page starts after it (in the order asked)"
    )
    limit: int = pydantic.Field(20, ge=1, le=MAX_LIMIT, description="Items per page (1-100)")
    order: Literal["asc", "desc"] = pydantic.Field(
        "desc", description="asc: oldest first; desc: newest first"
    )
    include: list[str] | str | None = pydantic.Field(
        None, description="Accepted and not used (there is nothing more to include)"
    )


def list_page(found: Sequence[dict[str, Any]], query: ListQuery) -> dict[str, Any]:
    """The page of ``found`` (items oldest first, each with an ``id``) that ``query`` asks for.

    Raises InvalidInput (param ``after``) for an ``after`` that is not among them.
    """
    ordered = list(found) if query.order == "asc" else list(reversed(found))
    start = 0
    if query.after is not None:
        positions = [index for index, item in enumerate(ordered) if item["id"] == query.after]
        if not positions:
            raise InvalidInput(f"after: no item {query.after[:80]!r} in this list", param="after")
        start = positions[0] + 1
    page = ordered[start : start + query.limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": start + query.limit < len(ordered),
    }


def json_response(body: dict[str, Any]) -> Response:
    """A 200 JSON response holding ``body``."""
    return Response(json.dumps(body, ensure_ascii=False), mimetype="application/json")
