"""``GET /v1/models`` and ``GET /v1/models/{id}``: the models a caller may use, in OpenAI's shape.

:func:`usable_models` is the one answer to "which models may this caller
use": the names of ``MODELS`` (``GPT_ENGINE`` alone by default) that the
caller's key may use, as the core gives them (``ChatService.allowed_models``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

import pydantic
from quart import Blueprint
from quart_schema import document_response, tag

from ...chat.caller import Caller
from ...chat.service import ChatService
from ...errors import NotFound

OWNED_BY = "easybackend"


def usable_models(service: ChatService, caller: Caller) -> list[str]:
    """The models ``caller`` may ask for, the one an ask naming none gets first."""
    names = [entry.name for entry in service.allowed_models(caller=caller)]
    default = service.default_model(caller=caller)
    if default is not None:
        names.remove(default.name)
        names.insert(0, default.name)
    return names


class ModelObject(pydantic.BaseModel):
    """A model, as OpenAI describes one."""

    model_config = pydantic.ConfigDict(
        json_schema_extra={
            "examples": [
                {"id": "gpt-4.1-mini", "object": "model", "created": 0, "owned_by": OWNED_BY}
            ]
        }
    )

    id: str
    object: Literal["model"]
    created: int = pydantic.Field(description="When this server started (Unix seconds)")
    owned_by: str


class ModelList(pydantic.BaseModel):
    """The models this key may use."""

    object: Literal["list"]
    data: list[ModelObject]


def model_routes(blueprint: Blueprint, service: ChatService, caller: Callable[[], Caller]) -> None:
    """Add the two model routes to ``blueprint`` (the ``/v1`` one)."""
    created = int(time.time())

    def model_object(name: str) -> dict[str, object]:
        return {"id": name, "object": "model", "created": created, "owned_by": OWNED_BY}

    @blueprint.get("/models")
    @document_response(ModelList, 200)
    @tag(["openai"])
    async def list_models() -> dict[str, object]:
        """The models this key may use (OpenAI's ``models.list()``)."""
        return {
            "object": "list",
            "data": [model_object(m) for m in usable_models(service, caller())],
        }

    @blueprint.get("/models/<path:model_id>")
    @document_response(ModelObject, 200)
    @tag(["openai"])
    async def retrieve_model(model_id: str) -> dict[str, object]:
        """One model this key may use (OpenAI's ``models.retrieve()``); any other is a 404."""
        if model_id not in usable_models(service, caller()):
            raise NotFound(f"no model {model_id!r} for this key", param="model")
        return model_object(model_id)
