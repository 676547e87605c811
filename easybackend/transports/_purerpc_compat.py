"""purerpc's server-side HTTP/2 and gRPC framing, corrected where a client could go unanswered.

Written for purerpc 0.8.x (pinned in pyproject.toml; through it h2 3.x and
hypercorn 0.17): the classes below override private methods and swap private
attributes, so importing this module with any other version fails at once
(:func:`._compat.require_version`). Each override, in one line:

- ``GRPCConnection._remote_settings_changed``: also sets :attr:`H2Connection.greeted`, so that a
  connection that never sends the HTTP/2 preface can be closed.
- ``GRPCConnection._stream_reset``: reports RST_STREAM to the server (purerpc drops it, so a call
  the client cancelled would run on until its next send).
- ``GRPCConnection._request_received``: a malformed request resets its own stream instead of
  raising out of the connection (which ended every call on it).
- ``GRPCConnection._data_received``: data for a stream already ended is dropped, and a message
  too large or not decompressible ends that request with a status (:class:`BadRequestData`)
  instead of the connection.
- ``GRPCProtoSocket._grpc_connection`` (and its framing socket's): replaced by our
  :class:`H2Connection`, which purerpc's constructor offers no way to pass in.
- ``GRPCProtoSocket._streams``: a table that answers a forgotten stream with a stand-in that drops
  its events (purerpc's would raise KeyError out of the connection's reader).
- :meth:`ServerSocket.forget` and :meth:`ServerSocket.say_goodbye` reach into that state (the
  stream table, the read buffers, h2's connection) so that the server never has to.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from typing import Any

import anyio.abc
import h2.errors
import h2.events
import h2.exceptions
import trio
from purerpc import Status, StatusCode
from purerpc.grpc_proto import GRPCProtoSocket
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.connection import GRPCConnection
from purerpc.grpclib.events import RequestEnded
from purerpc.grpclib.exceptions import MessageTooLargeError, ProtocolError

from ._compat import require_version

require_version("purerpc", "0.8")

log = logging.getLogger("easybackend.transports.grpc")


class BadRequestData(RequestEnded):
    """The request body could not be read (too large, bad compression); ends the request.

    A subclass of RequestEnded so that purerpc's stream bookkeeping takes it
    as the end of the request.
    """

    def __init__(self, stream_id: int, status: Status) -> None:
        super().__init__(stream_id)
        self.status = status


class H2Connection(GRPCConnection):
    """purerpc's HTTP/2 state machine, reporting the stream resets purerpc ignores.

    A malformed request resets its stream instead of the whole connection,
    and unreadable request data ends that request with a status.
    ``greeted`` is set once the client's preface and first SETTINGS have arrived.
    """

    def __init__(self, config: GRPCConfiguration, on_reset: Callable[[int], None]) -> None:
        super().__init__(config)
        self._on_reset = on_reset
        self.greeted = trio.Event()

    def _remote_settings_changed(self, event: h2.events.RemoteSettingsChanged) -> list[Any]:
        self.greeted.set()
        return super()._remote_settings_changed(event)

    def _stream_reset(self, event: h2.events.StreamReset) -> list[Any]:
        self._on_reset(event.stream_id)
        return []

    def _request_received(self, event: h2.events.RequestReceived) -> list[Any]:
        try:
            return super()._request_received(event)
        except (ProtocolError, KeyError, ValueError) as exc:
            log.debug("gRPC: refusing a malformed request on stream %d: %s", event.stream_id, exc)
            self.h2_connection.reset_stream(event.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return []

    def _data_received(self, event: h2.events.DataReceived) -> list[Any]:
        if event.stream_id not in self.message_read_buffers:
            return []  # the request has already ended, or was refused: drop the data
        try:
            return super()._data_received(event)
        except MessageTooLargeError:
            status = Status(
                StatusCode.RESOURCE_EXHAUSTED,
                f"the request message is larger than {self.config.max_message_length} bytes",
            )
        except (ProtocolError, zlib.error) as exc:
            status = Status(StatusCode.INVALID_ARGUMENT, f"the request body is unreadable: {exc}")
        del self.message_read_buffers[event.stream_id]
        return [BadRequestData(event.stream_id, status)]


class _Ended:
    """Stands in for a stream whose call is over: events that still arrive for it are dropped."""

    def __init__(self) -> None:
        self._incoming_events = (self, None)

    async def send(self, event: object) -> None:
        pass

    async def _set_flow_control_update(self) -> None:
        pass

    def _close_remote(self) -> None:
        pass


class _Streams(dict[int, Any]):
    """purerpc's table of open streams, which would raise KeyError for a forgotten stream."""

    def __missing__(self, stream_id: int) -> _Ended:
        return _Ended()


class ServerSocket(GRPCProtoSocket):
    """purerpc's server-side gRPC connection, over our HTTP/2 state machine."""

    def __init__(self, connection: H2Connection, stream: anyio.abc.ByteStream) -> None:
        super().__init__(connection.config, stream)
        self._grpc_connection = self._socket._grpc_connection = connection
        self._streams = _Streams()

    def forget(self, stream_id: int) -> None:
        """Drop purerpc's state for a stream whose call is over."""
        self._streams.pop(stream_id, None)
        self._grpc_connection.message_read_buffers.pop(stream_id, None)

    def say_goodbye(self) -> None:
        """Queue a GOAWAY (no new streams); a connection already closing is left as it is."""
        try:
            self._grpc_connection.h2_connection.close_connection()
        except h2.exceptions.H2Error:
            pass
