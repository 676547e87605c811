"""hypercorn's trio worker, given a hook around each HTTP connection.

Written for hypercorn 0.17.x (pinned in pyproject.toml); importing it with any
other version fails at once (:func:`._compat.require_version`).

- ``hypercorn.trio.run.TCPServer`` (the class hypercorn's trio ``serve`` makes
  for each accepted connection) is replaced by a subclass that serves the
  connection inside the context manager given to :func:`wrap_connections`, over
  the stream and with the state (copied into each request's scope) that it
  gives: hypercorn has no hook there, and a bound on writes has to sit on the
  stream, since hypercorn writes in a shielded scope and swallows a failed
  write; the context manager's exit tells that the connection is over.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import hypercorn.trio.run
import trio
from hypercorn.trio.tcp_server import TCPServer

from ._compat import require_version

require_version("hypercorn", "0.17")

# (config, state, stream) -> a context manager giving (state, stream): what one connection
# is served over, for as long as it is served
ConnectionWrapper = Callable[
    [Any, dict[str, Any], trio.abc.Stream],
    AbstractContextManager[tuple[dict[str, Any], trio.abc.Stream]],
]


def wrap_connections(wrap: ConnectionWrapper) -> None:
    """Make hypercorn's trio worker serve every HTTP connection inside ``wrap``.

    Applies to every hypercorn trio server in the process started afterwards;
    ``wrap`` decides from the connection's config whether to change anything.
    What the connection raises goes through ``wrap``'s context manager.
    """

    class WrappedTCPServer(TCPServer):
        async def run(self) -> None:
            with wrap(self.config, self.state, self.stream) as (self.state, self.stream):
                await super().run()

    hypercorn.trio.run.TCPServer = WrappedTCPServer  # type: ignore[misc]
