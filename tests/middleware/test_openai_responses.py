"""The Responses API adapters around the real ``openai`` SDK, sync and async, against a local server
speaking its wire format, a real enforcer and a real Kafka topic."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import openai
import pytest

from schemas.usage import TokenUsage
from streams.middleware.meter import AsyncMeter, Refused
from streams.middleware.openai_sdk import AsyncMeteredResponses, MeteredResponses
from streams.stages.normalize import normalize
from tests.middleware.conftest import published
from tests.middleware.fake_providers import RESPONSES_USAGE, FakeOpenAI

INSTRUCTIONS, INPUT = "Be brief.", [{"role": "user", "content": "Say hello."}]
#: The prompt's bound: instructions, input and tools (none) in UTF-8 bytes.
BOUND = len(json.dumps(INSTRUCTIONS).encode()) + len(json.dumps(INPUT).encode())
#: gpt-4o per token: input (its dearest input-side rate) and output.
INPUT_RATE, OUTPUT_RATE = Decimal("2.50") / 10**6, Decimal("10.00") / 10**6


@pytest.fixture
def setup(metering):
    with FakeOpenAI() as provider:
        client = openai.OpenAI(base_url=provider.url, api_key="test", max_retries=0)
        async_client = openai.AsyncOpenAI(base_url=provider.url, api_key="test", max_retries=0)
        async_meter = AsyncMeter(metering["meter"].enforcer, metering["producer"], service="chat-api")
        yield {**metering, "provider": provider,
               "responses": MeteredResponses(client, metering["meter"], tenant="acme", user="u-1"),
               "async_responses": AsyncMeteredResponses(async_client, async_meter, tenant="acme", user="u-1")}


def create(setup, **kwargs):
    return setup["responses"].create(model="gpt-4o", instructions=INSTRUCTIONS, input=INPUT, **kwargs)


def held(setup, event) -> Decimal:
    """What the call's reservation holds until the stream settles it (its id is the event's)."""
    hold = setup["enforcer"].reservations.holds[event.reservation_id]
    assert hold.idempotency_key == event.event_id
    return Decimal(hold.answer["estimate_usd"])


def test_a_response_is_published_with_its_usage_verbatim_and_normalized(setup):
    response = create(setup, max_output_tokens=60)
    assert response.output_text == "Hello there."
    [event] = published(setup, 1)
    assert (event.raw_usage, event.raw_usage_format, event.tags) == (RESPONSES_USAGE, "openai_responses", {})
    assert (event.tenant_id, event.user_id, event.service, event.provider, event.model) == (
        "acme", "u-1", "chat-api", "openai", "gpt-4o")
    # Totals include their cached and reasoning parts: 1,100 input of which 300 cached, 50 output of which 20 reasoning.
    assert normalize(event.raw_usage, event.provider, event.raw_usage_format) == TokenUsage(
        input_tokens=1100, cache_read_tokens=300, output_tokens=50, reasoning_tokens=20)
    assert held(setup, event) == BOUND * INPUT_RATE + 60 * OUTPUT_RATE


def test_without_max_output_tokens_the_enforcers_default_output_is_held(setup):
    create(setup)
    [event] = published(setup, 1)
    default = setup["settings"].reserve_max_output_tokens
    assert default == 8192 and held(setup, event) == BOUND * INPUT_RATE + default * OUTPUT_RATE


def test_a_stream_is_published_with_the_usage_of_its_completed_event(setup):
    events = list(create(setup, max_output_tokens=60, stream=True))
    assert [e.type for e in events] == ["response.created"] + ["response.output_text.delta"] * 4 + ["response.completed"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello there."
    assert setup["provider"].requests == [{"model": "gpt-4o", "instructions": INSTRUCTIONS, "input": INPUT,
                                           "max_output_tokens": 60, "stream": True}]   # sent as given
    [event] = published(setup, 1)
    assert (event.raw_usage, event.raw_usage_format, event.tags, event.usage) == (
        RESPONSES_USAGE, "openai_responses", {}, None)


def test_a_stream_stopped_at_max_output_tokens_is_published_with_its_incomplete_usage(setup):
    setup["provider"].mode = "incomplete"
    events = list(create(setup, max_output_tokens=2, stream=True))
    assert events[-1].type == "response.incomplete"
    [event] = published(setup, 1)
    assert event.raw_usage == {**RESPONSES_USAGE, "output_tokens": 2, "total_tokens": 1102} and event.tags == {}


def test_a_stream_broken_off_before_completed_is_published_estimated_not_dropped(setup):
    setup["provider"].mode = "break"   # drops after two text deltas: no response.completed
    events = list(create(setup, max_output_tokens=60, stream=True))
    assert [e.type for e in events] == ["response.created"] + ["response.output_text.delta"] * 2
    [event] = published(setup, 1)
    assert (event.tags, event.raw_usage, event.raw_usage_format) == ({"usage": "estimated"}, None, None)
    assert (event.usage.input_tokens, event.usage.output_tokens) == (BOUND, 2)   # the prompt's bound, 2 deltas seen


def test_a_stream_the_caller_stops_reading_is_recorded_with_what_it_got(setup):
    stream = create(setup, max_output_tokens=60, stream=True)
    assert [next(stream).type, next(stream).type] == ["response.created", "response.output_text.delta"]
    stream.close()
    [event] = published(setup, 1)
    assert (event.tags, event.usage.input_tokens, event.usage.output_tokens) == ({"usage": "estimated"}, BOUND, 1)


def test_a_provider_error_before_an_answer_releases_the_reservation(setup):
    setup["provider"].mode = "fail"
    with pytest.raises(openai.InternalServerError):
        create(setup, max_output_tokens=60)
    with pytest.raises(openai.InternalServerError):
        create(setup, max_output_tokens=60, stream=True)
    reservations = setup["enforcer"].reservations
    assert (reservations.counters.granted, reservations.counters.released, reservations.holds) == (2, 2, {})
    assert published(setup, 0) == []


def test_a_call_past_the_hard_cap_is_refused_before_it_is_sent(setup):
    with pytest.raises(Refused) as refused:   # a million output tokens at $10/M cannot fit in $1.00
        create(setup, max_output_tokens=1_000_000, stream=True)
    assert refused.value.answer["refused_by"]["limit_id"] == "daily-spend"
    assert Decimal(refused.value.answer["refused_by"]["estimate"]) == BOUND * INPUT_RATE + 1_000_000 * OUTPUT_RATE
    assert setup["provider"].requests == [] and setup["enforcer"].reservations.holds == {}


def test_the_async_client_publishes_whole_streamed_and_broken_off_calls(setup):
    responses = setup["async_responses"]

    async def calls() -> tuple[str, list[str], list[str]]:
        whole = await responses.create(model="gpt-4o", instructions=INSTRUCTIONS, input=INPUT, max_output_tokens=60)
        stream = await responses.create(model="gpt-4o", instructions=INSTRUCTIONS, input=INPUT, stream=True)
        streamed = [event.type async for event in stream]
        setup["provider"].mode = "break"
        stream = await responses.create(model="gpt-4o", instructions=INSTRUCTIONS, input=INPUT, stream=True)
        return whole.output_text, streamed, [event.type async for event in stream]

    text, streamed, broken = asyncio.run(calls())
    assert text == "Hello there." and streamed[-1] == "response.completed" and len(broken) == 3
    events = published(setup, 3)
    assert sorted(e.tags.get("usage", "") for e in events) == ["", "", "estimated"]
    for event in events:
        if event.tags:
            assert (event.raw_usage, event.usage.input_tokens, event.usage.output_tokens) == (None, BOUND, 2)
        else:
            assert (event.raw_usage, event.raw_usage_format) == (RESPONSES_USAGE, "openai_responses")
    assert len({e.reservation_id for e in events} & set(setup["enforcer"].reservations.holds)) == 3


def test_the_async_client_releases_a_failed_call_and_is_refused_before_it_sends(setup):
    responses = setup["async_responses"]
    setup["provider"].mode = "fail"
    with pytest.raises(openai.InternalServerError):
        asyncio.run(responses.create(model="gpt-4o", input=INPUT, max_output_tokens=60))
    with pytest.raises(Refused):
        asyncio.run(responses.create(model="gpt-4o", input=INPUT, max_output_tokens=1_000_000))
    reservations = setup["enforcer"].reservations
    assert (len(setup["provider"].requests), reservations.counters.granted, reservations.counters.released,
            reservations.counters.refused, reservations.holds) == (1, 1, 1, 1, {})
