"""The middleware around the official ``openai`` SDK (``pip install costline[providers]``): chat
completions and the Responses API, sync and async.

    chat = MeteredChat(openai.OpenAI(), meter, tenant="acme", user="u-42")
    response = chat.create(model="gpt-4o", messages=[...], max_completion_tokens=500)
    for chunk in chat.create(model="gpt-4o", messages=[...], stream=True): ...

    responses = MeteredResponses(openai.OpenAI(), meter, tenant="acme", user="u-42")
    response = responses.create(model="gpt-4o", input="...", max_output_tokens=500)
    for event in responses.create(model="gpt-4o", input="...", stream=True): ...

Each call is reserved before it is sent (``Refused`` when a hard cap would be passed), and its
usage published when it ends (see ``streams.middleware.meter``). A chat stream is sent with
``stream_options.include_usage`` so that its last chunk carries the usage; that chunk (no
choices) is passed on only when the caller asked for it itself. A Responses stream carries its
usage on its last event, the whole response (``response.completed``, or ``response.incomplete``
when it stopped at ``max_output_tokens``, or ``response.failed``); one that ends without it is
published with estimated usage, as any begun call without usage is.

The expected input tokens are bounded by the prompt's size in UTF-8 bytes: no tokenizer gives a
token less than one byte of text, so the bound holds for any model. Images and audio, priced by
their own rules, are not in it, nor is the earlier conversation a Responses call names by
``previous_response_id`` or ``conversation`` (the provider holds it, the request does not). A
call without an output bound (``max_completion_tokens``/``max_tokens``, ``max_output_tokens``)
holds the enforcer's default output.
"""

from __future__ import annotations

import json
from typing import Any

import openai

from streams.middleware.meter import Adapter, AsyncMeter, Call


def input_bound(*parts: Any) -> int:
    """An upper bound of the prompt's tokens: the size in UTF-8 bytes of what is sent of it
    (messages, instructions, tool schemas; None for a part not sent)."""
    return sum(len(json.dumps(part, ensure_ascii=False, default=str).encode()) for part in parts if part is not None)


def _ask_for_usage(kwargs: dict[str, Any]) -> bool:
    """Makes a stream end with its usage; returns whether the caller asked for that chunk itself."""
    asked = bool((kwargs.get("stream_options") or {}).get("include_usage"))
    kwargs["stream_options"] = {**(kwargs.get("stream_options") or {}), "include_usage": True}
    return asked


def _record_chat(call: Call, usage: Any) -> None:
    if usage is not None:  # (none: published at the input floor, as an answer without usage is)
        call.record(raw_usage=usage.model_dump(exclude_none=True), raw_usage_format="openai_chat")


def _observe_chat(call: Call, chunk: Any, asked: bool) -> bool:
    """Takes what a stream's chunk says of usage; returns whether the caller gets the chunk."""
    _record_chat(call, chunk.usage)
    if chunk.usage is not None and not chunk.choices and not asked:
        return False  # the usage chunk the caller did not ask for
    for choice in chunk.choices:
        if choice.delta and choice.delta.content:
            call.output_tokens_seen += 1  # (a chunk carries about one token)
    return True


class MeteredChat(Adapter):
    """``openai.OpenAI().chat.completions``, metered: ``MeteredChat(client, meter, tenant=..., user=...)``."""

    client: openai.OpenAI

    def create(self, **kwargs: Any) -> Any:
        admission = self._admission("openai", kwargs["model"], input_bound(kwargs.get("messages"), kwargs.get("tools")),
                                    kwargs.get("max_completion_tokens") or kwargs.get("max_tokens"),
                                    kwargs.get("n") or 1)
        asked = _ask_for_usage(kwargs) if kwargs.get("stream") else False
        return self._send(self.client.chat.completions.create, kwargs, admission,
                          lambda call, response: _record_chat(call, response.usage),
                          lambda call, chunk: _observe_chat(call, chunk, asked))


class AsyncMeteredChat(MeteredChat):
    """``MeteredChat`` for ``openai.AsyncOpenAI``, with an ``AsyncMeter``."""

    client: openai.AsyncOpenAI  # type: ignore[assignment]
    meter: AsyncMeter

    async def create(self, **kwargs: Any) -> Any:
        return await super().create(**kwargs)


#: The events that end a Responses stream, each carrying the whole response with its usage
#: (``response.failed``'s may be null: then the call is published at its input floor).
_LAST_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
#: The events that carry generated text, about a token each, counted for a stream that breaks off.
_TEXT_DELTAS = frozenset({"response.output_text.delta", "response.refusal.delta", "response.reasoning_text.delta",
                          "response.reasoning_summary_text.delta", "response.function_call_arguments.delta"})


def _record_response(call: Call, response: Any) -> None:
    if response.usage is not None:
        call.record(raw_usage=response.usage.model_dump(exclude_none=True), raw_usage_format="openai_responses")


def _observe_response(call: Call, event: Any) -> bool:
    if event.type in _LAST_EVENTS:
        _record_response(call, event.response)
    elif event.type in _TEXT_DELTAS:
        call.output_tokens_seen += 1
    return True


class MeteredResponses(Adapter):
    """``openai.OpenAI().responses``, metered: ``MeteredResponses(client, meter, tenant=..., user=...)``."""

    client: openai.OpenAI

    def create(self, **kwargs: Any) -> Any:
        prompt = [kwargs.get("instructions"), kwargs.get("input"), kwargs.get("tools")]
        admission = self._admission("openai", kwargs["model"], input_bound(*prompt), kwargs.get("max_output_tokens"))
        return self._send(self.client.responses.create, kwargs, admission, _record_response, _observe_response)


class AsyncMeteredResponses(MeteredResponses):
    """``MeteredResponses`` for ``openai.AsyncOpenAI``, with an ``AsyncMeter``."""

    client: openai.AsyncOpenAI  # type: ignore[assignment]
    meter: AsyncMeter

    async def create(self, **kwargs: Any) -> Any:
        return await super().create(**kwargs)
