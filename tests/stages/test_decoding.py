"""The fast decoder (streams.stages.decoding) against pydantic, the contract's definition: it
accepts only what pydantic accepts, with equal values, and every input it leaves to pydantic is
rejected (or accepted) there with the same reason as before."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from schemas.attributed import AttributedUsage
from schemas.dead_letter import Rejection
from schemas.usage import TokenUsage, UsageEvent
from streams.operations.simulate import Workload
from streams.stages import decoding, validation
from streams.stages.decoding import Undecided, decoder_for, twin_as_model, twin_fields
from streams.storage.compiled import fast

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
FAST = decoder_for(UsageEvent)


def reference_validate(raw: bytes) -> Any:
    """``validate`` without the fast decoder: the record-by-record path."""
    return validation.validate(raw, now=NOW, fast=False)


def fields_of(event: Any) -> dict[str, Any]:
    values = twin_fields(event, UsageEvent)
    if values["usage"] is not None:
        values["usage"] = twin_fields(values["usage"], TokenUsage)
    return values


# -- what events are made of: valid values, edge values, wrong types --------------------------------

_wrong = st.sampled_from([None, True, 1, -1, 1.5, "", [], {}, "x" * 300])
_text = st.one_of(
    st.text(min_size=0, max_size=5),
    st.sampled_from(["acme", " acme", "acme ", "\tacme", "ACME", "OpenAI", "openai", "İ", "\x1facme", "acme\x85",
                     "\u00a0x", "x" * 64, "x" * 65, "x" * 128, "x" * 129, "x" * 256, "x" * 257, "é" * 256]),
)
_count = st.one_of(st.integers(-2, 2_000), st.sampled_from([0, 10**9, 10**9 + 1, 2**63, -(2**63) - 1]),
                   st.sampled_from([1.0, 0.5, True, False, "3", None]))
_time = st.one_of(
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                 timezones=st.sampled_from([UTC, None] + [__import__("datetime").timezone(timedelta(minutes=m))
                                                          for m in (-720, -90, 0, 60, 330, 840, 1439)]))
    .map(lambda at: at.isoformat()),
    st.sampled_from(["2026-06-01T11:00:00Z", "2026-06-01T11:00:00.1234567Z", "2026-06-01 11:00:00Z",
                     "2026-06-01t11:00:00z", "2026-06-01T11:00Z", "2026-06-01T11:00:00,5Z", "2026-06-01T11:00:00+0100",
                     "2026-06-01T11:00:00-00:00", "2026-06-01T24:00:00Z", "2026-06-01T23:59:60Z", "2026-06-01",
                     "2026-06-01T11:00:00", "2026-02-30T11:00:00Z", "0001-01-01T00:00:00+01:00",
                     "9999-12-31T23:59:59-01:00", "2026-06-01T11:00:00.000000+23:59", "1717239600"]),
    st.integers(0, 2_000_000_000),
)
_usage = st.one_of(
    st.fixed_dictionaries({}, optional={name: _count for name in TokenUsage.model_fields}),
    st.fixed_dictionaries({"input_tokens": st.integers(0, 1000), "output_tokens": st.integers(0, 1000)},
                          optional={"cache_read_tokens": st.integers(0, 1000), "reasoning_tokens": st.integers(0, 1000),
                                    "cache_write_tokens": st.integers(0, 1000), "surprise": st.integers()}),
    _wrong,
)
_optional_fields = {
    "schema_version": st.sampled_from([1, 2, True, "1", 1.0]),
    "user_id": st.one_of(_text, _wrong),
    "usage": _usage,
    "raw_usage": st.one_of(st.dictionaries(st.text(max_size=3), st.one_of(st.integers(), st.floats(allow_nan=False),
                                                                            st.text(max_size=3), st.none()), max_size=3),
                           _wrong),
    "raw_usage_format": st.sampled_from(["openai_chat", "gemini", "OPENAI_CHAT", "nope", None, 1]),
    "batch": st.sampled_from([True, False, 0, 1, "true", None]),
    "service": st.one_of(_text, _wrong), "route": _text, "feature": _text, "step": _text, "trace_id": _text,
    "span_id": _text, "parent_span_id": _text,
    "tags": st.one_of(st.dictionaries(st.text(max_size=3), st.one_of(st.text(max_size=3), st.integers()), max_size=66),
                      _wrong),
    "status": st.sampled_from(["ok", "error", "OK", "", None, 1]),
    "latency_ms": st.one_of(st.sampled_from([0, 4_294_967_295, 4_294_967_296, -1, 1.0, None, "5"]),
                            st.integers(0, 10**6)),
    "reservation_id": st.one_of(_text, _wrong),
    "customer_tier": st.text(max_size=3),  # an extra field: the contract keeps it
}
_event = st.fixed_dictionaries(
    {"event_id": st.one_of(_text, _wrong), "timestamp": _time, "tenant_id": st.one_of(_text, _wrong),
     "provider": st.one_of(_text, _wrong), "model": st.one_of(_text, _wrong)},
    optional=_optional_fields,
)
_name = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=12)
_valid_usage = st.integers(0, 5_000).flatmap(lambda inp: st.fixed_dictionaries(
    {"input_tokens": st.just(inp), "output_tokens": st.integers(0, 5_000)},
    optional={"cache_read_tokens": st.integers(0, inp // 2), "cache_write_tokens": st.integers(0, inp // 2),
              "reasoning_tokens": st.just(0), "input_audio_tokens": st.just(0)}))
_valid_time = st.builds(
    lambda at, digits, offset: (at.replace(microsecond=at.microsecond if digits else 0)
                                .isoformat(timespec="microseconds" if digits else "seconds")
                                .replace("+00:00", offset) if offset == "Z" else
                                at.replace(tzinfo=__import__("datetime").timezone(timedelta(minutes=offset)))
                                .isoformat(timespec="microseconds" if digits else "seconds")),
    st.datetimes(min_value=datetime(2025, 1, 1), max_value=datetime(2026, 6, 2), timezones=st.just(UTC)),
    st.booleans(), st.one_of(st.just("Z"), st.integers(-900, 900)))
_valid = {"event_id": _name, "timestamp": _valid_time, "tenant_id": _name, "provider": st.sampled_from(
    ["openai", "anthropic", "google"]), "model": _name, "usage": _valid_usage, "user_id": _name, "service": _name,
    "tags": st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=3),
    "latency_ms": st.integers(0, 10**6), "status": st.sampled_from(["ok", "error"]), "batch": st.booleans(),
    "reservation_id": _name, "trace_id": _name}


@st.composite
def _mostly_valid(draw: st.DrawFn) -> dict[str, Any]:
    """A valid event, then now and then one field changed to something from ``_event``'s wilder values
    (or dropped): most examples are accepted, and the rest sit right next to acceptance."""
    event = {name: draw(value) for name, value in _valid.items()
             if name in ("event_id", "timestamp", "tenant_id", "provider", "model", "usage") or draw(st.booleans())}
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(sorted(_optional_fields) + ["event_id", "timestamp", "tenant_id", "provider",
                                                               "model"]))
        wild = _optional_fields[name] if name in _optional_fields else _time if name == "timestamp" \
            else st.one_of(_text, _wrong)
        event[name] = draw(wild)
    return event


def _encoded(draw: st.DrawFn) -> bytes:
    event = draw(st.one_of(_event, _mostly_valid(), _mostly_valid()))
    if draw(st.integers(0, 9)) == 0 and event:  # a required field missing
        event.pop(draw(st.sampled_from(sorted(event))), None)
    raw = json.dumps(event, ensure_ascii=draw(st.booleans())).encode()
    cut = draw(st.integers(0, 40))
    return raw[:-cut] if cut > 35 else raw  # now and then, truncated JSON


_encoded_events = st.composite(_encoded)()
payloads = st.one_of(_encoded_events, _encoded_events, _encoded_events, _encoded_events, st.binary(max_size=40),
                     st.sampled_from([b"[]", b"null", b"1", b'"x"', b"{}", b'{"a":1,"a":2}', b"\xff\xfe", b""]))


@settings(max_examples=3_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads)
def test_the_fast_decoder_accepts_only_what_pydantic_accepts_with_equal_values(raw):
    try:
        fast = FAST.decode(raw)
    except Undecided:
        fast = None
    try:
        reference = UsageEvent.model_validate_json(raw)
    except ValidationError:
        reference = None
    if fast is not None:
        assert reference is not None, raw
        assert fields_of(fast) == fields_of(reference)
        assert reference.model_extra == {} and fast.model_extra == {}
        assert fast.timestamp.tzinfo is UTC and fast.timestamp_ms() == reference.timestamp_ms()


@settings(max_examples=3_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads)
def test_validation_decides_every_input_as_the_record_by_record_path_does(raw):
    """The same events accepted, with the same values; the same rejections, reason and message."""
    new, old = validation.validate(raw, now=NOW), reference_validate(raw)
    if isinstance(old, Rejection):
        assert new == old
    else:
        assert not isinstance(new, Rejection), new
        assert fields_of(new) == fields_of(old) and (new.model_extra or {}) == (old.model_extra or {})


@settings(max_examples=3_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads)
def test_the_compiled_finishing_steps_decide_as_the_python_steps(raw):
    """``Finisher`` (streams/stages/_fast.pyx) against ``Decoder.finish_in_python``, on what msgspec
    decodes: both leave the same inputs to pydantic, and finish the rest to equal values."""
    try:
        compiled, python = FAST._decode(raw), FAST._decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return
    outcomes = []
    for finish, decoded in ((FAST.finish, compiled), (FAST.finish_in_python, python)):
        try:
            outcomes.append(fields_of(finish(decoded)))
        except Undecided:
            outcomes.append(Undecided)
    assert outcomes[0] == outcomes[1], raw
    if outcomes[0] is not Undecided:
        assert compiled.timestamp.tzinfo is python.timestamp.tzinfo


_digit = st.sampled_from("0123456789")
_times_near_the_form = st.one_of(
    _time.filter(lambda value: isinstance(value, str)),
    # The form's every part, each now and then replaced: other digits (Unicode's too, which the
    # pattern's \d takes), separators, fraction lengths 0 to 8, offsets near zero.
    st.tuples(st.text(_digit, min_size=4, max_size=4), st.sampled_from("--/"), st.sampled_from(["01", "12", "13", "00", "02"]),
              st.sampled_from("--"), st.sampled_from(["01", "28", "29", "30", "31", "32", "00"]), st.sampled_from("TTt "),
              st.sampled_from(["00", "23", "24", "99", "\u0661\u0662"]), st.sampled_from("::."),
              st.text(_digit, min_size=2, max_size=2), st.just(":"), st.sampled_from(["00", "59", "60"]),
              st.one_of(st.just(""), st.just("."), st.text(_digit, min_size=1, max_size=8).map(lambda f: "." + f)),
              st.sampled_from(["Z", "z", "+00:00", "-00:00", "+00:01", "+01:00", "-23:59", "+0000", "Z ", "", "+00:00Z"]))
    .map("".join),
)


@settings(max_examples=5_000, deadline=None)
@given(_times_near_the_form)
def test_a_time_parsed_in_c_is_the_one_fromisoformat_reads(text):
    """``parse_utc`` takes only texts the contract's pattern takes, reads each as ``fromisoformat``
    does (the same instant, ``timezone.utc``), refuses what it refuses, and leaves the rest (None)."""
    try:
        parsed = fast.parse_utc(text)
    except ValueError:
        assert decoding._RFC3339(text) is not None
        with pytest.raises(ValueError):
            datetime.fromisoformat(text)
        return
    if parsed is not None:
        assert decoding._RFC3339(text) is not None, text
        reference = datetime.fromisoformat(text)
        assert (parsed, parsed.tzinfo) == (reference, reference.tzinfo) and parsed.tzinfo is UTC, text


def test_simulated_events_all_take_the_fast_path():
    """The property tests mean something only if the common event is the fast decoder's."""
    start = datetime.now(UTC) - timedelta(minutes=5)
    events = list(Workload(2_000, tenants=50, seed=3, start=start).generate())
    for event in events:
        raw = event.model_dump_json(exclude_none=True).encode()
        fast = FAST.decode(raw)
        assert fields_of(fast) == fields_of(event)


def test_a_twin_is_written_out_as_its_model_would_be():
    raw = json.dumps({"event_id": "e", "timestamp": "2026-06-01T11:00:00+02:00", "tenant_id": "t",
                      "provider": "openai", "model": "m", "usage": {"input_tokens": 5, "cache_read_tokens": 2}}).encode()
    fast, reference = FAST.decode(raw), UsageEvent.model_validate_json(raw)
    assert type(fast.usage).__name__ == "CheckedTokenUsage" and fast.usage.uncached_input_tokens == 3
    assert twin_as_model(fast, UsageEvent).model_dump_json() == reference.model_dump_json()
    assert twin_as_model(reference, UsageEvent) is reference


def test_a_record_attributed_from_a_twin_equals_the_one_from_the_model(tmp_path):
    """Byte for byte, as published on usage.attributed and as the ledger's row."""
    from pathlib import Path

    from streams.stages.attribution import Attribution
    from streams.storage.tables import LEDGER

    attribution = Attribution.from_config_dir(Path(__file__).resolve().parents[2] / "config")
    start = datetime.now(UTC) - timedelta(minutes=5)
    for event in Workload(200, tenants=5, seed=5, start=start).generate():
        raw = event.model_dump_json(exclude_none=True).encode()
        fast, reference = attribution.attribute(FAST.decode(raw), NOW), attribution.attribute(event, NOW)
        assert type(fast.usage) is not TokenUsage
        assert fast.model_dump_json() == reference.model_dump_json()
        # In the model's field order, as a record validated from its values is written (pydantic
        # writes the order of the instance's ``__dict__``): usage.attributed's bytes unchanged.
        assert fast.model_dump_json() == AttributedUsage.model_validate(fast.model_dump()).model_dump_json()
        assert LEDGER.row(fast) == LEDGER.row(reference)


@pytest.mark.parametrize("offset", ["+00:60", "+05:75", "-00:99", "+24:00"])
def test_an_offset_pydantic_refuses_is_refused(offset):
    raw = json.dumps({"event_id": "e", "timestamp": f"2026-06-01T11:00:00{offset}", "tenant_id": "t",
                      "provider": "openai", "model": "m", "usage": {"input_tokens": 1}}).encode()
    with pytest.raises(Undecided):
        FAST.decode(raw)
    assert validation.validate(raw, now=NOW) == reference_validate(raw)
    assert validation.validate(raw, now=NOW).reason == "invalid_event"


@pytest.mark.parametrize("depth", [3, 33, 150, 600, 5_000])
def test_deeply_nested_raw_usage_is_decided_as_pydantic_decides(depth):
    """msgspec reads JSON about 990 levels deep and then raises RecursionError; pydantic refuses
    200 levels. Past 32 levels the fast path leaves the event to pydantic."""
    nested = "[" * depth + "]" * depth
    raw = ('{"event_id": "e", "timestamp": "2026-06-01T11:00:00Z", "tenant_id": "t", "provider": "openai", '
           '"model": "m", "raw_usage": {"prompt_tokens": 1, "completion_tokens": 1, "x": ' + nested + "}}").encode()
    if depth > 31:
        with pytest.raises(Undecided):
            FAST.decode(raw)
    new, old = validation.validate(raw, now=NOW), reference_validate(raw)
    if isinstance(old, Rejection):
        assert new == old and old.reason == "invalid_json" and depth >= 150
    else:
        assert fields_of(new) == fields_of(old) and depth <= 150


def test_an_event_with_an_extra_field_is_pydantics_and_keeps_it():
    raw = json.dumps({"event_id": "e", "timestamp": "2026-06-01T11:00:00Z", "tenant_id": "t", "provider": "openai",
                      "model": "m", "usage": {"input_tokens": 1}, "customer_tier": "gold"}).encode()
    with pytest.raises(Undecided):
        FAST.decode(raw)
    assert validation.validate(raw, now=NOW).model_extra == {"customer_tier": "gold"}


def test_a_constraint_the_translation_does_not_know_fails_at_build_time():
    class Patterned(BaseModel):
        model_config = ConfigDict(strict=True)
        code: Annotated[str, StringConstraints(pattern=r"^[a-z]+$")]

    with pytest.raises(TypeError, match="not translated"):
        decoder_for(Patterned)

    class Lax(BaseModel):
        count: int

    with pytest.raises(TypeError, match="only strict models"):
        decoder_for(Lax)
