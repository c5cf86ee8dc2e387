"""The middleware around the official ``anthropic`` SDK's messages (``pip install costline[providers]``).

    messages = MeteredMessages(anthropic.Anthropic(), meter, tenant="acme", user="u-42")
    reply = messages.create(model="claude-sonnet-4-20250514", max_tokens=500, messages=[...])
    for event in messages.create(model=..., max_tokens=500, messages=[...], stream=True): ...

Reserved before it is sent, published when it ends (``streams.middleware.meter``). A stream's
usage comes in two parts: ``message_start`` carries the input side, and each ``message_delta``
carries the usage *so far* (cumulative, not an increment): the last one is taken, never the sum,
merged over the start's. ``max_tokens`` is required by the API, so the output bound is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic

from streams.middleware.meter import Call, Meter
from streams.middleware.openai_sdk import input_bound


class MeteredMessages:
    def __init__(self, client: anthropic.Anthropic, meter: Meter, *, tenant: str, user: str | None = None,
                 **context: str | None) -> None:
        self.client, self.meter, self.tenant, self.user, self.context = client, meter, tenant, user, context

    def create(self, **kwargs: Any) -> Any:
        prompt = [kwargs.get("system"), kwargs.get("messages"), kwargs.get("tools")]
        admission = dict(tenant=self.tenant, user=self.user, provider="anthropic", model=kwargs["model"],
                         input_tokens=input_bound(prompt), max_tokens=kwargs["max_tokens"], **self.context)
        if not kwargs.get("stream"):
            with self.meter.admit(**admission) as call:
                reply = self.client.messages.create(**kwargs)
                call.record(raw_usage=reply.usage.model_dump(exclude_none=True), raw_usage_format="anthropic_messages")
                return reply
        return self.meter.stream(admission, lambda: self.client.messages.create(**kwargs), _observer())


def _observer() -> Callable[[Call, Any], bool]:
    """What a stream's events say of usage: ``message_start`` the input side, then each
    ``message_delta`` the usage so far (cumulative: its counts replace the ones before, a sum would
    count twice)."""
    usage: dict[str, Any] = {}

    def observe(call: Call, event: Any) -> bool:
        nonlocal usage
        if event.type == "message_start":
            usage = event.message.usage.model_dump(exclude_none=True)
        elif event.type == "message_delta" and event.usage is not None:
            usage = {**usage, **event.usage.model_dump(exclude_none=True)}
            call.record(raw_usage=usage, raw_usage_format="anthropic_messages")
        elif event.type == "content_block_delta":
            call.output_tokens_seen += 1  # (a delta carries about one token)
        return True

    return observe
