"""Governance: which models an ask may name, and which keys may ask (SPEC §14).

- :mod:`.models`: the allow-list ``MODELS`` (names and aliases) and the
  choice of the provider model for an ask;
- :mod:`.keys`: keys stored in the database as hashes, their limits, the
  in-process cache every instance keeps of them and its refresh.

The checks themselves run once, in the core (``chat/caller.py`` makes the
Caller, ``chat/service.py`` refuses a model before any upstream call), so
every protocol refuses the same things. Nothing here is imported by this
package's ``__init__`` (settings import :mod:`.models`, which imports no
other part of EasyBackend).
"""
