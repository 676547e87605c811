"""Schemathesis over the server's OpenAPI document, as a subprocess bounded by its examples."""

from __future__ import annotations

import sys
from pathlib import Path

import trio

CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_schema_conformance,response_headers_conformance"
)


async def run_schemathesis(
    http_url: str, key: str, *, max_examples: int, seed: int, paths: str | None = None
) -> str:
    """Fuzz ``http_url`` (every operation, or those whose path matches the regex ``paths``)
    with ``key`` as the bearer token; asserts it passed and returns its report."""
    selection = ["--include-path-regex", paths] if paths else []
    result = await trio.run_process(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "run",
            f"{http_url}/openapi.json",
            *selection,
            "--checks",
            CHECKS,
            "--phases",
            "examples,fuzzing,stateful",
            "--max-examples",
            str(max_examples),
            "--seed",
            str(seed),
            "--workers",
            "1",
            "--header",
            f"Authorization: Bearer {key}",
            "--generation-database",
            "none",
            "--no-color",
        ],  # fmt: skip
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    report = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, report[-4000:]
    assert " passed" in report and "generated" in report
    return report
