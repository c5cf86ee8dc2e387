"""The middleware around the real ``anthropic`` SDK, against a local server speaking its wire format."""

from __future__ import annotations

import anthropic
import pytest

from streams.middleware.anthropic_sdk import MeteredMessages
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
