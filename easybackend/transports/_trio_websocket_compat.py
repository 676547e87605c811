"""trio-websocket's server, corrected where a hostile client could stop the process or go unanswered.

Written for trio-websocket 0.12.2 (pinned in pyproject.toml): it overrides two private
methods, so importing it with any other version fails at once rather than misbehaving
(:func:`._compat.require_version`).

- :meth:`WebSocketServer._handle_connection` (the task of one accepted connection): upstream,
  it runs the connection's reader task and the handler in a nursery under the server's
  handler nursery, so anything either raises stops the whole server: ``ConnectionClosed``
  when a client resets the connection as its handshake is answered or refused, an
  ``OSError`` from a socket the peer already closed, an ExceptionGroup out of a handler's
  nursery, a bug. Here each connection is contained: the client going away ends it quietly,
  any other error is logged with its traceback and ends that connection only.
- :meth:`_ServerConnection._handle_close_connection_event`: wsproto reports a frame it
  cannot parse (a text frame that is not UTF-8, an unmasked client frame, a reserved opcode
  or bit) as a ``CloseConnection`` event carrying the code to close with (1007 or 1002) while
  the connection is still open, no close frame having been received. trio-websocket took it
  for the peer's close and dropped the TCP connection without a close frame; here that close
  frame is sent first.
"""

from __future__ import annotations

import contextlib
import logging

import trio
import trio_websocket
import wsproto.events
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState

from ._compat import require_version

require_version("trio-websocket", "0.12.2")

log = logging.getLogger("easybackend.websocket")

# What a connection whose client went away raises: nothing to report.
CLIENT_GONE = (ConnectionClosed, OSError, trio.BrokenResourceError, trio.ClosedResourceError)


class _ServerConnection(WebSocketConnection):
    """A server connection that answers a frame it cannot parse with the close frame wsproto chose."""

    async def _handle_close_connection_event(self, event: wsproto.events.CloseConnection) -> None:
        if self._wsproto.state == ConnectionState.OPEN:  # wsproto's verdict, not the peer's close
            # set first, so that a send_message() racing with this close raises ConnectionClosed
            self._close_reason = CloseReason(event.code, event.reason or None)
            with contextlib.suppress(ConnectionClosed):  # the peer is gone already: nobody to tell
                await self._send(wsproto.events.CloseConnection(event.code, event.reason))
        await super()._handle_close_connection_event(event)


class WebSocketServer(trio_websocket.WebSocketServer):
    """trio-websocket's server, with each connection contained and bad frames answered (see above)."""

    async def _handle_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one accepted connection; nothing it raises but cancellation reaches the server.

        On cancellation the connection's tasks stop; trio closes ``stream`` afterwards.
        """
        try:
            await self._serve_connection(stream)
        except* CLIENT_GONE:
            log.debug("a WebSocket client went away")
        except* Exception:
            log.exception("a WebSocket connection failed; the server goes on")

    async def _serve_connection(self, stream: trio.abc.Stream) -> None:
        """trio-websocket 0.12.2's ``_handle_connection``, with our connection class."""
        async with trio.open_nursery() as nursery:
            connection = _ServerConnection(
                stream,
                WSConnection(ConnectionType.SERVER),
                message_queue_size=self._message_queue_size,
                max_message_size=self._max_message_size,
                receive_buffer_size=self._receive_buffer_size,
            )
            nursery.start_soon(connection._reader_task)
            with trio.move_on_after(self._connect_timeout) as connect_scope:
                request = await connection._get_request()
            if connect_scope.cancelled_caught:
                nursery.cancel_scope.cancel()
                await stream.aclose()
                return
            try:
                await self._handler(request)
            finally:
                with trio.move_on_after(self._disconnect_timeout):
                    # aclose() shuts the reader task down even when cancelled
                    await connection.aclose()
