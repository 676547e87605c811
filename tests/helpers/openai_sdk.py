"""The official ``openai`` SDK pointed at EasyBackend's ``/v1``, as an application would use it.

``async_client`` gives an ``AsyncOpenAI`` (it runs on trio through anyio);
``sync_client`` an ``OpenAI``, to be used from a worker thread
(``trio.to_thread.run_sync``). Neither retries: a test sees each response.
"""

from __future__ import annotations

import openai

from .servers import Server

NO_KEY = "sk-no-key-needed"  # what a client sends when the server has no API_KEYS


def base_url(server: Server) -> str:
    return f"{server.http_url}/v1"


def async_client(server: Server, key: str = NO_KEY, **options: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=base_url(server), api_key=key, max_retries=0, timeout=10, **options
    )


def sync_client(server: Server, key: str = NO_KEY, **options: object) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=base_url(server), api_key=key, max_retries=0, timeout=10, **options
    )
