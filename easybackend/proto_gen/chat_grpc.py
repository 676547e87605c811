import purerpc
from . import chat_pb2 as chat__pb2


class ChatServicer(purerpc.Servicer):
    async def Ask(self, input_message):
        raise NotImplementedError()

    async def Regenerate(self, input_message):
        raise NotImplementedError()

    async def Resume(self, input_message):
        raise NotImplementedError()

    async def CancelAnswer(self, input_message):
        raise NotImplementedError()

    async def ListConversations(self, input_message):
        raise NotImplementedError()

    async def GetConversation(self, input_message):
        raise NotImplementedError()

    async def DeleteConversation(self, input_message):
        raise NotImplementedError()

    async def Rollback(self, input_message):
        raise NotImplementedError()

    async def SetHead(self, input_message):
        raise NotImplementedError()

    async def DeleteTurn(self, input_message):
        raise NotImplementedError()

    async def SetSystemPrompt(self, input_message):
        raise NotImplementedError()

    async def SetSettings(self, input_message):
        raise NotImplementedError()

    async def GetSummary(self, input_message):
        raise NotImplementedError()

    async def SetSummary(self, input_message):
        raise NotImplementedError()

    async def Compact(self, input_message):
        raise NotImplementedError()

    @property
    def service(self) -> purerpc.Service:
        service_obj = purerpc.Service(
            "chat.Chat"
        )
        service_obj.add_method(
            "Ask",
            self.Ask,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                chat__pb2.AskRequest,
                chat__pb2.AskResponse,
            )
        )
        service_obj.add_method(
            "Regenerate",
            self.Regenerate,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                chat__pb2.RegenerateRequest,
                chat__pb2.AskResponse,
            )
        )
        service_obj.add_method(
            "Resume",
            self.Resume,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                chat__pb2.ResumeRequest,
                chat__pb2.AskResponse,
            )
        )
        service_obj.add_method(
            "CancelAnswer",
            self.CancelAnswer,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                chat__pb2.CancelAnswerRequest,
                chat__pb2.CancelAnswerResponse,
            )
        )
        service_obj.add_method(
            "ListConversations",
            self.ListConversations,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                chat__pb2.ListConversationsRequest,
                chat__pb2.ListConversationsResponse,
            )
        )
        service_obj.add_method(
            "GetConversation",
            self.GetConversation,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                chat__pb2.ConversationRequest,
                chat__pb2.Conversation,
            )
        )
        service_obj.add_method(
            "DeleteConversation",
            self.DeleteConversation,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                chat__pb2.ConversationRequest,
                chat__pb2.DeleteConversationResponse,
            )
        )
        service_obj.add_method(
            "Rollback",
            self.Rollback,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                chat__pb2.RollbackRequest,
                chat__pb2.RollbackResponse,
            )
        )
        service_obj.add_method(
            "SetHead",
            self.SetHead,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                chat__pb2.SetHeadRequest,
                chat__pb2.SetHeadResponse,
            )
        )
        service_obj.add_method(
            "DeleteTurn",
            self.DeleteTurn,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                chat__pb2.DeleteTurnRequest,
                chat__pb2.DeleteTurnResponse,
            )
        )
        service_obj.add_method(
            "SetSystemPrompt",
            self.SetSystemPrompt,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                chat__pb2.SetSystemPromptRequest,
                chat__pb2.SetSystemPromptResponse,
            )
        )
        service_obj.add_method(
            "SetSettings",
            self.SetSettings,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                chat__pb2.SetSettingsRequest,
                chat__pb2.SetSettingsResponse,
            )
        )
        service_obj.add_method(
            "GetSummary",
            self.GetSummary,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                chat__pb2.ConversationRequest,
                chat__pb2.Summary,
            )
        )
        service_obj.add_method(
            "SetSummary",
            self.SetSummary,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                chat__pb2.SetSummaryRequest,
                chat__pb2.Summary,
            )
        )
        service_obj.add_method(
            "Compact",
            self.Compact,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                chat__pb2.CompactRequest,
                chat__pb2.Summary,
            )
        )
        return service_obj


class ChatStub:
    def __init__(self, channel):
        self._client = purerpc.Client(
            "chat.Chat",
            channel
        )
        self.Ask = self._client.get_method_stub(
            "Ask",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                chat__pb2.AskRequest,
                chat__pb2.AskResponse,
            )
        )
        self.Regenerate = self._client.get_method_stub(
            "Regenerate",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                chat__pb2.RegenerateRequest,
                chat__pb2.AskResponse,
            )
        )
        self.Resume = self._client.get_method_stub(
            "Resume",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                chat__pb2.ResumeRequest,
                chat__pb2.AskResponse,
            )
        )
        self.CancelAnswer = self._client.get_method_stub(
            "CancelAnswer",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                chat__pb2.CancelAnswerRequest,
                chat__pb2.CancelAnswerResponse,
            )
        )
        self.ListConversations = self._client.get_method_stub(
            "ListConversations",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                chat__pb2.ListConversationsRequest,
                chat__pb2.ListConversationsResponse,
            )
        )
        self.GetConversation = self._client.get_method_stub(
            "GetConversation",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                chat__pb2.ConversationRequest,
                chat__pb2.Conversation,
            )
        )
        self.DeleteConversation = self._client.get_method_stub(
            "DeleteConversation",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                chat__pb2.ConversationRequest,
                chat__pb2.DeleteConversationResponse,
            )
        )
        self.Rollback = self._client.get_method_stub(
            "Rollback",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                chat__pb2.RollbackRequest,
                chat__pb2.RollbackResponse,
            )
        )
        self.SetHead = self._client.get_method_stub(
            "SetHead",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                chat__pb2.SetHeadRequest,
                chat__pb2.SetHeadResponse,
            )
        )
        self.DeleteTurn = self._client.get_method_stub(
            "DeleteTurn",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                chat__pb2.DeleteTurnRequest,
                chat__pb2.DeleteTurnResponse,
            )
        )
        self.SetSystemPrompt = self._client.get_method_stub(
            "SetSystemPrompt",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                chat__pb2.SetSystemPromptRequest,
                chat__pb2.SetSystemPromptResponse,
            )
        )
        self.SetSettings = self._client.get_method_stub(
            "SetSettings",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                chat__pb2.SetSettingsRequest,
                chat__pb2.SetSettingsResponse,
            )
        )
        self.GetSummary = self._client.get_method_stub(
            "GetSummary",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                chat__pb2.ConversationRequest,
                chat__pb2.Summary,
            )
        )
        self.SetSummary = self._client.get_method_stub(
            "SetSummary",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                chat__pb2.SetSummaryRequest,
                chat__pb2.Summary,
            )
        )
        self.Compact = self._client.get_method_stub(
            "Compact",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                chat__pb2.CompactRequest,
                chat__pb2.Summary,
            )
        )