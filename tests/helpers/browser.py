"""Driving the web console in a real browser: Playwright with Debian's Chromium.

Playwright's sync API blocks, and the server under test runs in the test's trio nursery on
the same thread, so each scenario runs in a worker thread (:func:`in_browser`). Every
request to a host other than the server is aborted and recorded; :func:`in_browser` fails
the test if there was any. No browser is downloaded: ``/usr/bin/chromium`` is launched.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def skip_without_browser() -> None:
    """Skip without Playwright or chromium; in CI (``CI`` set) fail instead, as .ci/run has both."""
    missing = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "playwright is not installed (pip install -e '.[test]')"
    if missing is None and not shutil.which("chromium"):
        missing = "chromium is not installed (apt-get install -y chromium)"
    if missing and os.environ.get("CI"):
        pytest.fail(missing)
    if missing:
        pytest.skip(missing)


def _run(base_url: str, scenario: Callable[[Any], object], options: dict[str, Any]) -> object:
    from playwright.sync_api import sync_playwright

    own = urlsplit(base_url).netloc
    elsewhere: list[str] = []

    def route(route: Any) -> None:
        url = route.request.url
        if urlsplit(url).netloc == own or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            elsewhere.append(url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            context = browser.new_context(
                base_url=base_url, viewport={"width": 1280, "height": 800}, **options
            )
            context.set_default_timeout(10_000)
            context.route("**/*", route)
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            result = scenario(page)
            assert not errors, errors
        finally:
            browser.close()
    assert not elsewhere, f"requests to other hosts: {elsewhere}"
    return result


async def in_browser(base_url: str, scenario: Callable[[Any], object], **options: Any) -> object:
    """Run ``scenario(page)`` on a fresh page of a fresh Chromium, in a worker thread."""
    return await trio.to_thread.run_sync(_run, base_url, scenario, options)
