import purerpc
from . import chat_pb2 as chat__pb2


class ChatServicer(purerpc.Servicer):
    async def Ask(self, input_message):
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