from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AskRequest(_message.Message):
    __slots__ = ("prompt", "conversation_id", "parent_id", "model", "temperature", "max_tokens", "system", "user", "background")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    conversation_id: str
    parent_id: str
    model: str
    temperature: float
    max_tokens: int
    system: str
    user: str
    background: bool
    def __init__(self, prompt: _Optional[str] = ..., conversation_id: _Optional[str] = ..., parent_id: _Optional[str] = ..., model: _Optional[str] = ..., temperature: _Optional[float] = ..., max_tokens: _Optional[int] = ..., system: _Optional[str] = ..., user: _Optional[str] = ..., background: _Optional[bool] = ...) -> None: ...

class RegenerateRequest(_message.Message):
    __slots__ = ("conversation_id", "turn_id", "model", "temperature", "max_tokens", "system", "user", "background")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    turn_id: str
    model: str
    temperature: float
    max_tokens: int
    system: str
    user: str
    background: bool
    def __init__(self, conversation_id: _Optional[str] = ..., turn_id: _Optional[str] = ..., model: _Optional[str] = ..., temperature: _Optional[float] = ..., max_tokens: _Optional[int] = ..., system: _Optional[str] = ..., user: _Optional[str] = ..., background: _Optional[bool] = ...) -> None: ...

class AskResponse(_message.Message):
    __slots__ = ("response", "finish_reason", "usage", "model", "turn_id", "turn", "seq", "more")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    response: str
    finish_reason: str
    usage: Usage
    model: str
    turn_id: str
    turn: int
    seq: int
    more: bool
    def __init__(self, response: _Optional[str] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., model: _Optional[str] = ..., turn_id: _Optional[str] = ..., turn: _Optional[int] = ..., seq: _Optional[int] = ..., more: _Optional[bool] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ("conversation_id", "turn_id", "after")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    turn_id: str
    after: int
    def __init__(self, conversation_id: _Optional[str] = ..., turn_id: _Optional[str] = ..., after: _Optional[int] = ...) -> None: ...

class CancelAnswerRequest(_message.Message):
    __slots__ = ("conversation_id", "turn_id")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    turn_id: str
    def __init__(self, conversation_id: _Optional[str] = ..., turn_id: _Optional[str] = ...) -> None: ...

class CancelAnswerResponse(_message.Message):
    __slots__ = ("conversation_id", "turn_id", "cancelled")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    turn_id: str
    cancelled: bool
    def __init__(self, conversation_id: _Optional[str] = ..., turn_id: _Optional[str] = ..., cancelled: _Optional[bool] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "total_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ...) -> None: ...

class ListConversationsRequest(_message.Message):
    __slots__ = ("limit", "cursor", "query")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    limit: int
    cursor: str
    query: str
    def __init__(self, limit: _Optional[int] = ..., cursor: _Optional[str] = ..., query: _Optional[str] = ...) -> None: ...

class ListConversationsResponse(_message.Message):
    __slots__ = ("conversations", "next_cursor")
    CONVERSATIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_CURSOR_FIELD_NUMBER: _ClassVar[int]
    conversations: _containers.RepeatedCompositeFieldContainer[ConversationSummary]
    next_cursor: str
    def __init__(self, conversations: _Optional[_Iterable[_Union[ConversationSummary, _Mapping]]] = ..., next_cursor: _Optional[str] = ...) -> None: ...

class ConversationSummary(_message.Message):
    __slots__ = ("conversation_id", "system_prompt", "turns", "usage", "created_at", "last_activity", "head", "stored_turns", "title", "settings")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    STORED_TURNS_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    system_prompt: str
    turns: int
    usage: Usage
    created_at: str
    last_activity: str
    head: str
    stored_turns: int
    title: str
    settings: ConversationSettings
    def __init__(self, conversation_id: _Optional[str] = ..., system_prompt: _Optional[str] = ..., turns: _Optional[int] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., created_at: _Optional[str] = ..., last_activity: _Optional[str] = ..., head: _Optional[str] = ..., stored_turns: _Optional[int] = ..., title: _Optional[str] = ..., settings: _Optional[_Union[ConversationSettings, _Mapping]] = ...) -> None: ...

class ConversationSettings(_message.Message):
    __slots__ = ("model", "temperature", "max_context_tokens", "memory", "system", "title", "expires_in")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_FIELD_NUMBER: _ClassVar[int]
    model: str
    temperature: float
    max_context_tokens: int
    memory: str
    system: str
    title: str
    expires_in: float
    def __init__(self, model: _Optional[str] = ..., temperature: _Optional[float] = ..., max_context_tokens: _Optional[int] = ..., memory: _Optional[str] = ..., system: _Optional[str] = ..., title: _Optional[str] = ..., expires_in: _Optional[float] = ...) -> None: ...

class ConversationRequest(_message.Message):
    __slots__ = ("conversation_id", "view")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    view: str
    def __init__(self, conversation_id: _Optional[str] = ..., view: _Optional[str] = ...) -> None: ...

class Conversation(_message.Message):
    __slots__ = ("conversation_id", "system_prompt", "turns", "usage", "created_at", "last_activity", "history", "head", "stored_turns", "tree", "title", "settings")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    STORED_TURNS_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    system_prompt: str
    turns: int
    usage: Usage
    created_at: str
    last_activity: str
    history: _containers.RepeatedCompositeFieldContainer[Turn]
    head: str
    stored_turns: int
    tree: _containers.RepeatedCompositeFieldContainer[Turn]
    title: str
    settings: ConversationSettings
    def __init__(self, conversation_id: _Optional[str] = ..., system_prompt: _Optional[str] = ..., turns: _Optional[int] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., created_at: _Optional[str] = ..., last_activity: _Optional[str] = ..., history: _Optional[_Iterable[_Union[Turn, _Mapping]]] = ..., head: _Optional[str] = ..., stored_turns: _Optional[int] = ..., tree: _Optional[_Iterable[_Union[Turn, _Mapping]]] = ..., title: _Optional[str] = ..., settings: _Optional[_Union[ConversationSettings, _Mapping]] = ...) -> None: ...

class Turn(_message.Message):
    __slots__ = ("turn", "messages", "model", "finish_reason", "usage", "created_at", "finished_at", "id", "parent_id", "siblings", "upstream")
    TURN_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    SIBLINGS_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    turn: int
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    model: str
    finish_reason: str
    usage: Usage
    created_at: str
    finished_at: str
    id: str
    parent_id: str
    siblings: _containers.RepeatedScalarFieldContainer[str]
    upstream: str
    def __init__(self, turn: _Optional[int] = ..., messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ..., model: _Optional[str] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., created_at: _Optional[str] = ..., finished_at: _Optional[str] = ..., id: _Optional[str] = ..., parent_id: _Optional[str] = ..., siblings: _Optional[_Iterable[str]] = ..., upstream: _Optional[str] = ...) -> None: ...

class Message(_message.Message):
    __slots__ = ("role", "text", "tokens")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    role: str
    text: str
    tokens: int
    def __init__(self, role: _Optional[str] = ..., text: _Optional[str] = ..., tokens: _Optional[int] = ...) -> None: ...

class DeleteConversationResponse(_message.Message):
    __slots__ = ("conversation_id",)
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    def __init__(self, conversation_id: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("conversation_id", "turns")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    turns: int
    def __init__(self, conversation_id: _Optional[str] = ..., turns: _Optional[int] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("conversation_id", "removed", "turns", "head")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    removed: int
    turns: int
    head: str
    def __init__(self, conversation_id: _Optional[str] = ..., removed: _Optional[int] = ..., turns: _Optional[int] = ..., head: _Optional[str] = ...) -> None: ...

class SetHeadRequest(_message.Message):
    __slots__ = ("conversation_id", "turn_id")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    turn_id: str
    def __init__(self, conversation_id: _Optional[str] = ..., turn_id: _Optional[str] = ...) -> None: ...

class SetHeadResponse(_message.Message):
    __slots__ = ("conversation_id", "head")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    head: str
    def __init__(self, conversation_id: _Optional[str] = ..., head: _Optional[str] = ...) -> None: ...

class DeleteTurnRequest(_message.Message):
    __slots__ = ("conversation_id", "turn_id")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    turn_id: str
    def __init__(self, conversation_id: _Optional[str] = ..., turn_id: _Optional[str] = ...) -> None: ...

class DeleteTurnResponse(_message.Message):
    __slots__ = ("conversation_id", "deleted", "head")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    deleted: int
    head: str
    def __init__(self, conversation_id: _Optional[str] = ..., deleted: _Optional[int] = ..., head: _Optional[str] = ...) -> None: ...

class SetSystemPromptRequest(_message.Message):
    __slots__ = ("conversation_id", "prompt")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    prompt: str
    def __init__(self, conversation_id: _Optional[str] = ..., prompt: _Optional[str] = ...) -> None: ...

class SetSystemPromptResponse(_message.Message):
    __slots__ = ("conversation_id", "system_prompt")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    system_prompt: str
    def __init__(self, conversation_id: _Optional[str] = ..., system_prompt: _Optional[str] = ...) -> None: ...

class SetSettingsRequest(_message.Message):
    __slots__ = ("conversation_id", "settings", "clear")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    settings: ConversationSettings
    clear: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, conversation_id: _Optional[str] = ..., settings: _Optional[_Union[ConversationSettings, _Mapping]] = ..., clear: _Optional[_Iterable[str]] = ...) -> None: ...

class SetSettingsResponse(_message.Message):
    __slots__ = ("conversation_id", "settings")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    settings: ConversationSettings
    def __init__(self, conversation_id: _Optional[str] = ..., settings: _Optional[_Union[ConversationSettings, _Mapping]] = ...) -> None: ...

class Summary(_message.Message):
    __slots__ = ("conversation_id", "summary", "covers", "through", "model", "updated_at")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    COVERS_FIELD_NUMBER: _ClassVar[int]
    THROUGH_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    summary: str
    covers: int
    through: str
    model: str
    updated_at: str
    def __init__(self, conversation_id: _Optional[str] = ..., summary: _Optional[str] = ..., covers: _Optional[int] = ..., through: _Optional[str] = ..., model: _Optional[str] = ..., updated_at: _Optional[str] = ...) -> None: ...

class SetSummaryRequest(_message.Message):
    __slots__ = ("conversation_id", "summary")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    summary: str
    def __init__(self, conversation_id: _Optional[str] = ..., summary: _Optional[str] = ...) -> None: ...

class CompactRequest(_message.Message):
    __slots__ = ("conversation_id", "keep")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    keep: int
    def __init__(self, conversation_id: _Optional[str] = ..., keep: _Optional[int] = ...) -> None: ...
