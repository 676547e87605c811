"""hypercorn's trio worker, given a hook on each HTTP connection's byte stream.

Written for hypercorn 0.17.x (pinned in pyproject.toml); importing it with any
other version fails at once (:func:`._compat.require_version`).

- ``hypercorn.trio.run.TCPServer`` (the class hypercorn's trio ``serve`` makes
  for each accepted connection) is replaced by a subclass that passes the
  connection's stream, and the state copied into each request's scope, through
  the function given to :func:`wrap_connection_streams` first: hypercorn has no
  hook there, and a bound on writes has to sit on the stream, since hypercorn
  writes in a shielded scope and swallows a failed write.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hypercorn.trio.run
import trio
from hypercorn.trio.tcp_server import TCPServer

from ._compat import require_version

require_version("hypercorn", "0.17")

# (config, state, stream) -> (state, stream): what one connection is served over
StreamWrapper = Callable[
    [Any, dict[str, Any], trio.abc.Stream], tuple[dict[str, Any], trio.abc.Stream]
]


def wrap_connection_streams(wrap: StreamWrapper) -> None:
    """Make hypercorn's trio worker serve every HTTP connection over ``wrap``'s stream.

    Applies to every hypercorn trio server in the process started afterwards;
    ``wrap`` decides from the connection's config whether to change anything.
    """

    class WrappedTCPServer(TCPServer):
        def __init__(
            self, app: Any, config: Any, context: Any, state: Any, stream: trio.abc.Stream
        ) -> None:
            state, stream = wrap(config, state, stream)
            super().__init__(app, config, context, state, stream)

    hypercorn.trio.run.TCPServer = WrappedTCPServer  # type: ignore[misc]
