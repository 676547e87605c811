"""The compat modules: each refuses a library version it was not written for; start-up imports all."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from easybackend.transports import _compat
from easybackend.transports._compat import COMPAT_MODULES, UnsupportedLibraryVersion

LIBRARY_OF = {
    "easybackend.transports._hypercorn_compat": "hypercorn",
    "easybackend.transports._purerpc_compat": "purerpc",
    "easybackend.transports._trio_websocket_compat": "trio-websocket",
}


def load_fresh_copy(module_name: str) -> None:
    """Run a compat module's code again, as a new module (the imported one is left alone)."""
    spec = importlib.util.find_spec(module_name)
    assert spec is not None and spec.origin is not None
    copy = importlib.util.spec_from_file_location(module_name + "_copy", spec.origin)
    assert copy is not None and copy.loader is not None
    module = importlib.util.module_from_spec(copy)
    module.__package__ = "easybackend.transports"
    copy.loader.exec_module(module)


def test_every_compat_module_is_listed():
    assert set(COMPAT_MODULES) == set(LIBRARY_OF)


@pytest.mark.parametrize("module_name", COMPAT_MODULES)
def test_the_installed_version_is_accepted(module_name):
    load_fresh_copy(module_name)


@pytest.mark.parametrize("module_name", COMPAT_MODULES)
def test_another_version_is_refused_with_one_line(module_name, monkeypatch):
    library = LIBRARY_OF[module_name]
    real = _compat.installed_version

    def lookup(distribution: str) -> str:
        return "99.0.0" if distribution == library else real(distribution)

    monkeypatch.setattr(_compat, "installed_version", lookup)
    with pytest.raises(UnsupportedLibraryVersion) as refused:
        load_fresh_copy(module_name)
    message = str(refused.value)
    assert "\n" not in message
    assert f"{library} 99.0.0 is installed" in message


@pytest.mark.parametrize(
    ("written_for", "installed", "accepted"),
    [
        ("0.17", "0.17.3", True),
        ("0.17", "0.17", True),
        ("0.17", "0.18.0", False),
        ("0.17", "0.170.1", False),
        ("0.12.2", "0.12.2", True),
        ("0.12.2", "0.12.3", False),
    ],
)
def test_a_release_series_or_one_release(monkeypatch, written_for, installed, accepted):
    monkeypatch.setattr(_compat, "installed_version", lambda distribution: installed)
    if accepted:
        assert _compat.require_version("lib", written_for) == installed
    else:
        with pytest.raises(UnsupportedLibraryVersion, match=f"lib {written_for}"):
            _compat.require_version("lib", written_for)


def test_start_up_imports_every_compat_module():
    """What the server imports to start (easybackend.app), in a fresh interpreter."""
    code = (
        "import sys, easybackend.app\n"
        "from easybackend.transports._compat import COMPAT_MODULES\n"
        "print([name for name in COMPAT_MODULES if name not in sys.modules])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"
