"""The ids the OpenAI API shows, and the turns and conversations they name.

- A response is a turn: ``resp_<turn id>``. Any turn is a response, also one
  asked on another protocol (its settings are then the defaults).
- A message item is one half of a turn: ``msg_<turn id>_u`` its user
  message (the prompt), ``msg_<turn id>_a`` its assistant message (the
  answer). A system or developer message of a response's input is
  ``msg_<turn id>_s<n>`` (shown among the response's input items only).
- A conversation created under /v1 is ``conv_<24 hex digits>``; one a
  response starts (no ``conversation``, no ``previous_response_id``) is
  ``conv_<its first turn id>``. Any native conversation id (``"123"``) is
  accepted as it is: the /v1 API and the native one share conversations.

An id that does not parse names nothing: NotFound, as an unknown one.
"""

from __future__ import annotations

from ...chat.tree import TURN_ID
from ...errors import NotFound
from ...storage.sql import new_turn_id

RESPONSE = "resp_"
MESSAGE = "msg_"
CONVERSATION = "conv_"
USER, ASSISTANT = "u", "a"  # the half of a turn a message item is
ROLE_OF_HALF = {USER: "user", ASSISTANT: "assistant"}
HALF_OF_ROLE = {role: half for half, role in ROLE_OF_HALF.items()}


def response_id(turn_id: str) -> str:
    return RESPONSE + turn_id


def turn_of_response(value: object, param: str | None = None) -> str:
    """The turn id a response id names; NotFound (naming ``param``) if it cannot name one."""
    if isinstance(value, str) and value.startswith(RESPONSE):
        turn_id = value[len(RESPONSE) :]
        if TURN_ID.fullmatch(turn_id):
            return turn_id
    raise NotFound(f"no response with id {_shown(value)}", param=param)


def message_id(turn_id: str, role: str) -> str:
    """The item id of the turn's message of ``role`` (user or assistant)."""
    return f"{MESSAGE}{turn_id}_{HALF_OF_ROLE[role]}"


def system_message_id(turn_id: str, index: int) -> str:
    return f"{MESSAGE}{turn_id}_s{index}"


def message_of_item(value: object) -> tuple[str, str]:
    """(turn id, role) of a message item id; NotFound if it cannot name a turn's message."""
    if isinstance(value, str) and value.startswith(MESSAGE):
        turn_id, _, half = value[len(MESSAGE) :].rpartition("_")
        if half in ROLE_OF_HALF and TURN_ID.fullmatch(turn_id):
            return turn_id, ROLE_OF_HALF[half]
    raise NotFound(f"no item with id {_shown(value)}")


def new_conversation_id() -> str:
    """The id of a conversation created by ``POST /v1/conversations``."""
    return CONVERSATION + new_turn_id()


def conversation_started_by(turn_id: str) -> str:
    """The id of the conversation a response starts when it names none."""
    return CONVERSATION + turn_id


def _shown(value: object) -> str:
    text = value if isinstance(value, str) else repr(value)
    return repr(text[:80])
