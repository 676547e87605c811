"""The OpenAI-compatible API under ``/v1`` (SPEC §13): a fourth transport on the HTTP port.

:func:`openai_routes` is the blueprint :func:`easybackend.transports.http.create_app`
registers; it holds ``GET /v1/models`` and ``GET /v1/models/{id}``
(:mod:`.models`) and ``POST /v1/chat/completions`` (:mod:`.chat_completions`).
The HTTP app does the rest as for every route: the Caller (the ``Bearer``
token is the backend key; protocol ``openai``), the request id, the shutdown,
and the error handlers, which answer every path under ``/v1`` in OpenAI's
error shape (:mod:`.errors`) — unknown routes and wrong methods included.

Pieces meant for the other ``/v1`` routes: :func:`.errors.error_response`,
:func:`.errors.error_event` and :data:`.errors.STATUS_BY_ERROR` (the error
shape); :func:`.models.usable_models` (which models a caller may use);
:data:`ASK_ENDPOINTS` (the routes that are asks: refused ones are accounted,
and they are refused once a shutdown has begun; add new ask routes there);
:func:`.streaming.streamed_response` (a streamed answer whose first event is
awaited before the response starts, errors after it as an event).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from quart import Blueprint

from ...chat.caller import Caller
from ...chat.service import ChatService
from .chat_completions import chat_completion_routes
from .conversations import conversation_routes
from .models import model_routes
from .responses import response_routes

if TYPE_CHECKING:
    from ..http import Stopping

PREFIX = "/v1"
PROTOCOL = "openai"  # the protocol of its asks, in access lines and metrics
BLUEPRINT = "openai_api"
# The endpoints that are asks (the HTTP app accounts for the refused ones).
ASK_ENDPOINTS = frozenset({f"{BLUEPRINT}.chat_completions", f"{BLUEPRINT}.create_response"})


def is_openai_path(path: str) -> bool:
    """Whether ``path`` is under ``/v1`` (and so answered in OpenAI's shape, errors included)."""
    return path == PREFIX or path.startswith(PREFIX + "/")


def openai_routes(
    service: ChatService, caller: Callable[[], Caller], stopping: Stopping
) -> Blueprint:
    """The ``/v1`` routes over ``service``; ``caller`` gives each request's Caller."""
    blueprint = Blueprint(BLUEPRINT, __name__, url_prefix=PREFIX)
    model_routes(blueprint, service, caller)
    chat_completion_routes(blueprint, service, caller, stopping)
    response_routes(blueprint, service, caller, stopping)
    conversation_routes(blueprint, service, caller)
    return blueprint
