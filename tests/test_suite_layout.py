"""The test suite's own shape: test modules share code through the ``helpers`` package only."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# ``import test_x``, ``from test_x import …``, ``from conftest import …`` (also indented)
CROSS_IMPORT = re.compile(r"^\s*(?:from|import)\s+(?:test_\w*|conftest)\b", re.M)


def test_no_test_module_imports_another_or_conftest():
    offenders = [
        f"{path.relative_to(TESTS)}: {match.group(0).strip()}"
        for path in sorted(TESTS.rglob("*.py"))
        for match in CROSS_IMPORT.finditer(path.read_text())
    ]
    assert not offenders, offenders


def test_fixtures_live_in_conftest_only():
    fixture = re.compile(r"^@pytest\.fixture", re.M)
    offenders = [
        str(path.relative_to(TESTS))
        for path in sorted((TESTS / "helpers").rglob("*.py"))
        if fixture.search(path.read_text())
    ]
    assert not offenders, offenders
