"""Code generated from ``proto/`` by ``python scripts/gen_proto.py``. Do not edit.

``chat_pb2`` / ``chat_grpc``: the ``chat.Chat`` service (messages; purerpc
servicer and stub). ``health_pb2`` / ``health_grpc``: ``grpc.health.v1.Health``.
"""
