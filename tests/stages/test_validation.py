import json
from datetime import timedelta
from decimal import Decimal

import pytest

from schemas.attributed import AttributedUsage
from schemas.dead_letter import Rejection
from streams.stages.attribution import Attribution
from streams.stages.pricing import Pricer
from streams.stages.tagging import PathRules
from streams.stages.validation import validate
from tests.conftest import NOW


def event(**overrides):
    base = {
        "event_id": "e-1",
        "timestamp": "2026-06-01T11:59:00Z",
        "tenant_id": "acme",
        "provider": "OpenAI",
        "model": "gpt-4o",
        "usage": {"input_tokens": 1000, "cache_read_tokens": 200, "output_tokens": 50, "reasoning_tokens": 10},
    }
    base.update(overrides)
    return json.dumps({k: v for k, v in base.items() if v is not None}).encode()


def test_valid_event_is_parsed_and_extra_fields_are_kept():
    out = validate(event(customer_tier="gold", tags={"region": "eu"}), now=NOW)
    assert not isinstance(out, Rejection)
    assert out.provider == "openai"
    assert out.usage.uncached_input_tokens == 800
    assert out.model_extra == {"customer_tier": "gold"}
    assert out.tags == {"region": "eu"}


@pytest.mark.parametrize(
    ("payload", "reason", "fragment"),
    [
        (b"{not json", "invalid_json", "invalid JSON"),
        (b"[1, 2]", "invalid_json", "not an object"),
        (b"\xff\xfe{}", "invalid_utf8", "not UTF-8"),
        (b"null", "invalid_json", "not an object"),
        (event(tenant_id=None), "invalid_event", "tenant_id: Field required"),
        (event(usage={"input_tokens": -5}), "invalid_event", "usage.input_tokens"),
        (event(usage={"input_tokens": "100"}), "invalid_event", "usage.input_tokens: Input should be a valid integer"),
        (event(usage={"input_tokens": 10**12}), "invalid_event", "usage.input_tokens"),
        (event(usage={"input_tokens": 10, "cache_read_tokens": 20}), "invalid_event", "exceed input_tokens"),
        (event(usage={"output_tokens": 10, "reasoning_tokens": 20}), "invalid_event", "exceed output_tokens"),
        (event(usage=None), "invalid_event", "one of usage or raw_usage is required"),
        (event(timestamp="2026-06-01T11:59:00"), "invalid_event", "timestamp"),
        (event(timestamp=1780000000), "invalid_event", "timestamp"),
        (event(latency_ms=4_294_967_296), "invalid_event", "latency_ms: Input should be less than or equal to 4294967295"),
        (event(event_id=""), "invalid_event", "event_id"),
        (event(event_id="x" * 129), "invalid_event", "event_id"),
        (event(schema_version=2), "unsupported_schema_version", "schema_version must be 1"),
        (event(timestamp="2031-01-01T00:00:00Z"), "timestamp_out_of_range", "ahead of"),
        (event(timestamp="2001-01-01T00:00:00Z"), "timestamp_out_of_range", "before 2020-01-01"),
        (b"[" * 100_000 + b"]" * 100_000, "invalid_json", "invalid JSON"),
    ],
)
def test_bad_input_is_rejected_with_its_reason(payload, reason, fragment):
    out = validate(payload, now=NOW)
    assert isinstance(out, Rejection)
    assert out.reason == reason
    assert fragment in out.message


def test_oversized_payload_is_rejected_before_parsing():
    out = validate(b"{" + b" " * 2048 + b"}", now=NOW, max_bytes=1024)
    assert out == Rejection(reason="payload_too_large", message="2050 bytes exceeds the 1024-byte limit")


def test_future_skew_is_configurable():
    assert not isinstance(validate(event(timestamp="2026-06-01T12:30:00Z"), now=NOW), Rejection)
    out = validate(event(timestamp="2026-06-01T12:30:00Z"), now=NOW, max_future=timedelta(minutes=10))
    assert isinstance(out, Rejection) and out.reason == "timestamp_out_of_range"


def test_timestamp_ms_is_exact():
    ev = validate(event(timestamp="2026-06-01T11:59:00.123+02:00"), now=NOW)
    assert ev.timestamp_ms() == 1780307940123


def test_the_longest_latency_the_ledger_stores_is_valid():
    out = validate(event(latency_ms=4_294_967_295), now=NOW)
    assert not isinstance(out, Rejection) and out.latency_ms == 4_294_967_295


def test_a_cost_beyond_the_ledger_is_dead_lettered_with_the_price_that_made_it(tmp_path):
    # 1,000,000,000 input tokens at $1,000 per million is $1,000,000: one unit above Decimal(18, 12).
    prices = tmp_path / "prices.yaml"
    prices.write_text("revision: 1\nmodels:\n  - name: typo\n    provider: openai\n    model: gpt-4o\n"
                      "    effective_from: 2020-01-01\n    per_million_tokens: {input: 1000, output: 1000}\n")
    attribution = Attribution(Pricer.from_file(prices), PathRules([]))
    out = attribution.attribute_raw(event(usage={"input_tokens": 1_000_000_000}), now=NOW)
    assert isinstance(out, Rejection) and out.reason == "cost_out_of_range"
    assert out.message == ("cost 1000000.000000000000 USD of openai/gpt-4o is beyond the ledger's 999999.999999999999 "
                           "USD a call; check the token counts, or the price in config/prices.yaml "
                           "(prices.yaml models[0] (typo)), then re-submit the dead letter")
    below = attribution.attribute_raw(event(usage={"input_tokens": 999_999_999}), now=NOW)
    assert isinstance(below, AttributedUsage) and below.cost_usd == Decimal("999999.999")


def test_a_rejection_names_a_field_on_one_line_even_when_its_key_holds_a_newline():
    out = validate(json.dumps({"event_id": "e", "timestamp": "2026-06-01T11:00:00Z", "tenant_id": "t",
                               "provider": "openai", "model": "gpt-4o", "tags": {"a\nb": None}}).encode(), now=NOW)
    assert out.reason == "invalid_event" and out.message == 'tags."a\\nb": Input should be a valid string'
