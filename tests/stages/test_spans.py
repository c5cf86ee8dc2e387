"""The OTLP input's mapping (``streams.stages.spans``): spans from the real OpenTelemetry SDK and the
real OpenAI and Anthropic instrumentations, written as the Collector's Kafka exporter writes them,
give the usage events the same calls' producers would have sent. No broker: that path is
``tests/integration/test_otlp.py``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import anthropic
import openai
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, TracesData
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan

from schemas.usage import TokenUsage, UsageEvent
from streams.config import ConfigError
from streams.stages.spans import SpanMapping, SpanOutcome, read_message
from tests.middleware.fake_providers import ANTHROPIC_USAGE, USAGE, FakeAnthropic, FakeOpenAI
from tests.otlp import ENCODINGS, LAYOUTS, Spans, messages

#: A call's start and end (2026-05-28T20:26:40Z, 1.5 s later).
START = 1_780_000_000_000_000_000
END = START + 1_500_000_000
RESOURCE = {"service.name": "support-bot", "tenant.id": "acme"}
MAPPING = SpanMapping()


def chat(provider: str, model: str, **usage: int) -> dict[str, object]:
    """A chat span's GenAI attributes, as the current conventions name them."""
    return {"gen_ai.operation.name": "chat", "gen_ai.provider.name": provider, "gen_ai.request.model": model,
            **{f"gen_ai.usage.{name}": count for name, count in usage.items()}}


def usage_of(outcome: SpanOutcome) -> list[UsageEvent]:
    """The events a message gave, as the stream reads what the input publishes; each one's record
    keyed by its tenant and stamped with its time."""
    events = [UsageEvent.model_validate_json(m.value) for m in outcome.events]
    assert [(m.key, m.timestamp_ms) for m in outcome.events] == [(e.kafka_key(), e.timestamp_ms()) for e in events]
    return events


def only_event(spans: Spans, mapping: SpanMapping = MAPPING) -> UsageEvent:
    """The one event of the spans recorded, the same in each encoding and layout."""
    found = set()
    for encoding in ENCODINGS:
        for layout in LAYOUTS:
            events = [e for m in messages(spans.finished(), encoding, layout) for e in usage_of(mapping.outcome(m))]
            assert len(events) == 1, (encoding, layout)
            found.add(events[0].model_dump_json())
    assert len(found) == 1
    return UsageEvent.model_validate_json(found.pop())


def the_call(spans: Spans, **fields: object) -> UsageEvent:
    """The usage event a producer would send for the one model call recorded, given its own fields."""
    (span,) = (s for s in spans.finished() if "gen_ai.operation.name" in s.attributes)
    trace, span_id = f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"
    parent = f"{span.parent.span_id:016x}" if span.parent else None
    return UsageEvent.model_validate({
        "event_id": f"otel-{trace}-{span_id}", "timestamp": datetime(2026, 5, 28, 20, 26, 41, 500_000, tzinfo=UTC),
        "tenant_id": "acme", "service": "support-bot", "trace_id": trace, "span_id": span_id,
        "parent_span_id": parent, "latency_ms": 1500, **fields})


# ---- spans of the common instrumentations, and the events of the same calls ----------------------

def test_an_openai_chat_with_cached_and_reasoning_tokens_gives_the_callers_event():
    # (as the GenAI instrumentation utilities' handler records a chat call in its releases that report
    # cached and reasoning counts; openai-v2's chat spans carry the totals only, tested below)
    spans = Spans(RESOURCE)
    with spans.parent("POST /answer"):
        spans.call("opentelemetry.util.genai.handler", "chat gpt-4o", {
            **chat("openai", "gpt-4o", input_tokens=1200, output_tokens=340),
            "gen_ai.response.model": "gpt-4o-2024-08-06", "gen_ai.usage.cache_read.input_tokens": 200,
            "gen_ai.usage.reasoning.output_tokens": 300, "costline.feature": "answer",
            "enduser.id": "user-7"}, start_ns=START, end_ns=END)
    event = only_event(spans)
    assert event == the_call(spans, provider="openai", model="gpt-4o-2024-08-06", user_id="user-7", feature="answer",
                             step="chat gpt-4o", usage=TokenUsage(input_tokens=1200, cache_read_tokens=200,
                                                                  output_tokens=340, reasoning_tokens=300))
    assert event.parent_span_id is not None  # a child of the request's span: per-trace attribution works


def test_an_anthropic_call_with_cache_writes_counts_them_inside_the_input(attribution):
    spans = Spans(RESOURCE)
    spans.call("opentelemetry.instrumentation.anthropic", "anthropic.chat", {
        **chat("anthropic", "claude-sonnet-4-5", input_tokens=1700, output_tokens=40),
        "gen_ai.response.model": "claude-sonnet-4-5", "gen_ai.usage.cache_read.input_tokens": 300,
        "gen_ai.usage.cache_creation.input_tokens": 500, "gen_ai.usage.total_tokens": 1740},
        start_ns=START, end_ns=END)
    event = only_event(spans)
    expected = the_call(spans, provider="anthropic", model="claude-sonnet-4-5", step="anthropic.chat",
                        usage=TokenUsage(input_tokens=1700, cache_read_tokens=300, cache_write_tokens=500,
                                         output_tokens=40))
    assert event == expected
    # 900 uncached at $3, 300 read at $0.30, 500 written at $3.75, 40 out at $15 (per million)
    assert attribution.attribute(event).cost_usd == Decimal("0.005265000000")


def test_a_copy_of_anthropics_raw_input_count_is_completed_with_the_cache_counts():
    spans = Spans(RESOURCE)
    # Raw Anthropic counts: input_tokens (400) leaves out the 300 read and 500 written.
    spans.call("llm-lib", "anthropic.chat", {
        **chat("anthropic", "claude-sonnet-4-5", input_tokens=400, output_tokens=40),
        "gen_ai.usage.cache_read_input_tokens": 300, "gen_ai.usage.cache_creation_input_tokens": 500},
        start_ns=START, end_ns=END)
    assert only_event(spans).usage == TokenUsage(input_tokens=1200, cache_read_tokens=300, cache_write_tokens=500,
                                                 output_tokens=40)


def test_a_scope_listed_as_leaving_the_cache_out_has_it_added_even_when_the_counts_cannot_tell():
    spans = Spans(RESOURCE)
    spans.call("raw-anthropic-lib", "anthropic.chat", {
        **chat("anthropic", "claude-sonnet-4-5", input_tokens=900, output_tokens=40),
        "gen_ai.usage.cache_read.input_tokens": 300}, start_ns=START, end_ns=END)
    assert only_event(spans).usage.input_tokens == 900  # within the convention: taken as including the cache
    listed = SpanMapping(input_excludes_cache=["raw-anthropic-lib"])
    assert only_event(spans, listed).usage == TokenUsage(input_tokens=1200, cache_read_tokens=300, output_tokens=40)


def test_a_gemini_call_counts_its_thoughts_once_inside_the_output():
    spans = Spans({**RESOURCE, "tenant.id": "globex"})
    # google-genai's instrumentation: provider "gemini" (the deprecated spelling), output including thoughts
    spans.call("opentelemetry.instrumentation.google_genai", "generate_content gemini-2.5-flash", {
        "gen_ai.operation.name": "generate_content", "gen_ai.provider.name": "gemini",
        "gen_ai.request.model": "gemini-2.5-flash", "gen_ai.response.model": "gemini-2.5-flash",
        "gen_ai.usage.input_tokens": 1000, "gen_ai.usage.output_tokens": 300,
        "gen_ai.usage.cache_read.input_tokens": 200, "gen_ai.usage.reasoning.output_tokens": 100},
        start_ns=START, end_ns=END)
    assert only_event(spans) == the_call(
        spans, tenant_id="globex", provider="google", model="gemini-2.5-flash",
        step="generate_content gemini-2.5-flash",
        usage=TokenUsage(input_tokens=1000, cache_read_tokens=200, output_tokens=300, reasoning_tokens=100))


def test_deprecated_names_are_read_and_providers_spelled_as_the_catalog_spells_them():
    spans = Spans(RESOURCE)
    spans.call("old-lib", "bedrock.converse", {
        "gen_ai.operation.name": "chat", "gen_ai.system": "aws.bedrock",
        "gen_ai.request.model": "anthropic.claude-3-5-haiku-20241022-v1:0",
        "gen_ai.usage.prompt_tokens": 120, "gen_ai.usage.completion_tokens": 8}, start_ns=START, end_ns=END)
    event = only_event(spans)
    assert (event.provider, event.model, event.usage) == (
        "aws", "anthropic.claude-3-5-haiku-20241022-v1:0", TokenUsage(input_tokens=120, output_tokens=8))


@pytest.fixture(scope="module")
def instrumented() -> Iterator[Spans]:
    """The real OpenAI (openai-v2) and Anthropic (OpenLLMetry) instrumentations, recording into one
    provider; removed afterwards (they patch the SDKs' classes)."""
    from opentelemetry.instrumentation.anthropic import AnthropicInstrumentor
    from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor

    spans = Spans(RESOURCE)
    OpenAIInstrumentor().instrument(tracer_provider=spans.provider)
    AnthropicInstrumentor().instrument(tracer_provider=spans.provider)
    yield spans
    OpenAIInstrumentor().uninstrument()
    AnthropicInstrumentor().uninstrument()


def test_the_real_openai_and_anthropic_instrumentations_give_the_events_of_their_calls(instrumented, attribution):
    with FakeOpenAI() as fake_openai, FakeAnthropic() as fake_anthropic:
        openai.OpenAI(base_url=fake_openai.url, api_key="test").chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        anthropic.Anthropic(base_url=fake_anthropic.url.removesuffix("/v1"), api_key="test").messages.create(
            model="claude-sonnet-4-5", max_tokens=100, messages=[{"role": "user", "content": "hi"}])
    finished = instrumented.finished()
    assert [s.name for s in finished] == ["chat gpt-4o", "anthropic.chat"]
    for encoding in ENCODINGS:
        for layout in LAYOUTS:
            events = [e for m in messages(finished, encoding, layout) for e in usage_of(MAPPING.outcome(m))]
            # openai-v2 reports prompt and completion totals only (its spans carry no cached count);
            # OpenLLMetry's Anthropic spans sum the input with its cache reads and writes.
            assert [(e.provider, e.model, e.usage, e.step) for e in events] == [
                ("openai", "gpt-4o", TokenUsage(input_tokens=USAGE["prompt_tokens"],
                                                output_tokens=USAGE["completion_tokens"]), "chat gpt-4o"),
                ("anthropic", "claude-sonnet-4-5",
                 TokenUsage(input_tokens=ANTHROPIC_USAGE["input_tokens"] + ANTHROPIC_USAGE["cache_read_input_tokens"],
                            cache_read_tokens=ANTHROPIC_USAGE["cache_read_input_tokens"], output_tokens=40),
                 "anthropic.chat")], (encoding, layout)
            assert {e.tenant_id for e in events} == {"acme"} and {e.service for e in events} == {"support-bot"}
    # 1,200 in at $2.50 and 40 out at $10; 900 in at $3, 300 read at $0.30, 40 out at $15 (per million)
    assert [attribution.attribute(e).cost_usd for e in events] == [Decimal("0.003400000000"),
                                                                   Decimal("0.003390000000")]


# ---- what is skipped, and what is dead-lettered -----------------------------------------------------

def test_spans_that_are_not_model_calls_with_usage_are_skipped_and_counted():
    spans = Spans(RESOURCE)
    with spans.parent("POST /answer"):  # an HTTP span: no gen_ai attributes
        spans.call("agents", "invoke_agent planner", {  # an agent's span sums its calls' usage: not billed again
            "gen_ai.operation.name": "invoke_agent", "gen_ai.provider.name": "openai",
            "gen_ai.usage.input_tokens": 5000, "gen_ai.usage.output_tokens": 500}, start_ns=START, end_ns=END)
        spans.call("tools", "execute_tool search", {"gen_ai.operation.name": "execute_tool"}, start_ns=START,
                   end_ns=END)
        spans.call("lib", "chat gpt-4o", chat("openai", "gpt-4o"), start_ns=START, end_ns=END)  # no usage
        spans.call("lib", "chat gpt-4o", chat("openai", "gpt-4o", input_tokens=10, output_tokens=2),
                   start_ns=START, end_ns=END)
    for encoding in ENCODINGS:
        (message,) = messages(spans.finished(), encoding, "batch")
        outcome = MAPPING.outcome(message)
        assert (outcome.spans, outcome.skipped, len(usage_of(outcome)), outcome.rejection) == (5, 4, 1, None)


def test_an_inference_span_that_cannot_make_an_event_dead_letters_its_message_naming_it():
    spans = Spans({"service.name": "support-bot"})  # no tenant on the resource
    spans.call("lib", "chat gpt-4o", {**chat("openai", "gpt-4o", input_tokens=10, output_tokens=2),
                                      "costline.tenant_id": "acme"}, start_ns=START, end_ns=END)
    spans.call("lib", "chat gpt-4o", chat("openai", "gpt-4o", input_tokens=10, output_tokens=2),
               start_ns=START, end_ns=END)
    spans.call("lib", "chat gpt-4o", {**chat("openai", "gpt-4o", output_tokens=2), "costline.tenant_id": "acme",
                                      "gen_ai.usage.input_tokens": "ten"}, start_ns=START, end_ns=END)
    spans.call("lib", "chat gpt-4o", {**chat("openai", "gpt-4o", input_tokens=10, output_tokens=2),
                                      "gen_ai.usage.reasoning.output_tokens": -1, "costline.tenant_id": "acme"},
               start_ns=START, end_ns=END)
    no_tenant, text, negative = (f"{s.context.span_id:016x}" for s in spans.finished()[1:])
    for encoding in ENCODINGS:
        (message,) = messages(spans.finished(), encoding, "batch")
        outcome = MAPPING.outcome(message)
        assert [e.tenant_id for e in usage_of(outcome)] == ["acme"]  # the good span is still published
        assert outcome.rejection is not None and outcome.rejection.reason == "invalid_span"
        reasons = outcome.rejection.message.split("; ")
        assert [r.split(": ", 1)[0].rsplit("/", 1)[1] for r in reasons] == [no_tenant, text, negative]
        assert reasons[0].endswith("no tenant: none of the attributes costline.tenant_id, tenant.id is set "
                                   "(config/otlp.yaml tenant_id)")
        assert reasons[1].endswith("gen_ai.usage.input_tokens is 'ten', not a token count")
        assert reasons[2].endswith("usage.reasoning_tokens: Input should be greater than or equal to 0")


@pytest.mark.parametrize("payload, message", [
    (b"", "empty message"),
    (b"\xff\x00 not protobuf", "neither OTLP JSON nor an OTLP protobuf TracesData"),
    (b'{"resourceSpans": [', "invalid JSON"),
    (b'[{"resourceSpans": []}]', "not OTLP JSON: the message is not an object"),
    (b'{"event_id": "e-1", "tenant_id": "acme"}', "not OTLP JSON: the message has no 'resourceSpans'"),
    (b'{"resourceSpans": []}', "an OTLP JSON message without resource spans"),
    (b'{"resourceSpans": [{"scopeSpans": [{"spans": "none"}]}]}',
     "resourceSpans[0].scopeSpans[0].spans is not an array"),
    (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"attributes": [{"key": "k", "value": {"arrayValue": '
     b'{"values": [7]}}}]}]}]}]}', "attributes['k'] holds a value that is not an object"),
    (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"attributes": [{"key": "k", "value": {"intValue": "'
     + b"9" * 5000 + b'"}}]}]}]}]}', "attributes['k'] is not a 64-bit integer"),
    (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"attributes": [{"key": "k", "value": {"intValue": "'
     + str(2**63).encode() + b'"}}]}]}]}]}', "attributes['k'] is not a 64-bit integer"),
    (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"endTimeUnixNano": ' + str(10**25).encode() + b'}]}]}]}',
     "spans[0].endTimeUnixNano is not a 64-bit unsigned integer"),
    (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"attributes": [{"key": "k", "value": '
     + b'{"arrayValue": {"values": [' * 40 + b'{}' + b']}}' * 40 + b'}]}]}]}]}', "attributes['k'] nests values more than 32"),
    (b'{"resourceSpans": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "invalid JSON"),
    (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "000102030405060708090a0b0c0d0e0f", '
     b'"spanId": "0102030405060708", "startTimeUnixNano": "soon"}]}]}]}',
     "resourceSpans[0].scopeSpans[0].spans[0].startTimeUnixNano is not a 64-bit unsigned integer"),
])
def test_a_message_that_is_not_otlp_is_dead_lettered_with_what_is_wrong(payload, message):
    outcome = MAPPING.outcome(payload)
    assert usage_of(outcome) == [] and outcome.rejection is not None
    assert outcome.rejection.reason == "invalid_otlp"
    assert message in outcome.rejection.message


def test_both_encodings_read_the_same_spans_and_older_collectors_enum_names():
    spans = Spans(RESOURCE)
    spans.call("lib", "chat gpt-4o", {**chat("openai", "gpt-4o", input_tokens=10, output_tokens=2),
                                      "gen_ai.request.stream": True, "gen_ai.request.temperature": 0.25,
                                      "gen_ai.response.finish_reasons": ("stop", "length"),
                                      "gen_ai.usage.output_tokens": 2.0},  # (a count some SDKs record as a double)
               start_ns=START, end_ns=END, error=True)
    proto, as_json = (messages(spans.finished(), encoding, "batch")[0] for encoding in ENCODINGS)
    assert list(read_message(proto)) == list(read_message(as_json))
    (span,) = read_message(as_json)
    assert (span.status, span.start_ns, span.end_ns, span.attributes["gen_ai.usage.input_tokens"]) == (
        2, START, END, 10)
    assert [span.attributes[f"gen_ai.{name}"] for name in ("request.stream", "request.temperature",
                                                            "response.finish_reasons")] == [True, 0.25, ["stop", "length"]]
    document = json.loads(as_json)
    document["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["status"]["code"] = "STATUS_CODE_ERROR"
    assert list(read_message(json.dumps(document).encode())) == [span]
    (event,) = usage_of(MAPPING.outcome(proto))
    assert (event.status, event.usage.output_tokens) == ("error", 2)


def test_the_mapping_reads_the_tenant_and_context_where_config_says(tmp_path: Path):
    path = tmp_path / "otlp.yaml"
    path.write_text("tenant_id: [app.customer]\nfeature: [app.feature]\nstep: [app.step]\n"
                    "tags: {conversation: [gen_ai.conversation.id]}\nproviders: {my-gateway: openai}\n")
    mapping = SpanMapping.from_file(path)
    spans = Spans({"service.name": "support-bot", "app.customer": "initech"})
    spans.call("lib", "chat gpt-4o", {**chat("my-gateway", "gpt-4o", input_tokens=10, output_tokens=2),
                                      "app.customer": "umbrella", "app.feature": "answer",
                                      "gen_ai.conversation.id": "conv-9"}, start_ns=START, end_ns=END)
    event = only_event(spans, mapping)
    # the span's own attribute before its resource's; no step attribute and no @name: no step
    assert (event.tenant_id, event.feature, event.step, event.tags, event.provider) == (
        "umbrella", "answer", None, {"conversation": "conv-9"}, "openai")
    path.write_text("tenant_id: []\n")
    with pytest.raises(ConfigError, match=r"otlp.yaml: tenant_id: List should have at least 1 item"):
        SpanMapping.from_file(path)


def test_the_events_timestamp_is_the_calls_end_within_the_contracts_limits():
    spans = Spans(RESOURCE)
    spans.call("lib", "chat gpt-4o", chat("openai", "gpt-4o", input_tokens=10, output_tokens=2),
               start_ns=END, end_ns=START)  # clocks that disagree: no latency rather than a negative one
    event = only_event(spans)
    assert event.timestamp == datetime(2026, 5, 28, 20, 26, 40, tzinfo=UTC) and event.latency_ms is None


def test_a_dead_letter_holds_only_the_unusable_spans_and_reads_back_as_them():
    spans = Spans({"service.name": "support-bot"})
    spans.call("lib", "chat gpt-4o", {**chat("openai", "gpt-4o", input_tokens=10, output_tokens=2),
                                      "costline.tenant_id": "acme"}, start_ns=START, end_ns=END)
    spans.call("lib", "chat gpt-4o", chat("openai", "gpt-4o", input_tokens=7, output_tokens=1),
               start_ns=START, end_ns=END)  # no tenant
    for encoding in ENCODINGS:
        (message,) = messages(spans.finished(), encoding, "batch")
        outcome = MAPPING.outcome(message)
        assert [e.usage.input_tokens for e in usage_of(outcome)] == [10]
        unusable = [s for s in read_message(message) if s.attributes["gen_ai.usage.input_tokens"] == 7]
        assert read_message(outcome.dead_value) == unusable  # its resource, scope, ids, times and attributes
        again = MAPPING.outcome(outcome.dead_value)  # re-submitted unfixed: dead-lettered again, nothing published
        assert (usage_of(again), again.rejection) == ([], outcome.rejection)
        fixed = SpanMapping(tenant_id=["costline.tenant_id", "service.name"]).outcome(outcome.dead_value)
        assert [(e.tenant_id, e.usage.input_tokens) for e in usage_of(fixed)] == [("support-bot", 7)]


def test_a_span_with_malformed_ids_is_dead_lettered_if_it_is_a_model_call_and_skipped_if_not():
    spans = Spans(RESOURCE)
    spans.call("lib", "chat gpt-4o", chat("openai", "gpt-4o", input_tokens=10, output_tokens=2), start_ns=START,
               end_ns=END)
    spans.call("lib", "GET /health", {"http.route": "/health"}, start_ns=START, end_ns=END)
    document = json.loads(messages(spans.finished(), "otlp_json", "batch")[0])
    call, other = document["resourceSpans"][0]["scopeSpans"][0]["spans"]
    call["spanId"], other["traceId"] = "0000000000000000", "01 02 03 04 05 06 07 08 09 0a 0b"
    outcome = MAPPING.outcome(json.dumps(document).encode())
    assert (usage_of(outcome), outcome.skipped) == ([], 1)
    assert outcome.rejection.reason == "invalid_span"
    assert outcome.rejection.message.endswith("spans[0].spanId is all zeros (an invalid id)")


def test_a_protobuf_message_whose_first_bytes_look_like_json_is_read_as_protobuf():
    spans = Spans(RESOURCE)
    spans.call("lib", "chat gpt-4o", chat("openai", "gpt-4o", input_tokens=10, output_tokens=2), start_ns=START,
               end_ns=END)
    (call,) = TracesData.FromString(messages(spans.finished(), "otlp_proto", "batch")[0]).resource_spans
    for size in (ord("{"), ord("[")):  # a first resource of 123 or 91 bytes: the message begins "\n{" or "\n["
        first = ResourceSpans(scope_spans=[ScopeSpans(spans=[ProtoSpan(trace_id=b"\x01" * 16, span_id=b"\x02" * 8,
                                                                       name="ping")])])
        padding = first.resource.attributes.add(key="pad").value
        while len(first.SerializeToString()) < size:
            padding.string_value += "x"
        message = TracesData(resource_spans=[first, call]).SerializeToString()
        assert message[:2] == b"\n" + bytes([size])
        outcome = MAPPING.outcome(message)
        assert ([e.tenant_id for e in usage_of(outcome)], outcome.skipped) == (["acme"], 1)


def test_output_that_leaves_reasoning_out_is_completed_and_counted():
    def gemini_call(reasoning: int) -> bytes:
        """A google-genai span of 200 output tokens and ``reasoning`` thoughts."""
        spans = Spans(RESOURCE)
        spans.call("opentelemetry.instrumentation.google_genai", "generate_content gemini-2.5-flash", {
            "gen_ai.operation.name": "generate_content", "gen_ai.provider.name": "gemini",
            "gen_ai.request.model": "gemini-2.5-flash", "gen_ai.usage.input_tokens": 1000,
            "gen_ai.usage.output_tokens": 200, "gen_ai.usage.reasoning.output_tokens": reasoning},
            start_ns=START, end_ns=END)
        (message,) = messages(spans.finished(), "otlp_proto", "batch")
        return message

    def output_and_completed(mapping: SpanMapping, message: bytes) -> tuple[int, int]:
        outcome = mapping.outcome(message)
        return usage_of(outcome)[0].usage.output_tokens, outcome.completed

    assert output_and_completed(MAPPING, gemini_call(300)) == (500, 1)  # beyond the output: it was left out
    assert output_and_completed(MAPPING, gemini_call(100)) == (200, 0)  # within it: taken as included
    listed = SpanMapping(output_excludes_reasoning=["opentelemetry.instrumentation.google_genai"])
    assert output_and_completed(listed, gemini_call(100)) == (300, 1)


def test_long_context_is_cut_not_refused_and_a_long_value_is_cut_in_the_reason():
    spans = Spans({**RESOURCE, "service.name": "s" * 300})
    spans.call("lib", "chat " + "m" * 400, {**chat("openai", "gpt-4o", input_tokens=10, output_tokens=2),
                                            "http.route": "/r" * 200}, start_ns=START, end_ns=END)
    spans.call("lib", "chat gpt-4o", {**chat("openai", "gpt-4o", input_tokens=10, output_tokens=2),
                                      "gen_ai.usage.output_tokens": "many " * 100}, start_ns=START, end_ns=END)
    (message,) = messages(spans.finished(), "otlp_proto", "batch")
    outcome = MAPPING.outcome(message)
    (event,) = usage_of(outcome)
    assert (len(event.step), len(event.route), len(event.service)) == (256, 256, 256)
    assert "gen_ai.usage.output_tokens is 'many many many many many many many many, not a token count" \
        in outcome.rejection.message


def test_blank_context_counts_as_not_set_and_long_user_and_tags_are_cut():
    spans = Spans(RESOURCE)  # the resource's tenant is acme
    spans.call("lib", "chat gpt-4o", {**chat(" AWS.Bedrock ", "anthropic.claude-3-5-haiku-20241022-v1:0",
                                             input_tokens=10, output_tokens=2),
                                      "tenant.id": "  ", "enduser.id": "", "costline.user_id": "u" * 300,
                                      "gen_ai.conversation.id": "c" * 300}, start_ns=START, end_ns=END)
    event = only_event(spans, SpanMapping(tags={"conversation": ["gen_ai.conversation.id"]}))
    assert (event.tenant_id, event.user_id, event.tags["conversation"], event.provider) == (
        "acme", "u" * 256, "c" * 256, "aws")
