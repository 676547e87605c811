"""``serve()``: the root trio nursery that runs every listener over one chat service.

Start-up order: bind every enabled port (a taken port stops start-up before
anything is served), load the token encoding, open storage, start the demo
upstream if asked, then serve. SIGINT/SIGTERM during start-up stop it at once
(exit 0, nothing served); once serving, they stop accepting and give
in-flight answers ``SHUTDOWN_GRACE`` seconds before they are cancelled (and
stored as ``cancelled``); a second signal cancels at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import ipaddress
import logging
import math
import signal
import socket
from collections.abc import AsyncIterator

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from .chat.service import ChatService
from .chat.tokens import TokenCounter, encoding_name_for, load_encoding
from .chat.webhooks import STOP_GRACE as WEBHOOK_STOP_GRACE
from .fake_upstream import FakeUpstream
from .listeners import LISTEN_BACKLOG, bind_tcp
from .metrics import Metrics
from .settings import Settings
from .storage import open_storage
from .tls import server_ssl_context
from .transports.grpc import serve_grpc
from .transports.http import Stopping, create_app
from .transports.send_deadline import (
    GOODBYE_SECONDS,
    SendWatchdog,
    StopOnBrokenSend,
    bound_hypercorn_sends,
)
from .transports.websocket import serve_websocket
from .upstream.openai_client import OpenAIUpstream, check_proxy_environment

log = logging.getLogger("easybackend")

DEMO_TOKEN_DELAY = 0.03  # seconds per piece: slow enough to watch the answer stream


@dataclasses.dataclass(frozen=True)
class Running:
    """What :func:`serve` reports through ``task_status`` once every listener accepts."""

    http_port: int | None = None
    grpc_port: int | None = None
    ws_port: int | None = None
    service: ChatService | None = None  # the chat core every listener serves
    upstream_url: str | None = None  # the demo upstream's base URL, when --demo


async def serve(
    settings: Settings,
    *,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run EasyBackend until SIGINT/SIGTERM or until ``shutdown`` is set.

    Raises ListenError (a port cannot be bound), StorageUnavailable or
    UnknownEncoding before anything is served. On cancellation everything
    stops at once: in-flight asks are cancelled and stored as ``cancelled``.

    SIGINT/SIGTERM are handled from serve's first instant (see
    :func:`_stop_on_signals`): during start-up one stops it at once and serve
    returns normally, having served nothing.
    """
    shutdown = shutdown if shutdown is not None else trio.Event()
    async with _stop_on_signals(shutdown) as signals:
        await _start_and_serve(settings, shutdown, signals, task_status)
    log.info("EasyBackend stopped" if signals.served else "EasyBackend stopped during start-up")


async def _start_and_serve(
    settings: Settings,
    shutdown: trio.Event,
    signals: _Signals,
    task_status: trio.TaskStatus[Running],
) -> None:
    """Start every listener, report ``task_status``, serve until they all stop (see :func:`serve`)."""
    server_ssl_context(settings, [])  # a bad certificate or key stops start-up here (ConfigError)
    check_proxy_environment()  # so does a proxy variable httpx cannot use (ConfigError)
    sockets = _bind_all(settings)
    try:
        await _serve_on(settings, sockets, shutdown, signals, task_status)
    finally:
        for sock in sockets.values():  # those a server did not take over (start-up stopped)
            sock.close()


async def _serve_on(
    settings: Settings,
    sockets: dict[str, socket.socket],
    shutdown: trio.Event,
    signals: _Signals,
    task_status: trio.TaskStatus[Running],
) -> None:
    counter = TokenCounter(load_encoding(encoding_name_for(settings.model, settings.encoding_name)))
    storage = await open_storage(settings)
    try:
        async with trio.open_nursery() as nursery:
            upstream_url = None
            if settings.demo:
                fake = FakeUpstream(token_delay=DEMO_TOKEN_DELAY, model=settings.model)
                await nursery.start(fake.serve, "127.0.0.1", 0)
                upstream_url = fake.base_url()
                log.info("demo mode: answering from the built-in fake model at %s", upstream_url)
            metrics = Metrics()
            upstream = OpenAIUpstream(settings, metrics, base_url=upstream_url)
            service = ChatService(settings, storage, upstream, counter, metrics)
            # The stored keys: read before anything is served, then every second until the end.
            await nursery.start(service.keys.refresh_forever)
            # The keys' limits and usage: what they spent this month read first (SQLite), then
            # the usage written every second and at the end (see governance/limits.py).
            await nursery.start(service.limits.run)
            # Summaries, titles and the expiry sweep: the service's nursery, cancelled with the
            # rest once the listeners have stopped (after the shutdown's grace).
            await nursery.start(service.background.run)
            # Background answers: on at shutdown for SHUTDOWN_GRACE like every answer, then
            # cancelled (stored as cancelled); awaited below before the upstream client closes.
            await nursery.start(service.background_answers.run, shutdown, settings.shutdown_grace)
            await nursery.start(service.webhooks.run)  # the webhook of background answers
            if not service.callers.enabled and not _is_loopback(settings.host):
                log.warning(
                    "API_KEYS is not set, no key is stored, and HOST %s is reachable from other "
                    "machines: anyone who can connect can use the model and read every conversation",
                    settings.host,
                )
            async with trio.open_nursery() as listeners:
                ports = {name: sock.getsockname()[1] for name, sock in sockets.items()}
                for name, sock in sockets.items():  # each server takes its socket over
                    await listeners.start(SERVERS[name], service, settings, sock, shutdown)
                _freeze_startup_objects()
                signals.serving()
                task_status.started(Running(**ports, service=service, upstream_url=upstream_url))
                log.info(
                    "EasyBackend ready: HTTP %s, gRPC %s, WebSocket %s",
                    *(_where(settings.host, ports.get(name)) for name in SERVERS),
                )
            if shutdown.is_set():
                await service.background_answers.stopped.wait()
            # The webhook of the last background answers: a few seconds more to be delivered.
            await service.webhooks.stop(WEBHOOK_STOP_GRACE)
            await service.background.stop()  # before the upstream client it calls is closed
            await upstream.aclose()
            nursery.cancel_scope.cancel()  # the demo upstream, the key refresh, the usage
    finally:
        with trio.CancelScope(shield=True):
            await storage.close()


def _freeze_startup_objects() -> None:
    """Leave what start-up built (modules, apps, schemas) out of every later garbage collection.

    A full collection walks every tracked object; with the start-up objects in
    it, each one stalls the event loop for about 20 ms under load, which shows
    as a spike in every answer in progress. Frozen, they are never walked again.
    Done once per process (a process that serves again, as the tests do, keeps
    its first freeze).
    """
    if not gc.get_freeze_count():
        gc.collect()
        gc.freeze()


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class _Signals:
    """What SIGINT/SIGTERM do, as serve() goes from starting to serving.

    While starting, a signal cancels ``hard_stop`` (around all of serve): start-up
    stops at once, nothing having been served. Once :meth:`serving`, the first
    signal sets ``shutdown`` (stop accepting, let answers finish for
    SHUTDOWN_GRACE) and the second cancels ``hard_stop``.
    """

    def __init__(self, shutdown: trio.Event) -> None:
        self.shutdown = shutdown
        self.hard_stop = trio.CancelScope()
        self.served = False

    def serving(self) -> None:
        """Every listener accepts: from now on the first signal drains instead of stopping."""
        self.served = True

    async def watch(self, receiver: AsyncIterator[int]) -> None:
        async for signum in receiver:
            name = signal.Signals(signum).name
            if not self.served:
                log.info("%s received during start-up: stopping", name)
                self.hard_stop.cancel()
            elif self.shutdown.is_set():
                log.warning("second %s: stopping now", name)
                self.hard_stop.cancel()
            else:
                log.info("%s received: finishing in-flight answers", name)
                self.shutdown.set()


@contextlib.asynccontextmanager
async def _stop_on_signals(shutdown: trio.Event) -> AsyncIterator[_Signals]:
    """Handle SIGINT/SIGTERM inside the block as :class:`_Signals` says.

    The block runs inside ``hard_stop``: a stop by signal ends it with no
    error. SIGINT and SIGTERM that the command held back (blocked, see
    ``cli.main``) until now are delivered once the handler is in place; on
    the way out the signal mask is put back as it was. An exception of the
    block propagates as it was raised (not in an exception group).
    """
    signals = _Signals(shutdown)
    error: BaseException | None = None
    with trio.open_signal_receiver(*STOP_SIGNALS) as receiver:
        held = _set_stop_signal_mask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(signals.watch, receiver)
                try:
                    with signals.hard_stop:
                        yield signals
                except BaseException as exc:  # noqa: B036 (re-raised below, outside the nursery)
                    error = exc
                nursery.cancel_scope.cancel()
        finally:
            _set_stop_signal_mask(signal.SIG_SETMASK, held)
    if error is not None:
        raise error


def _set_stop_signal_mask(how: int, signals: set[int]) -> set[int]:
    """``signal.pthread_sigmask`` where there is one (not on Windows); returns the old mask."""
    if not hasattr(signal, "pthread_sigmask"):
        return set()
    return signal.pthread_sigmask(how, signals)


async def _serve_http(
    service: ChatService,
    settings: Settings,
    sock: socket.socket,
    shutdown: trio.Event,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the HTTP app on ``sock`` until ``shutdown`` is set, then drain for SHUTDOWN_GRACE.

    Asks still running when the grace ends answer 503 ``shutting_down``; GOODBYE_SECONDS
    later hypercorn drops every connection still open. A client has HTTP_HEADER_TIMEOUT
    seconds to send a request head from the moment its connection opens or its last
    response ended (hypercorn's keep-alive timeout bounds exactly that span, trickled bytes
    or not; its read timeout would bound each read only, and cut streamed answers too).
    Every write to a client may block for CLIENT_SEND_TIMEOUT seconds, then the
    connection is closed.
    """
    config = HypercornConfig()
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.errorlog.addFilter(_NOT_A_LIFESPAN_ERROR)
    config.graceful_timeout = settings.shutdown_grace + GOODBYE_SECONDS
    config.keep_alive_timeout = settings.http_header_timeout
    watchdog = SendWatchdog(settings.client_send_timeout)  # run around hypercorn's serve
    bound_hypercorn_sends(config, watchdog)
    config.backlog = LISTEN_BACKLOG  # hypercorn listens again on the socket: keep our backlog
    if settings.tls_certfile is not None:  # checked at start-up by server_ssl_context
        config.certfile, config.keyfile = str(settings.tls_certfile), str(settings.tls_keyfile)
    stopping = Stopping()
    async with watchdog.running(), trio.open_nursery() as nursery:
        nursery.start_soon(stopping.follow, shutdown, settings.shutdown_grace)
        await hypercorn_serve(
            StopOnBrokenSend(create_app(service, stopping)),  # type: ignore[arg-type]
            config,
            shutdown_trigger=shutdown.wait,
            task_status=task_status,
            mode="asgi",
        )
        nursery.cancel_scope.cancel()


class _NotALifespanError(logging.Filter):
    """Drops hypercorn's "ASGI Framework Lifespan error" when the lifespan task was only cancelled.

    A second signal cancels everything at once, hypercorn's lifespan task too,
    and hypercorn would log that cancellation as an error with a traceback. A
    signal during start-up cancels the lifespan task before it started, and
    hypercorn warns (with no exception attached) from the cancelled task.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is None:
            return not (str(record.msg).startswith("ASGI Framework Lifespan") and _cancelled())
        if isinstance(error, BaseExceptionGroup):
            return error.split(trio.Cancelled)[1] is not None
        return not isinstance(error, trio.Cancelled)


def _cancelled() -> bool:
    """True in a trio task whose cancel scope is cancelled (False outside trio)."""
    try:
        return trio.current_effective_deadline() == -math.inf
    except RuntimeError:
        return False


_NOT_A_LIFESPAN_ERROR = _NotALifespanError()


def _bind_all(settings: Settings) -> dict[str, socket.socket]:
    """Bind every enabled listener, or none: raises ListenError naming the first taken port."""
    wanted = {
        "http_port": (settings.http_port, "HTTP"),
        "grpc_port": (settings.grpc_port, "gRPC"),
        "ws_port": (settings.ws_port, "WebSocket"),
    }
    bound: dict[str, socket.socket] = {}
    try:
        for key, (port, name) in wanted.items():
            if port:
                bound[key] = bind_tcp(settings.host, port, name=name)
    except BaseException:
        for sock in bound.values():
            sock.close()
        raise
    return bound


SERVERS = {"http_port": _serve_http, "grpc_port": serve_grpc, "ws_port": serve_websocket}


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _where(host: str, port: int | None) -> str:
    return f"{host}:{port}" if port else "off"
