"""The model allow-list: which models an ask may name, and which provider model each one calls.

``MODELS`` is a comma-separated list of entries, each a model name
(``gpt-4.1-mini``) or an alias (``fast=gpt-4.1-mini``: asks name ``fast``,
the provider is called with ``gpt-4.1-mini``). Unset, the list holds
``GPT_ENGINE`` alone. ``GPT_ENGINE`` must be in the list, as a name or as
the model of an alias: it is what an ask that names no model gets.

An ask's model is chosen by :meth:`ModelList.choose`, before anything is sent
upstream: a name outside the list is refused (``model_not_allowed``), and so
is one outside its key's own list (``keys create --models``). A key's list
is matched by provider model: a key allowed ``fast`` may also name
``gpt-4.1-mini`` when that is an entry of MODELS too. An ask that names no
model gets ``GPT_ENGINE``, or, when its key's list leaves that out, the
first model of the key's list that MODELS holds (so a client that cannot
name a model, like the original WebSocket protocol, still gets an answer).
The upstream call and the stored turn use the provider model.

Nothing here reads the settings or the store: :func:`parse_models` is what
the settings use to read ``MODELS``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from ..errors import ModelNotAllowed

# A model name as MODELS, a key's list and an ask may hold it: printable, no blank, comma or '='.
MODEL_NAME = re.compile(r"[^\s,=\x00-\x1f\x7f]{1,200}")
SHOWN_MODELS = 10  # names listed in a refusal at most
SHOWN_NAME = 64  # characters of a refused name echoed in its refusal


@dataclasses.dataclass(frozen=True, slots=True)
class ModelEntry:
    """One entry of the allow-list: the name asks use and the provider model it calls."""

    name: str
    model: str  # the name itself, unless the entry is an alias

    @property
    def alias(self) -> bool:
        return self.name != self.model

    def as_dict(self) -> dict[str, str]:
        """The entry as ``GET /models`` lists it."""
        return {"name": self.name, "model": self.model}


def parse_models(value: str) -> tuple[ModelEntry, ...]:
    """``MODELS`` → its entries, in order; raises ValueError saying what is wrong (settings' form)."""
    entries: list[ModelEntry] = []
    names: set[str] = set()
    for number, item in enumerate((part.strip() for part in value.split(",")), 1):
        if not item:
            continue
        name, separator, model = (part.strip() for part in item.partition("="))
        if not separator:
            model = name
        if not MODEL_NAME.fullmatch(name) or not MODEL_NAME.fullmatch(model):
            raise ValueError(
                "must be model names or alias=model entries separated by commas, each name"
                f" 1-200 characters without blanks, ',' or '=' (entry {number} is not)"
            )
        if name in names:
            raise ValueError(f"must name each model once ({name!r} appears twice)")
        names.add(name)
        entries.append(ModelEntry(name, model))
    return tuple(entries)


def checked_model_names(value: object, field: str = "models") -> tuple[str, ...]:
    """A key's list of models (a list of names, or text ``a,b``), deduplicated in order.

    Raises ValueError naming ``field``. The names need not be in MODELS (the
    list may change); what a key may use is always both lists together.
    """
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError(f"{field} must be a list of model names")
    names: list[str] = []
    for item in items:
        if not isinstance(item, str) or not MODEL_NAME.fullmatch(item.strip()):
            raise ValueError(
                f"{field} must hold model names of 1-200 characters without blanks, ',' or '='"
            )
        if item.strip() not in names:
            names.append(item.strip())
    if not names:
        raise ValueError(f"{field} must name at least one model (or be left out: every model)")
    if len(names) > 100:
        raise ValueError(f"{field} may name at most 100 models")
    return tuple(names)


class ModelList:
    """The allow-list of one server (see the module docstring). Immutable once built."""

    def __init__(self, entries: Sequence[ModelEntry], default: str) -> None:
        self.entries = tuple(entries) or (ModelEntry(default, default),)
        self._by_name = {entry.name: entry for entry in self.entries}
        found = self._by_name.get(default) or next(
            (entry for entry in self.entries if entry.model == default), None
        )
        if found is None:
            raise ValueError(f"the default model {default!r} is not in the list")
        self.default = found
        self._providers: dict[tuple[str, ...], frozenset[str]] = {}  # per key list, see _allowed

    def choose(self, requested: str | None, models: tuple[str, ...] | None) -> str:
        """The provider model an ask naming ``requested`` (None: none) calls, for a key whose
        own list is ``models`` (None: every model); raises ModelNotAllowed."""
        if requested is None:
            default = self.default_for(models)
            if default is None:
                raise ModelNotAllowed(
                    "this key may use none of this server's models: "
                    f"{self._names(self.entries)} (ask the server's owner)",
                    param="model",
                )
            return default.model
        entry = self._by_name.get(requested)
        if entry is None:
            raise ModelNotAllowed(
                f"the model {_shown(requested)} is not allowed here; allowed: "
                f"{self._names(self.allowed(models)) or 'none for this key'}",
                param="model",
            )
        if models is not None and entry.model not in self._allowed(models):
            raise ModelNotAllowed(
                f"this key may not use the model {_shown(requested)}; it may use: "
                f"{self._names(self.allowed(models)) or 'none'}",
                param="model",
            )
        return entry.model

    def allowed(self, models: tuple[str, ...] | None) -> list[ModelEntry]:
        """The entries a key with the list ``models`` may name (None: every entry), in order."""
        if models is None:
            return list(self.entries)
        providers = self._allowed(models)
        return [entry for entry in self.entries if entry.model in providers]

    def default_for(self, models: tuple[str, ...] | None) -> ModelEntry | None:
        """The entry an ask that names no model gets (see the module docstring), or None."""
        if models is None or self.default.model in self._allowed(models):
            return self.default
        for name in models:
            entry = self._by_name.get(name) or next(
                (entry for entry in self.entries if entry.model == name), None
            )
            if entry is not None:
                return entry
        return None

    def _allowed(self, models: tuple[str, ...]) -> frozenset[str]:
        """The provider models a key's list stands for (each name through MODELS, else itself)."""
        providers = self._providers.get(models)
        if providers is None:
            providers = frozenset(
                self._by_name[name].model if name in self._by_name else name for name in models
            )
            if len(self._providers) < 1024:  # key lists are few; never let this grow unbounded
                self._providers[models] = providers
        return providers

    @staticmethod
    def _names(entries: Sequence[ModelEntry]) -> str:
        names = [entry.name for entry in entries]
        shown = ", ".join(names[:SHOWN_MODELS])
        return shown + (f", … ({len(names)} in all)" if len(names) > SHOWN_MODELS else "")


def _shown(name: str) -> str:
    """A refused name as its refusal quotes it: at most SHOWN_NAME characters."""
    return repr(name if len(name) <= SHOWN_NAME else name[: SHOWN_NAME - 1] + "…")
