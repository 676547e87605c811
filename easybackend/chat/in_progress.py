"""Answers in progress that another request may stop, by the id their turn will have.

A transport whose answers can be cancelled from elsewhere (``POST
/v1/responses/{id}/cancel``) runs the consumption of :meth:`ChatService.ask`
inside :meth:`AnswersInProgress.cancellable`, under the turn id it gave the
ask (``AskRequest.turn_id``). :meth:`AnswersInProgress.cancel` cancels that
scope: the transport's consumer is cancelled as when its client goes away, so
the chat core closes the upstream call and stores the pieces delivered so far
as a ``cancelled`` turn under that id; the transport sees
``scope.cancelled_caught`` and reports the answer as cancelled.

Only answers of this process are known here (with several instances, a cancel
reaching another instance than the one answering finds nothing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import trio


class AnswersInProgress:
    """Cancel scopes of answers in progress, by (owner, turn id): one owner cannot reach another's."""

    def __init__(self) -> None:
        self._scopes: dict[tuple[str, str], trio.CancelScope] = {}

    @contextlib.contextmanager
    def cancellable(self, owner: str, turn_id: str) -> Iterator[trio.CancelScope]:
        """A cancel scope that :meth:`cancel` of ``(owner, turn_id)`` cancels while the block runs."""
        key = (owner, turn_id)
        with trio.CancelScope() as scope:
            self._scopes[key] = scope
            try:
                yield scope
            finally:
                if self._scopes.get(key) is scope:
                    del self._scopes[key]

    def cancel(self, owner: str, turn_id: str) -> bool:
        """Cancel the owner's answer in progress under ``turn_id``; False if there is none."""
        scope = self._scopes.get((owner, turn_id))
        if scope is None:
            return False
        scope.cancel()
        return True

    def running(self, owner: str, turn_id: str) -> bool:
        return (owner, turn_id) in self._scopes
