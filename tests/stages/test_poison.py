"""Property: no payload makes validation raise; every one is either a valid event or a
rejection with a known reason and a one-line message."""

import json
from typing import get_args

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.dead_letter import Reason, Rejection
from schemas.usage import UsageEvent
from streams.stages.validation import validate
from tests.conftest import NOW

REASONS = set(get_args(Reason))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=30,
)
FIELDS = ["raw_usage", "schema_version", "tags", "status", "latency_ms", "batch", "user_id", "raw_usage_format"]
near_events = st.fixed_dictionaries(
    {"event_id": st.text(max_size=140), "timestamp": st.sampled_from(
        ["2026-06-01T11:00:00Z", "2026-06-01T11:00:00", "9999-12-31T23:59:59Z", "1999-01-01T00:00:00Z", "", "now"]),
     "tenant_id": st.text(max_size=300), "provider": st.text(max_size=70), "model": st.text(max_size=10)},
    optional={name: json_values for name in FIELDS}
    | {"usage": st.dictionaries(st.sampled_from(["input_tokens", "output_tokens", "cache_read_tokens",
                                                 "reasoning_tokens", "cache_write_tokens"]),
                                st.integers(min_value=-10**12, max_value=10**12) | json_values)},
)


def check(payload: bytes) -> None:
    out = validate(payload, now=NOW)
    # An accepted event is the contract's model, or the fast decoder's checked twin of it
    # (``streams.stages.decoding``; tests/stages/test_decoding.py proves both accept the same inputs).
    assert isinstance(out, UsageEvent | msgspec.Struct | Rejection)
    if isinstance(out, Rejection):
        assert out.reason in REASONS and out.message and "\n" not in out.message


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_arbitrary_bytes(payload):
    check(payload)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_arbitrary_json(value):
    check(json.dumps(value).encode())


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(near_events)
def test_almost_valid_events_are_accepted_or_rejected_never_raise(value):
    check(json.dumps(value).encode())


def test_valid_shape_with_hostile_values_prices_or_rejects(attribution):
    @settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(near_events)
    def run(value):
        out = attribution.attribute_raw(json.dumps(value).encode(), now=NOW)
        assert isinstance(out, Rejection) or out.cost_usd >= 0
    run()


def test_deep_nesting_and_huge_payloads():
    assert validate(b"[" * 50_000 + b"]" * 50_000, now=NOW).reason == "invalid_json"
    assert validate(b'{"a":' * 5_000 + b"1" + b"}" * 5_000, now=NOW).reason == "invalid_json"
    assert validate(b"x" * (5 * 1024 * 1024), now=NOW).reason == "payload_too_large"
