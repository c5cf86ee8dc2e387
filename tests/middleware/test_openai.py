"""The middleware around the real ``openai`` SDK, against a local server speaking its wire format,
a real enforcer (in-process, its HTTP server on loopback) and a real Kafka topic."""

from __future__ import annotations

from decimal import Decimal

import openai
import pytest

from streams.middleware.meter import Refused
from streams.middleware.openai_sdk import MeteredChat
from tests.integration.conftest import read_topic
from tests.middleware.conftest import published
from tests.middleware.fake_providers import USAGE, FakeOpenAI

MESSAGES = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
def setup(metering):
    with FakeOpenAI() as provider:
        client = openai.OpenAI(base_url=provider.url, api_key="test", max_retries=0)
        yield {**metering, "chat": MeteredChat(client, metering["meter"], tenant="acme", user="u-1"), "provider": provider}


def test_a_call_is_reserved_then_published_with_the_providers_usage_verbatim(setup):
    response = setup["chat"].create(model="gpt-4o", messages=MESSAGES, max_completion_tokens=50)
    assert response.choices[0].message.content == "Hello there."
    [event] = published(setup, 1)
    reservation = event.reservation_id
    assert reservation and event.raw_usage == USAGE and event.raw_usage_format == "openai_chat"
    assert (event.tenant_id, event.user_id, event.service, event.provider, event.model) == (
        "acme", "u-1", "chat-api", "openai", "gpt-4o")
    hold = setup["enforcer"].reservations.holds[reservation]   # held until the stream counts the call
    assert hold.idempotency_key == event.event_id


def test_a_stream_carries_usage_that_the_caller_sees_only_when_it_asked(setup):
    chunks = list(setup["chat"].create(model="gpt-4o", messages=MESSAGES, max_completion_tokens=50, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello there."
    assert all(c.usage is None for c in chunks)                  # the usage chunk was not the caller's
    assert setup["provider"].requests[-1]["stream_options"] == {"include_usage": True}
    asked = list(setup["chat"].create(model="gpt-4o", messages=MESSAGES, stream=True,
                                      stream_options={"include_usage": True}))
    assert asked[-1].usage is not None and asked[-1].choices == []
    events = published(setup, 2)
    assert [e.raw_usage for e in events] == [USAGE, USAGE] and len({e.reservation_id for e in events}) == 2


def test_a_stream_broken_off_is_recorded_at_the_input_floor_not_dropped(setup):
    setup["provider"].mode = "break"   # the connection drops after two chunks: no usage, no [DONE]
    chunks = list(setup["chat"].create(model="gpt-4o", messages=MESSAGES, max_completion_tokens=50, stream=True))
    assert len(chunks) == 2
    [event] = published(setup, 1)
    assert event.tags == {"usage": "estimated"} and event.raw_usage is None
    # The prompt bound (its UTF-8 bytes) and the two chunks of output it got.
    assert (event.usage.input_tokens, event.usage.output_tokens) == (len(b'[{"role": "user", "content": "Say hello."}]'),
                                                                     len(chunks))


def test_a_provider_error_before_an_answer_releases_the_reservation(setup):
    setup["provider"].mode = "fail"
    with pytest.raises(openai.InternalServerError):
        setup["chat"].create(model="gpt-4o", messages=MESSAGES, max_completion_tokens=50)
    counters = setup["enforcer"].reservations.counters
    assert (counters.granted, counters.released, len(setup["enforcer"].reservations.holds)) == (1, 1, 0)
    setup["producer"].flush()
    assert read_topic(setup["servers"], setup["settings"].topics.raw, 0, 1) == []   # nothing spent, nothing sent


def test_a_call_past_the_hard_cap_is_refused_before_it_is_sent(setup):
    with pytest.raises(Refused) as refused:   # a million-token answer at $10/M cannot fit in $1.00
        setup["chat"].create(model="gpt-4o", messages=MESSAGES, max_completion_tokens=1_000_000)
    assert refused.value.answer["refused_by"]["limit_id"] == "daily-spend"
    assert Decimal(refused.value.answer["refused_by"]["estimate"]) > Decimal(1)
    assert setup["provider"].requests == []


def test_a_stream_the_caller_stops_reading_is_recorded_with_what_it_got(setup):
    stream = setup["chat"].create(model="gpt-4o", messages=MESSAGES, max_completion_tokens=50, stream=True)
    first = next(stream)
    assert first.choices[0].delta.content == "Hel"
    stream.close()   # the caller gives up after one chunk
    [event] = published(setup, 1)
    assert (event.tags, event.usage.output_tokens) == ({"usage": "estimated"}, 1)


def test_the_async_client_is_metered_alike_and_a_cancelled_stream_is_recorded(setup):
    import asyncio

    from streams.middleware.meter import AsyncMeter
    from streams.middleware.openai_sdk import AsyncMeteredChat

    meter = AsyncMeter(setup["meter"].enforcer, setup["producer"], service="chat-api")
    chat = AsyncMeteredChat(openai.AsyncOpenAI(base_url=setup["provider"].url, api_key="test", max_retries=0), meter,
                            tenant="acme")

    async def calls() -> str:
        response = await chat.create(model="gpt-4o", messages=MESSAGES, max_completion_tokens=50)
        stream = await chat.create(model="gpt-4o", messages=MESSAGES, max_completion_tokens=50, stream=True)
        async for _ in stream:
            break   # the caller stops after one chunk
        await stream.aclose()
        return response.choices[0].message.content

    assert asyncio.run(calls()) == "Hello there."
    first, second = published(setup, 2)
    assert (first.raw_usage, first.service) == (USAGE, "chat-api")
    assert (second.tags, second.usage.output_tokens) == ({"usage": "estimated"}, 1)


def test_the_tools_sent_with_a_call_count_in_its_input_bound(setup):
    """A tool's schema is prompt too: 40,000 bytes of it hold 40,000 input tokens more ($0.10 at gpt-4o's $2.50/M)."""
    tools = [{"type": "function", "function": {"name": "lookup", "description": "x" * 40_000,
                                               "parameters": {"type": "object", "properties": {}}}}]
    setup["chat"].create(model="gpt-4o", messages=MESSAGES, max_completion_tokens=1, tools=tools)
    setup["chat"].create(model="gpt-4o", messages=MESSAGES, max_completion_tokens=1)
    with_tools, without = (setup["enforcer"].reservations.holds[event.reservation_id] for event in published(setup, 2))
    cost = next(window for window in with_tools.amounts if "daily-spend" in window[0])
    assert with_tools.amounts[cost] - without.amounts[cost] >= Decimal("0.10")
