"""Stored backend keys from the tests' side: the admin key, the admin API, waiting for a change.

Every key the tests choose contains SECRET (see :mod:`helpers.logs`); the
secrets the server makes (``eb-…``) do not, so tests that make them check
the logs for those secrets themselves.
"""

from __future__ import annotations

import time
from typing import Any

import httpx2
import trio

from .http import bearer

ADMIN_KEY = "admin-SECRET-0123456789abcdef"
# How soon a change of the key table must reach every instance (SPEC §14, issue: 5 seconds).
PROPAGATION = 5.0


async def admin_call(
    base_url: str, method: str, path: str, json: Any = None, *, key: str | None = ADMIN_KEY
) -> httpx2.Response:
    """One admin API request (``/admin/…``) presenting ``key`` (None: no key)."""
    async with httpx2.AsyncClient(base_url=base_url, timeout=10, headers=bearer(key)) as client:
        return await client.request(method, path, json=json)


async def create_key(base_url: str, name: str, **fields: Any) -> str:
    """Make a stored key through the admin API; its secret."""
    response = await admin_call(base_url, "POST", "/admin/keys", {"name": name, **fields})
    assert response.status_code == 201, response.text
    return response.json()["secret"]


async def models_status(base_url: str, secret: str | None) -> int:
    """The status of ``GET /models`` presenting ``secret``: a key check that costs no model call."""
    async with httpx2.AsyncClient(base_url=base_url, timeout=10, headers=bearer(secret)) as client:
        return (await client.get("/models")).status_code


async def wait_for_status(
    base_url: str, secret: str | None, status: int, within: float = PROPAGATION
) -> float:
    """Poll ``GET /models`` with ``secret`` until it answers ``status``; the seconds it took.

    Fails the test when ``within`` seconds pass first.
    """
    started = time.monotonic()
    with trio.fail_after(within):
        while await models_status(base_url, secret) != status:
            await trio.sleep(0.05)
    return time.monotonic() - started
