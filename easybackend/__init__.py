"""EasyBackend: ChatGPT-style conversations with server-side memory over HTTP, WebSocket and gRPC."""

__version__ = "0.1.0"
