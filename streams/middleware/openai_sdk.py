"""The middleware around the official ``openai`` SDK's chat completions (``pip install costline[providers]``).

    chat = MeteredChat(openai.OpenAI(), meter, tenant="acme", user="u-42")
    response = chat.create(model="gpt-4o", messages=[...], max_completion_tokens=500)
    for chunk in chat.create(model="gpt-4o", messages=[...], stream=True): ...

Each call is reserved before it is sent (``Refused`` when a hard cap would be passed), and its
usage published when it ends (see ``streams.middleware.meter``). A stream is sent with
``stream_options.include_usage`` so that its last chunk carries the usage; that chunk (no
choices) is passed on only when the caller asked for it itself.

The expected input tokens are bounded by the messages' size in UTF-8 bytes: no tokenizer gives a
token less than one byte of text, so the bound holds for any model (images and audio, priced by
their own rules, are not in it).
"""

from __future__ import annotations

import json
from typing import Any

import openai

from streams.middleware.meter import AsyncMeter, Call, Meter


def input_bound(messages: Any) -> int:
    """An upper bound of the prompt's tokens: its messages' size in UTF-8 bytes."""
    return len(json.dumps(messages, ensure_ascii=False, default=str).encode())


def _admission(kwargs: dict[str, Any], tenant: str, user: str | None, context: dict[str, str | None]) -> dict[str, Any]:
    return dict(tenant=tenant, user=user, provider="openai", model=kwargs["model"],
                input_tokens=input_bound(kwargs.get("messages")), n=kwargs.get("n") or 1,
                max_tokens=kwargs.get("max_completion_tokens") or kwargs.get("max_tokens"), **context)


def _ask_for_usage(kwargs: dict[str, Any]) -> bool:
    """Makes a stream end with its usage; returns whether the caller asked for that chunk itself."""
    asked = bool((kwargs.get("stream_options") or {}).get("include_usage"))
    kwargs["stream_options"] = {**(kwargs.get("stream_options") or {}), "include_usage": True}
    return asked


def _record(call: Call, usage: Any) -> None:
    call.record(raw_usage=usage.model_dump(exclude_none=True), raw_usage_format="openai_chat")


def _observe(call: Call, chunk: Any, asked: bool) -> bool:
    """Takes what a stream's chunk says of usage; returns whether the caller gets the chunk."""
    if chunk.usage is not None:
        _record(call, chunk.usage)
        if not chunk.choices and not asked:
            return False  # the usage chunk the caller did not ask for
    for choice in chunk.choices:
        if choice.delta and choice.delta.content:
            call.output_tokens_seen += 1  # (a chunk carries about one token)
    return True


class MeteredChat:
    def __init__(self, client: openai.OpenAI, meter: Meter, *, tenant: str, user: str | None = None,
                 **context: str | None) -> None:
        self.client, self.meter, self.tenant, self.user, self.context = client, meter, tenant, user, context

    def create(self, **kwargs: Any) -> Any:
        admission = _admission(kwargs, self.tenant, self.user, self.context)
        if not kwargs.get("stream"):
            with self.meter.admit(**admission) as call:
                response = self.client.chat.completions.create(**kwargs)
                _record(call, response.usage)
                return response
        asked = _ask_for_usage(kwargs)
        return self.meter.stream(admission, lambda: self.client.chat.completions.create(**kwargs),
                                 lambda call, chunk: _observe(call, chunk, asked))


class AsyncMeteredChat:
    """``MeteredChat`` for ``openai.AsyncOpenAI``, with an ``AsyncMeter``."""

    def __init__(self, client: openai.AsyncOpenAI, meter: AsyncMeter, *, tenant: str, user: str | None = None,
                 **context: str | None) -> None:
        self.client, self.meter, self.tenant, self.user, self.context = client, meter, tenant, user, context

    async def create(self, **kwargs: Any) -> Any:
        admission = _admission(kwargs, self.tenant, self.user, self.context)
        if not kwargs.get("stream"):
            async with self.meter.admit(**admission) as call:
                response = await self.client.chat.completions.create(**kwargs)
                _record(call, response.usage)
                return response
        asked = _ask_for_usage(kwargs)
        return await self.meter.stream(admission, lambda: self.client.chat.completions.create(**kwargs),
                                       lambda call, chunk: _observe(call, chunk, asked))
