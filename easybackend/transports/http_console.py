"""The web console at ``/`` and Swagger UI at ``/docs``, both served from installed files.

The console is plain HTML, CSS and ES modules in ``easybackend/console/`` (package data):
nothing is built at install and nothing is fetched from another host. Its page and files are
sent with a strict Content-Security-Policy (scripts, styles and requests from this origin
only, no inline script). ``CONSOLE=false`` turns it off (``/`` is then a 404).

``/docs`` is Swagger UI 5 from the ``swagger-ui-py`` package (its files under
``/docs/static/``), started by ``console/docs.js`` with the validator badge off, so the page
needs no network beyond this server either.
"""

from __future__ import annotations

import importlib.util
import mimetypes
from pathlib import Path

from quart import Blueprint, Response
from quart_schema import hide

from ..errors import NotFound

CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"
# swagger-ui-py ships Swagger UI 5 (OpenAPI 3.1, which quart-schema writes) as package files;
# only those files are used, not its framework glue.
SWAGGER_DIR = Path(importlib.util.find_spec("swagger_ui").submodule_search_locations[0]) / "static"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data: blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# Swagger UI's bundle sets inline styles; its scripts still come from this origin only.
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'"
)
SERVED = {".html", ".css", ".js", ".png", ".map"}  # never the package's .py files
CONSOLE_PREFIX = "/console/"
DOCS_STATIC_PREFIX = "/docs/static/"
DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>EasyBackend API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css">
<link rel="icon" href="/docs/static/favicon-32x32.png"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script src="/docs/static/easybackend-docs.js"></script></body></html>
"""


def _file(directory: Path, name: str, csp: str) -> Response:
    """``name`` inside ``directory`` (never outside it), or NotFound."""
    path = (directory / name).resolve()
    if directory not in path.parents or not path.is_file() or path.suffix not in SERVED:
        raise NotFound("no such file")
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if path.suffix in {".js", ".mjs"}:
        kind = "text/javascript"
    response = Response(path.read_bytes(), mimetype=kind)
    response.headers["Content-Security-Policy"] = csp
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "no-cache"
    return response


def is_console_path(path: str, *, console: bool) -> bool:
    """Whether ``path`` is one of the console's files (they need no key: the API calls do)."""
    return console and (path == "/" or path.startswith(CONSOLE_PREFIX))


def console_routes(*, console: bool) -> Blueprint:
    """``/docs`` and its files; with ``console``, ``/`` and ``/console/<file>`` too."""
    routes = Blueprint("console", __name__)

    @routes.get("/docs")
    @hide
    async def swagger_ui() -> Response:
        response = Response(DOCS_PAGE, mimetype="text/html")
        response.headers["Content-Security-Policy"] = DOCS_CSP
        return response

    @routes.get("/docs/static/<path:name>")
    @hide
    async def swagger_file(name: str) -> Response:
        if name == "easybackend-docs.js":
            return _file(CONSOLE_DIR, "docs.js", DOCS_CSP)
        return _file(SWAGGER_DIR, name, DOCS_CSP)

    if not console:
        return routes

    @routes.get("/")
    @hide
    async def console_page() -> Response:
        return _file(CONSOLE_DIR, "index.html", CSP)

    @routes.get("/console/<path:name>")
    @hide
    async def console_file(name: str) -> Response:
        return _file(CONSOLE_DIR, name, CSP)

    return routes
