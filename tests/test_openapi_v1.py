"""The OpenAI-compatible routes in the server's OpenAPI document, and Swagger UI at /docs.

Every ``/v1`` route is in ``/openapi.json`` with its method, its 200 answer
(JSON; the create routes ``text/event-stream`` too), its errors in OpenAI's
shape (``OpenAIErrorBody``) and a request body where it takes one; ``/docs``
is Swagger UI served from the installed package, started on that document.
"""

from __future__ import annotations

import json

from easybackend.transports.http_console import SWAGGER_DIR

# (path, method, takes a body, streams)
V1_ROUTES = [
    ("/v1/models", "get", False, False),
    ("/v1/models/{model_id}", "get", False, False),
    ("/v1/chat/completions", "post", True, True),
    ("/v1/responses", "post", True, True),
    ("/v1/responses/{response_id}", "get", False, False),
    ("/v1/responses/{response_id}", "delete", False, False),
    ("/v1/responses/{response_id}/input_items", "get", False, False),
    ("/v1/responses/{response_id}/cancel", "post", False, False),
    ("/v1/conversations", "post", True, False),
    ("/v1/conversations/{conversation_id}", "get", False, False),
    ("/v1/conversations/{conversation_id}", "post", True, False),
    ("/v1/conversations/{conversation_id}", "delete", False, False),
    ("/v1/conversations/{conversation_id}/items", "get", False, False),
    ("/v1/conversations/{conversation_id}/items", "post", True, False),
    ("/v1/conversations/{conversation_id}/items/{item_id}", "get", False, False),
    ("/v1/conversations/{conversation_id}/items/{item_id}", "delete", False, False),
]


async def test_every_v1_route_is_in_the_openapi_document(server):
    async with server.client() as http:
        reply = await http.get("/openapi.json")
    assert reply.status_code == 200
    paths = reply.json()["paths"]
    documented = {
        (path, method)
        for path, methods in paths.items()
        if path.startswith("/v1")
        for method in methods
    }
    assert documented == {(path, method) for path, method, _, _ in V1_ROUTES}
    for path, method, takes_body, streams in V1_ROUTES:
        operation = paths[path][method]
        where = f"{method.upper()} {path}"
        assert operation["tags"] == ["openai"], where
        assert operation.get("summary") or operation.get("description"), where
        answers = operation["responses"]
        kinds = {"application/json", "text/event-stream"} if streams else {"application/json"}
        assert set(answers["200"]["content"]) == kinds, where
        assert "401" in answers, where  # behind the same keys as every route
        for status, answer in answers.items():
            if status.startswith(("4", "5")):
                assert "OpenAIErrorBody" in json.dumps(answer), (where, status)
        if "{" in path:
            assert "404" in answers, where
        assert ("requestBody" in operation) is takes_body, where
        if takes_body:
            assert operation["requestBody"]["required"] is True, where
        for name in (part[1:-1] for part in path.split("/") if part.startswith("{")):
            parameters = {p["name"]: p for p in operation.get("parameters", [])}
            assert parameters[name]["in"] == "path", (where, name)


async def test_docs_is_swagger_ui_from_the_installed_package_on_that_document(server):
    async with server.client() as http:
        page = await http.get("/docs")
        bundle = await http.get("/docs/static/swagger-ui-bundle.js")
        style = await http.get("/docs/static/swagger-ui.css")
        starter = await http.get("/docs/static/easybackend-docs.js")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/docs/static/swagger-ui-bundle.js">' in page.text
    assert "//" not in page.text.replace("<!doctype html>", "")  # nothing from another host
    assert bundle.status_code == 200 and bundle.headers["content-type"].startswith(
        "text/javascript"
    )
    assert bundle.content == (SWAGGER_DIR / "swagger-ui-bundle.js").read_bytes()
    assert style.status_code == 200
    assert style.content == (SWAGGER_DIR / "swagger-ui.css").read_bytes()
    assert starter.status_code == 200 and 'url: "/openapi.json"' in starter.text
