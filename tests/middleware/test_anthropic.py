"""The middleware around the real ``anthropic`` SDK, against a local server speaking its wire format."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import anthropic
import pytest

from streams.middleware.anthropic_sdk import AsyncMeteredMessages, MeteredMessages
from streams.middleware.meter import AsyncMeter, Refused
from tests.middleware.conftest import published
from tests.middleware.fake_providers import ANTHROPIC_USAGE, FakeAnthropic

MODEL = "claude-sonnet-4-20250514"
MESSAGES = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
def setup(metering):
    with FakeAnthropic() as provider:
        client = anthropic.Anthropic(base_url=provider.url.removesuffix("/v1"), api_key="test", max_retries=0)
        yield {**metering, "messages": MeteredMessages(client, metering["meter"], tenant="acme"), "provider": provider}


def test_a_reply_is_published_with_the_providers_usage_verbatim(setup):
    reply = setup["messages"].create(model=MODEL, max_tokens=100, messages=MESSAGES)
    assert reply.content[0].text == "Hello there."
    [event] = published(setup, 1)
    assert event.raw_usage == {**ANTHROPIC_USAGE, "output_tokens": 40}
    assert (event.raw_usage_format, event.provider, event.model) == ("anthropic_messages", "anthropic", MODEL)
    assert event.reservation_id in setup["enforcer"].reservations.holds


def test_a_streams_cumulative_deltas_are_taken_last_never_summed(setup):
    events = list(setup["messages"].create(model=MODEL, max_tokens=100, messages=MESSAGES, stream=True))
    assert [e.type for e in events].count("message_delta") == 3
    [event] = published(setup, 1)
    # 10, 25 and 40 so far: the call had 40 output tokens (75 if summed), with the start's input side.
    assert event.raw_usage == {**ANTHROPIC_USAGE, "output_tokens": 40}


def test_a_stream_broken_off_keeps_the_usage_reported_so_far(setup):
    setup["provider"].mode = "break"   # drops after the second text delta, before its usage
    list(setup["messages"].create(model=MODEL, max_tokens=100, messages=MESSAGES, stream=True))
    [event] = published(setup, 1)
    assert event.raw_usage == {**ANTHROPIC_USAGE, "output_tokens": 10} and event.tags == {}


def test_a_provider_error_before_a_reply_releases_the_reservation(setup):
    setup["provider"].mode = "fail"
    with pytest.raises(anthropic.InternalServerError):
        setup["messages"].create(model=MODEL, max_tokens=100, messages=MESSAGES)
    reservations = setup["enforcer"].reservations
    assert (reservations.counters.granted, reservations.counters.released, reservations.holds) == (1, 1, {})
    assert published(setup, 0) == []


def test_a_call_past_the_hard_cap_is_refused_before_it_is_sent(setup):
    with pytest.raises(Refused) as refused:   # a million output tokens at $15/M cannot fit in $1.00
        setup["messages"].create(model=MODEL, max_tokens=1_000_000, messages=MESSAGES)
    assert refused.value.answer["refused_by"]["limit_id"] == "daily-spend"
    assert Decimal(refused.value.answer["refused_by"]["estimate"]) > Decimal(1)
    assert setup["provider"].requests == []


@pytest.fixture
def async_messages(setup):
    client = anthropic.AsyncAnthropic(base_url=setup["provider"].url.removesuffix("/v1"), api_key="test",
                                      max_retries=0)
    return AsyncMeteredMessages(client, AsyncMeter(setup["meter"].enforcer, setup["producer"], service="chat-api"),
                                tenant="acme", user="u-2")


def test_the_async_client_publishes_a_reply_and_a_streams_last_cumulative_usage(setup, async_messages):
    async def calls() -> tuple[str, list[str]]:
        reply = await async_messages.create(model=MODEL, max_tokens=100, messages=MESSAGES)
        stream = await async_messages.create(model=MODEL, max_tokens=100, messages=MESSAGES, stream=True)
        return reply.content[0].text, [event.type async for event in stream]

    text, types = asyncio.run(calls())
    assert text == "Hello there." and types.count("message_delta") == 3 and types[-1] == "message_stop"
    events = published(setup, 2)   # the reply's and the stream's
    for event in events:
        assert event.raw_usage == {**ANTHROPIC_USAGE, "output_tokens": 40}   # 40, not 10 + 25 + 40
        assert (event.raw_usage_format, event.tenant_id, event.user_id, event.service) == (
            "anthropic_messages", "acme", "u-2", "chat-api")
        assert setup["enforcer"].reservations.holds[event.reservation_id].idempotency_key == event.event_id
    assert len(events) == 2 and events[0].reservation_id != events[1].reservation_id


def test_the_async_client_keeps_a_broken_streams_usage_so_far_and_releases_a_failed_call(setup, async_messages):
    async def broken() -> list[str]:
        stream = await async_messages.create(model=MODEL, max_tokens=100, messages=MESSAGES, stream=True)
        return [event.type async for event in stream]

    setup["provider"].mode = "break"
    assert asyncio.run(broken()).count("content_block_delta") == 2
    [event] = published(setup, 1)
    assert event.raw_usage == {**ANTHROPIC_USAGE, "output_tokens": 10} and event.tags == {}
    setup["provider"].mode = "fail"
    with pytest.raises(anthropic.InternalServerError):
        asyncio.run(async_messages.create(model=MODEL, max_tokens=100, messages=MESSAGES))
    reservations = setup["enforcer"].reservations
    assert (reservations.counters.granted, reservations.counters.released) == (2, 1)
    assert list(reservations.holds) == [event.reservation_id]


def test_the_async_client_is_refused_before_it_sends(setup, async_messages):
    with pytest.raises(Refused):
        asyncio.run(async_messages.create(model=MODEL, max_tokens=1_000_000, messages=MESSAGES))
    assert setup["provider"].requests == [] and setup["enforcer"].reservations.holds == {}
