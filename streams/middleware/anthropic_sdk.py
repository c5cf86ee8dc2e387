"""The middleware around the official ``anthropic`` SDK's messages (``pip install costline[providers]``).

    messages = MeteredMessages(anthropic.Anthropic(), meter, tenant="acme", user="u-42")
    reply = messages.create(model="claude-sonnet-4-20250514", max_tokens=500, messages=[...])
    for event in messages.create(model=..., max_tokens=500, messages=[...], stream=True): ...

    messages = AsyncMeteredMessages(anthropic.AsyncAnthropic(), AsyncMeter(...), tenant="acme")
    reply = await messages.create(...)
    async for event in await messages.create(..., stream=True): ...

Reserved before it is sent, published when it ends (``streams.middleware.meter``). A stream's
usage comes in two parts: ``message_start`` carries the input side, and each ``message_delta``
carries the usage *so far* (cumulative, not an increment): the last one is taken, never the sum,
merged over the start's. ``max_tokens`` is required by the API, so the output bound is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic

from streams.middleware.meter import Adapter, AsyncMeter, Call
from streams.middleware.openai_sdk import input_bound


def _record(call: Call, usage: dict[str, Any]) -> None:
    call.record(raw_usage=usage, raw_usage_format="anthropic_messages")


class MeteredMessages(Adapter):
    """``anthropic.Anthropic().messages``, metered: ``MeteredMessages(client, meter, tenant=..., user=...)``."""

    client: anthropic.Anthropic

    def create(self, **kwargs: Any) -> Any:
        prompt = [kwargs.get("system"), kwargs.get("messages"), kwargs.get("tools")]
        admission = self._admission("anthropic", kwargs["model"], input_bound(*prompt), kwargs["max_tokens"])
        return self._send(self.client.messages.create, kwargs, admission,
                          lambda call, reply: _record(call, reply.usage.model_dump(exclude_none=True)), _observer())


class AsyncMeteredMessages(MeteredMessages):
    """``MeteredMessages`` for ``anthropic.AsyncAnthropic``, with an ``AsyncMeter``."""

    client: anthropic.AsyncAnthropic  # type: ignore[assignment]
    meter: AsyncMeter

    async def create(self, **kwargs: Any) -> Any:
        return await super().create(**kwargs)


def _observer() -> Callable[[Call, Any], bool]:
    """What a stream's events say of usage: ``message_start`` the input side, then each
    ``message_delta`` the usage so far (cumulative: its counts replace the ones before, a sum would
    count twice). One observer per stream: it keeps that stream's start."""
    usage: dict[str, Any] = {}

    def observe(call: Call, event: Any) -> bool:
        nonlocal usage
        if event.type == "message_start":
            usage = event.message.usage.model_dump(exclude_none=True)
        elif event.type == "message_delta" and event.usage is not None:
            usage = {**usage, **event.usage.model_dump(exclude_none=True)}
            _record(call, usage)
        elif event.type == "content_block_delta":
            call.output_tokens_seen += 1  # (a delta carries about one token)
        return True

    return observe
