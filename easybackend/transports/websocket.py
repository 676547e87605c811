"""Placeholder: replaced by the real transport."""

from __future__ import annotations

import socket

import trio

from ..chat.service import ChatService
from ..settings import Settings


async def serve_websocket(
    service: ChatService,
    settings: Settings,
    sock: socket.socket,
    shutdown: trio.Event,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    raise NotImplementedError
