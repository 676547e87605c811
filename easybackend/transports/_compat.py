"""What every ``_*_compat`` module asserts first: the library version its overrides were written for.

A compat module overrides private parts of one library, which may change in any
release. Each calls :func:`require_version` at import, so that on another
version the server refuses to start (and the tests fail) with one line naming
the library, the version expected and the version installed, instead of
misbehaving later. :data:`COMPAT_MODULES` lists them all; start-up imports
every one.
"""

from __future__ import annotations

import importlib.metadata

COMPAT_MODULES = (
    "easybackend.transports._hypercorn_compat",
    "easybackend.transports._purerpc_compat",
    "easybackend.transports._trio_websocket_compat",
)


class UnsupportedLibraryVersion(ImportError):
    """A library a compat module overrides is installed in a version it was not written for."""


def installed_version(distribution: str) -> str:
    """The installed version of ``distribution`` (the one lookup every compat module uses)."""
    return importlib.metadata.version(distribution)


def require_version(distribution: str, written_for: str) -> str:
    """Return the installed version of ``distribution``; raise unless it is ``written_for``.

    ``written_for`` is a full version (``0.12.2``: that release only) or a
    release series (``0.17``: any ``0.17.x``).
    """
    version = installed_version(distribution)
    if version != written_for and not version.startswith(written_for + "."):
        series = "" if written_for.count(".") >= 2 else ".x"
        raise UnsupportedLibraryVersion(
            f"easybackend overrides private parts of {distribution} {written_for}{series}, "
            f"but {distribution} {version} is installed; install {distribution} "
            f"{written_for}{series} (see pyproject.toml)"
        )
    return version
