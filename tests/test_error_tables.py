"""One error vocabulary: every code a class in errors.py, every class in every transport's table.

The README's error table (both languages) and the one of docs/openai-api.md
(the /v1 routes' statuses and OpenAI error types) are checked against the
tables, and the transports' sources are checked for codes spelled out by hand.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from easybackend import errors
from easybackend.transports import grpc as grpc_transport
from easybackend.transports import http as http_transport
from easybackend.transports.openai_api import errors as openai_errors

REPO = Path(__file__).resolve().parent.parent
TRANSPORTS = REPO / "easybackend" / "transports"
TABLES = {
    "HTTP": http_transport.STATUS_BY_ERROR,
    "gRPC": grpc_transport.STATUS_BY_ERROR,
    "OpenAI (/v1)": openai_errors.STATUS_BY_ERROR,
}
ROW = re.compile(r"^\| `(?P<code>[a-z_]+)` \| (?P<http>\d{3}) \| `(?P<grpc>[A-Z_]+)` \| .+ \|$")
OPENAI_ROW = re.compile(r"^\| `(?P<code>[a-z_]+)` \| (?P<status>\d{3}) \| `(?P<type>[a-z_]+)` \|$")


def test_every_error_class_is_in_every_transports_table():
    classes = errors.every_error_class()
    assert {errors.InternalError, errors.RequestTooLarge, errors.MethodNotAllowed} <= set(classes)
    for name, table in TABLES.items():
        assert set(table) == set(classes), name
    for cls in classes:
        assert cls.__doc__ and "\n" not in cls.__doc__.strip(), cls  # one line: when it happens


def test_every_class_has_its_own_code_which_is_what_websocket_sends():
    codes = [cls.code for cls in errors.every_error_class()]
    assert len(codes) == len(set(codes)), codes
    assert all(re.fullmatch(r"[a-z_]+", code) for code in codes)


def test_lookups_go_by_class_and_fall_back_to_internal():
    assert http_transport.STATUS_BY_ERROR[errors.UpstreamTimeout] == 504
    status = grpc_transport.status_for(errors.UpstreamRateLimited("slow down"))
    assert (status.status_code, status.status_message) == (
        grpc_transport.StatusCode.RESOURCE_EXHAUSTED,
        "slow down",
    )
    assert errors.wire_form(errors.ChatError("bare"), http_transport.STATUS_BY_ERROR) == 500
    # under /v1: OpenAI's error types, and a relayed refusal keeps the provider's status
    assert openai_errors.status_of(errors.PromptTooLong("long")) == 400
    assert openai_errors.status_of(errors.UpstreamRejected("no", status=422)) == 422
    assert openai_errors.error_object(errors.InvalidInput("bad", param="n")) == {
        "error": {
            "message": "bad",
            "type": "invalid_request_error",
            "param": "n",
            "code": "invalid_input",
        }
    }


def test_transports_spell_out_no_error_code():
    """Codes come from the classes; a quoted code in a transport would be one invented there."""
    codes = {cls.code for cls in errors.every_error_class()}
    for source in TRANSPORTS.rglob("*.py"):
        text = source.read_text()
        for code in codes:
            assert f'"{code}"' not in text, (source.name, code)


def test_the_unexpected_error_helper_logs_once_and_tells_nothing(caplog):
    try:
        raise RuntimeError("internal detail")
    except RuntimeError as exc:
        error = errors.unexpected(exc, "testing")
    assert isinstance(error, errors.InternalError)
    assert "internal detail" not in error.message
    (record,) = [r for r in caplog.records if r.exc_info]
    assert record.levelname == "ERROR" and "internal detail" in str(record.exc_info[1])


@pytest.mark.parametrize("readme", ["README.md", "README.zh-CN.md"])
def test_the_readme_error_table_matches_the_code(readme: str):
    rows = {}
    for line in (REPO / readme).read_text().splitlines():
        if match := ROW.match(line):
            rows[match["code"]] = (int(match["http"]), match["grpc"])
    expected = {
        cls.code: (
            http_transport.STATUS_BY_ERROR[cls],
            grpc_transport.STATUS_BY_ERROR[cls].name,
        )
        for cls in errors.every_error_class()
    }
    assert rows == expected


def test_the_openai_api_error_table_matches_the_code():
    rows = {}
    for line in (REPO / "docs" / "openai-api.md").read_text().splitlines():
        if match := OPENAI_ROW.match(line):
            rows[match["code"]] = (int(match["status"]), match["type"])
    expected = {cls.code: openai_errors.STATUS_BY_ERROR[cls] for cls in errors.every_error_class()}
    assert rows == expected
