"""The one upstream client: streaming chat completions through the official ``openai`` SDK.

A single ``openai.AsyncOpenAI`` (and so a single connection pool) serves the
whole process; it runs on trio through anyio. Every call streams, also for
non-streaming asks, so cancellation and partial answers behave the same on
every path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence

import httpx2
import openai
import trio

from ..errors import UpstreamError, from_upstream
from ..settings import Settings


@dataclasses.dataclass(frozen=True, slots=True)
class Completion:
    """The last item of a stream: why it ended, and the provider's usage figures if it sent them."""

    finish_reason: str
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None


@dataclasses.dataclass(frozen=True, slots=True)
class UpstreamCall:
    """One chat-completion request."""

    messages: Sequence[dict[str, str]]
    model: str
    temperature: float
    max_tokens: int | None


class OpenAIUpstream:
    """Streams answers from an OpenAI-compatible endpoint."""

    def __init__(self, settings: Settings, *, base_url: str | None = None) -> None:
        timeout = httpx2.Timeout(
            settings.upstream_timeout, connect=min(10.0, settings.upstream_timeout)
        )
        self._client = openai.AsyncOpenAI(
            api_key=settings.openai_api_key or "demo",
            base_url=base_url or settings.openai_base_url,
            max_retries=settings.upstream_retries,
            timeout=timeout,
            http_client=openai.DefaultAsyncHttpxClient(
                timeout=timeout,
                limits=httpx2.Limits(max_connections=None, max_keepalive_connections=256),
            ),
        )

    async def stream(self, call: UpstreamCall) -> AsyncIterator[str | Completion]:
        """Yield the answer's text pieces as they arrive, then one :class:`Completion`.

        Raises :class:`~easybackend.errors.UpstreamError` (never an SDK
        exception). On cancellation, or when the consumer closes the
        generator early, the HTTP response is closed at once, which tells
        the provider to stop generating.
        """
        options: dict[str, object] = {}
        if call.max_tokens is not None:
            options["max_tokens"] = call.max_tokens
        try:
            stream = await self._client.chat.completions.create(
                model=call.model,
                messages=list(call.messages),  # type: ignore[arg-type]
                temperature=call.temperature,
                stream=True,
                stream_options={"include_usage": True},
                **options,  # type: ignore[arg-type]
            )
        except Exception as exc:
            raise from_upstream(exc) from exc

        finish_reason: str | None = None
        model: str | None = None
        usage = None
        try:
            async for chunk in stream:
                model = chunk.model or model
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices[:1]:
                    if choice.delta is not None and choice.delta.content:
                        yield choice.delta.content
                    if choice.finish_reason:
                        finish_reason = choice.finish_reason
        except UpstreamError:
            raise
        except openai.APIConnectionError as exc:
            if isinstance(exc, openai.APITimeoutError):
                raise from_upstream(exc) from exc
            raise UpstreamError("the model provider broke off the answer") from exc
        except Exception as exc:
            raise from_upstream(exc) from exc
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.close()
        if finish_reason is None:
            raise UpstreamError("the model provider ended the answer without a finish reason")
        yield Completion(
            finish_reason=finish_reason,
            model=model,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.close()
