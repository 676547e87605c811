"""HTTP routes of governance: the models a caller may use, and the admin API for stored keys.

Two blueprints registered by :func:`easybackend.transports.http.create_app`:

- :func:`model_routes`: ``GET /models``, the models the caller may name
  (MODELS and its key's own list together) and the one an ask that names
  none gets, and ``GET /usage``, the caller's own key's usage (by day or
  model) and budgets; ordinary routes (the caller is the HTTP app's);
- :func:`admin_routes`: ``GET /admin/keys``, ``POST /admin/keys``,
  ``PATCH /admin/keys/{key_name}``, ``DELETE /admin/keys/{key_name}`` and
  ``GET /admin/usage`` (every key's usage, by key, day and model). They are
  guarded by ``ADMIN_KEY`` alone (``Authorization: Bearer <ADMIN_KEY>``, checked by
  :meth:`~easybackend.chat.caller.Callers.check_admin`): without ADMIN_KEY
  set they answer 404 (the admin API is off); with no key or a wrong one,
  401; with an ordinary API key, 403. The HTTP app makes no Caller for them.

Each admin operation is one call of the key store
(:class:`~easybackend.governance.keys.KeyStore`), which checks every field
and reads the key table again once it changed, so this instance uses the
change at once (the others within a second). ``POST`` answers 201 with the
new key's secret, the only time it is shown; no response, log line or error
ever holds a secret or a digest. ``DELETE`` revokes the key for good (its
name is never given again) and answers with the key, now ``revoked``; a
second ``DELETE`` changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import pydantic
from quart import Blueprint, request
from quart_schema import document_querystring, document_response, tag, validate_request

from ..chat.caller import Caller
from ..chat.service import ChatService
from ..governance import usage
from ..governance.keys import MAX_PER_MINUTE, MAX_TOKENS, key_view

ADMIN_PREFIX = "/admin/"  # every admin route; the HTTP app makes no Caller for these
EXAMPLE_KEY = {
    "name": "bot",
    "status": "active",
    "created_at": "2026-11-25T17:19:00Z",
    "updated_at": "2026-11-25T17:19:00Z",
    "expires_at": "2027-01-01T00:00:00Z",
    "revoked_at": None,
    "disabled": False,
    "rpm": 60,
    "tpm": None,
    "tokens_per_day": 200000,
    "tokens_per_month": None,
    "models": ["gpt-4.1-mini"],
}
_PER_MINUTE = {"ge": 1, "le": MAX_PER_MINUTE}
_TOKENS = {"ge": 1, "le": MAX_TOKENS}
_EXPIRES = (
    "YYYY-MM-DD (the key stops working at 00:00 UTC that day) or an ISO 8601 date and time;"
    " null: never"
)


def is_admin_path(path: str) -> bool:
    """True for the admin API's paths, which take ADMIN_KEY instead of an API key."""
    return path.startswith(ADMIN_PREFIX)


class ModelBody(pydantic.BaseModel):
    name: str = pydantic.Field(description="What an ask names in its model field")
    model: str = pydantic.Field(description="The provider model it calls (differs for an alias)")


class ModelsBody(pydantic.BaseModel):
    """The models this caller may name."""

    model_config = pydantic.ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "default": "gpt-4.1-mini",
                    "models": [
                        {"name": "gpt-4.1-mini", "model": "gpt-4.1-mini"},
                        {"name": "fast", "model": "gpt-4.1-nano"},
                    ],
                }
            ]
        }
    )

    default: str | None = pydantic.Field(
        description="The model of an ask that names none; null: this key may use none"
    )
    models: list[ModelBody]


class KeyBody(pydantic.BaseModel):
    """A stored key, without its secret."""

    model_config = pydantic.ConfigDict(json_schema_extra={"examples": [EXAMPLE_KEY]})

    name: str
    status: str = pydantic.Field(description="active, disabled, expired or revoked")
    created_at: str
    updated_at: str
    expires_at: str | None
    revoked_at: str | None
    disabled: bool
    rpm: int | None = pydantic.Field(description="Requests per minute; null: no limit")
    tpm: int | None = pydantic.Field(description="Tokens per minute; null: no limit")
    tokens_per_day: int | None = pydantic.Field(description="Tokens per UTC day; null: no limit")
    tokens_per_month: int | None = pydantic.Field(
        description="Tokens per UTC month; null: no limit"
    )
    models: list[str] | None = pydantic.Field(description="Models it may use; null: every model")


class NewKeyBody(KeyBody):
    """A key just made, with its secret: shown this once, stored only as a hash."""

    model_config = pydantic.ConfigDict(
        json_schema_extra={"examples": [{**EXAMPLE_KEY, "secret": "eb-" + "x" * 43}]}
    )

    secret: str


class KeyListBody(pydantic.BaseModel):
    keys: list[KeyBody] = pydantic.Field(description="Every stored key, revoked ones too, by name")


class KeyChangeBody(pydantic.BaseModel):
    """Changes of a key: only the fields given change; null clears a limit, the models or the
    expiry."""

    model_config = pydantic.ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"rpm": 120}, {"disabled": True}]}
    )

    rpm: int | None = pydantic.Field(None, **_PER_MINUTE, description="Requests per minute")
    tpm: int | None = pydantic.Field(None, **_PER_MINUTE, description="Tokens per minute")
    tokens_per_day: int | None = pydantic.Field(None, **_TOKENS, description="Tokens per UTC day")
    tokens_per_month: int | None = pydantic.Field(
        None, **_TOKENS, description="Tokens per UTC month"
    )
    models: list[str] | None = pydantic.Field(
        None, min_length=1, max_length=100, description="Models it may use (null: every model)"
    )
    expires: str | None = pydantic.Field(None, description=_EXPIRES)
    disabled: bool | None = pydantic.Field(None, description="A disabled key does not work")


class KeyCreateBody(KeyChangeBody):
    """A new key: its name, and optionally its limits, models and expiry."""

    model_config = pydantic.ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"name": "bot"},
                {"name": "bot", "rpm": 60, "models": ["gpt-4.1-mini"], "expires": "2027-01-01"},
            ]
        },
    )

    name: str = pydantic.Field(
        pattern=r"^[A-Za-z0-9_.\-]{1,64}$",
        description="1-64 characters of A-Z a-z 0-9 _ . -; it owns the key's conversations",
    )


class UsageRowBody(pydantic.BaseModel):
    """The usage of one group (the fields grouped by, then the figures)."""

    model_config = pydantic.ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "day": "2026-12-01",
                    "requests": 12,
                    "prompt_tokens": 3400,
                    "completion_tokens": 1800,
                    "total_tokens": 5200,
                }
            ]
        },
    )

    key: str | None = pydantic.Field(None, description="The key's name (admin; null: no key)")
    day: str | None = pydantic.Field(None, description="The UTC day, YYYY-MM-DD")
    model: str | None = pydantic.Field(None, description="The provider model that answered")
    requests: int = pydantic.Field(description="Asks that cost tokens")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class UsageTotalBody(pydantic.BaseModel):
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class BudgetBody(pydantic.BaseModel):
    """The key's budgets (null: none) and what it spent of them, in tokens (UTC)."""

    tokens_per_day: int | None
    tokens_per_month: int | None
    spent_today: int
    spent_this_month: int


class UsageAnswerBody(pydantic.BaseModel):
    """Usage from ``from`` to ``to`` (UTC days, both included), grouped by ``group_by``."""

    key: str | None = pydantic.Field(None, description="The caller's key (null: keys are off)")
    from_: str = pydantic.Field(alias="from")
    to: str
    group_by: str
    usage: list[UsageRowBody]
    total: UsageTotalBody
    budget: BudgetBody | None = pydantic.Field(None, description="GET /usage only")


class UsageQueryArgs(pydantic.BaseModel):
    """The days and the grouping of a usage query."""

    from_: str | None = pydantic.Field(
        None, alias="from", description="First UTC day, YYYY-MM-DD (default: the month's first)"
    )
    to: str | None = pydantic.Field(None, description="Last UTC day, YYYY-MM-DD (default: today)")
    group_by: str | None = pydantic.Field(
        None,
        description="GET /usage: day (default) or model; GET /admin/usage: any of key, day,"
        " model, comma-separated (default all three)",
    )


class AdminUsageQueryArgs(UsageQueryArgs):
    key: str | None = pydantic.Field(None, description="One key's usage only")


def model_routes(service: ChatService, caller: Callable[[], Caller]) -> Blueprint:
    """``GET /models`` for ``service``; ``caller`` gives the request's Caller."""
    blueprint = Blueprint("models", __name__)

    @blueprint.get("/models")
    @document_response(ModelsBody, 200)
    @tag(["models"])
    async def list_models() -> dict[str, object]:
        """The models this key may name in an ask's ``model`` (MODELS, and the key's own list).

        An alias's ``model`` is the provider model its asks call, and that the
        stored turns record.
        """
        who = caller()
        default = service.default_model(caller=who)
        return {
            "default": default.name if default is not None else None,
            "models": [entry.as_dict() for entry in service.allowed_models(caller=who)],
        }

    @blueprint.get("/usage")
    @document_querystring(UsageQueryArgs)
    @document_response(UsageAnswerBody, 200)
    @tag(["models"])
    async def own_usage() -> dict[str, object]:
        """This key's usage: requests and tokens per UTC day (``group_by=day``, the default) or
        per model (``group_by=model``), from ``from`` to ``to`` (default: this month), and its
        budgets with what it spent of them.

        The figures are those the limits count: every ask that cost tokens, the /v1 relay's
        too. With keys off, the usage of every ask (``key`` null).
        """
        who = caller()
        args = request.args
        query = usage.parse_query(
            args.get("from"),
            args.get("to"),
            args.get("group_by"),
            service.limits.clock(),
            allowed=("day", "model"),
            default=("day",),
        )
        name = who.key_name or ""
        rows = await service.limits.usage_rows(name, query.first_day, query.last_day)
        today, month = await service.limits.spent_now(name)
        grant = service.callers.current(who).grant
        budget = {
            "tokens_per_day": grant.tokens_per_day if grant else None,
            "tokens_per_month": grant.tokens_per_month if grant else None,
            "spent_today": today,
            "spent_this_month": month,
        }
        return usage.usage_view(query, rows, key=who.key_name, budget=budget)

    return blueprint


def admin_routes(service: ChatService) -> Blueprint:
    """The admin API of ``service`` (see the module docstring)."""
    blueprint = Blueprint("admin", __name__, url_prefix=ADMIN_PREFIX.rstrip("/"))
    keys = service.keys

    @blueprint.before_request
    async def only_the_admin() -> None:
        """Raises NotFound (no ADMIN_KEY), Unauthenticated or Forbidden (an ordinary key).

        The body (at most MAX_BODY_BYTES) is read first: hypercorn leaves an HTTP/1.1
        connection hanging, neither reused nor closed, when the response to a request
        goes out before its body has arrived.
        """
        await request.get_data()
        service.callers.check_admin(request.headers.get("Authorization"))

    @blueprint.get("/keys")
    @document_response(KeyListBody, 200)
    @tag(["admin"])
    async def list_keys() -> dict[str, object]:
        """Every stored key (revoked ones too), without secrets. Needs ADMIN_KEY."""
        return {"keys": [key_view(record) for record in await keys.records()]}

    @blueprint.post("/keys")
    @validate_request(KeyCreateBody)
    @document_response(NewKeyBody, 201)
    @tag(["admin"])
    async def create_key(data: KeyCreateBody) -> tuple[dict[str, object], int]:
        """Make a key; the answer holds its secret, shown this once. Needs ADMIN_KEY.

        A name in use, revoked, or one of API_KEYS is 409 ``key_conflict``. The
        key works on this instance at once, on the others within a second.
        """
        fields = data.model_dump(exclude_unset=True, exclude={"name"})
        if fields.get("disabled") is None:
            fields.pop("disabled", None)
        secret, record = await keys.create(data.name, fields)
        return {**key_view(record), "secret": secret}, 201

    @blueprint.patch("/keys/<key_name>")
    @validate_request(KeyChangeBody)
    @document_response(KeyBody, 200)
    @tag(["admin"])
    async def update_key(key_name: str, data: KeyChangeBody) -> dict[str, object]:
        """Change a key's limits, models, expiry or ``disabled``: only the fields given (null
        clears). A revoked key is 409. Needs ADMIN_KEY."""
        fields = data.model_dump(exclude_unset=True)
        if "disabled" in fields and fields["disabled"] is None:
            del fields["disabled"]
        return key_view(await keys.update(key_name, fields))

    @blueprint.delete("/keys/<key_name>")
    @document_response(KeyBody, 200)
    @tag(["admin"])
    async def revoke_key(key_name: str) -> dict[str, object]:
        """Revoke a key for good: it stops working on every instance within a second, and its
        name is never given again. Needs ADMIN_KEY."""
        return key_view(await keys.revoke(key_name))

    @blueprint.get("/usage")
    @document_querystring(AdminUsageQueryArgs)
    @document_response(UsageAnswerBody, 200)
    @tag(["admin"])
    async def all_usage() -> dict[str, object]:
        """Every key's usage (or one ``key``'s), by key, UTC day and model (``group_by``: any of
        them, comma-separated), from ``from`` to ``to`` (default: this month). Needs ADMIN_KEY.

        Asks made with keys off are under ``key`` null.
        """
        args = request.args
        query = usage.parse_query(
            args.get("from"), args.get("to"), args.get("group_by"), service.limits.clock()
        )
        key = args.get("key")
        rows = await service.limits.usage_rows(key, query.first_day, query.last_day)
        return usage.usage_view(query, rows)

    return blueprint
