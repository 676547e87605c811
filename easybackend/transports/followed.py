"""How a followed answer ended, for the transports whose streams must close with a last message.

A follower's events stop without an end when it asked for the events after
the last one (a resume after the end), or when the answer was cancelled before
anything was stored (its log has no ``End``). The WebSocket and gRPC transports then close the stream with a
last, unnumbered message naming the answer's finish reason, which
:func:`finish_reason_of` reads: from the stored turn, else from the answer's log.
"""

from __future__ import annotations

from ..chat.answers import CANCELLED
from ..chat.caller import Caller
from ..chat.service import ChatService
from ..errors import NotFound

ENDED_UNKNOWN = CANCELLED  # nothing is known of it any more: it ended with nothing stored


async def finish_reason_of(
    service: ChatService, conversation_id: str, turn_id: str, *, caller: Caller
) -> str:
    """The finish reason of the answer of turn ``turn_id`` that a follower saw stop without an
    end: its stored turn's, else its log's state (``cancelled``). Raises InvalidInput for
    malformed ids; cancellation goes through."""
    try:
        live, turn = await service.answer_state(conversation_id, turn_id, caller=caller)
    except NotFound:
        return ENDED_UNKNOWN
    if turn is not None:
        return turn.finish_reason
    assert live is not None
    return live.state if live.ended else ENDED_UNKNOWN
