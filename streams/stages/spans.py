"""OpenTelemetry GenAI spans → usage events: the OTLP input's stage, a pure function of a message.

An OpenTelemetry Collector's Kafka exporter writes spans to a topic (``otlp_spans`` by default), as
``otlp_proto`` (the protobuf ``TracesData``, which ``ExportTraceServiceRequest`` is on the wire) or
``otlp_json`` (pdata's JSON: lowerCamelCase names, hex ids, 64-bit integers as strings), a whole
export batch in one message or one span per message, depending on its version. ``read_message``
takes either encoding and either layout (JSON begins with ``{``; a protobuf ``TracesData`` never
does) and gives its spans; ``SpanMapping.event_of`` makes a span a usage event (``Mapped``: the
record to publish on usage.raw, checked against the contract), or says why not.

Which spans become events: those whose ``gen_ai.operation.name`` is an inference (``operations``:
chat, text completion, content generation, embeddings) and that carry usage. Agent and tool spans
(``invoke_agent``, ``execute_tool``) are skipped even with usage: an agent span may sum its model
calls' usage, which their own spans already carry, and counting it would bill them twice.

The event is what the same call's producer would have sent (``tests/stages/test_spans.py`` holds
the two to the same ledger rows):

- ``event_id``: ``otel-<trace id>-<span id>``, the same on every redelivery of the span, so that a
  resent span collapses like any resent event (the quota stage's copy check, the ledger's FINAL).
- ``timestamp``: the span's end (usage is known when the call ends, as the middleware stamps it);
  ``latency_ms``: end minus start; ``status``: ``error`` for a span whose status is an error.
- ``provider``: ``gen_ai.provider.name``, else the deprecated ``gen_ai.system``, spelled as the
  price catalog spells it (``PROVIDERS``: ``aws.bedrock`` is ``aws``, ``gcp.vertex_ai`` and
  google-genai's ``vertex_ai`` are ``google``); ``model``: ``gen_ai.response.model``, else
  ``gen_ai.request.model`` (the price is the model that answered).
- Token counts from ``gen_ai.usage.*``, current names first, then deprecated ones (``TOKENS``). The
  convention counts cache reads and writes inside ``input_tokens`` and reasoning inside
  ``output_tokens``, as Costline's contract does. Some instrumentations copy Anthropic's raw
  ``input_tokens``, which leave the cached tokens out: where the cache counts exceed the input
  count (impossible in the convention), or the span's instrumentation scope is listed in
  ``input_excludes_cache``, the cache counts are added to it. Reasoning is added to the output count
  the same way: where it exceeds it, or for a scope listed in ``output_excludes_reasoning`` (some
  releases of google-genai's instrumentation leave thoughts out of the output). Never subtracted: a
  count is only ever completed, not guessed down. Each completed span is counted
  (``SpanOutcome.completed``), so that an operator sees which instrumentation needs listing.
- ``tenant_id``, ``user_id``, ``route``, ``feature``, ``step`` and ``tags`` from the attributes
  ``config/otlp.yaml`` names (a span's own attribute before its resource's; ``@name`` is the span's
  name), the optional ones cut to the contract's 256 characters rather than refused: a long route
  must not keep a call from being billed; ``service`` from the resource's ``service.name``;
  ``trace_id``, ``span_id`` and ``parent_span_id`` as hex, so that per-trace attribution works.

A span without ``gen_ai.operation.name``, of another operation, or without any usage count is
skipped (and counted), as is such a span with malformed ids. An inference span that cannot make a
valid event (no tenant, malformed ids, a count that is not a whole number, a part beyond its total)
is dead-lettered with its reason: the dead letter is a ``TracesData`` (protobuf) of the unusable
spans only, with their resources and scopes, so that once the cause is fixed, re-submitting it
publishes those spans and no other. (Re-submitting the whole message would publish its good spans
a second time, after the quota stage's copy check has forgotten them.) A message that is not OTLP
is dead-lettered as it arrived.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
from google.protobuf.message import DecodeError
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Status, TracesData
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from pydantic import Field, ValidationError, field_validator

from schemas.dead_letter import Rejection
from schemas.usage import MAX_LATENCY_MS, UsageEvent, from_epoch_ns
from streams.config import Strict, load_model
from streams.stages.decoding import Undecided, decoder_for

#: Operations whose spans are model calls with usage of their own (the GenAI conventions' names).
INFERENCE = ("chat", "text_completion", "generate_content", "embeddings")

#: ``gen_ai.provider.name`` and ``gen_ai.system`` values → the price catalog's provider ids. Values
#: not listed are used as they are (``openai``, ``anthropic``, ``cohere``, ``deepseek``, ``groq``...).
PROVIDERS = {
    "aws.bedrock": "aws",
    "azure.ai.openai": "azure", "azure.ai.inference": "azure", "az.ai.openai": "azure", "az.ai.inference": "azure",
    "gcp.gemini": "google", "gcp.vertex_ai": "google", "gcp.gen_ai": "google", "gemini": "google",
    "vertex_ai": "google",
    "mistral_ai": "mistral", "x_ai": "x-ai", "xai": "x-ai", "moonshot_ai": "moonshotai",
}

#: Each token count of the contract and the span attributes it is read from, the first present winning:
#: the conventions' current name, then the names earlier conventions and instrumentations used.
TOKENS = {
    "input_tokens": ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens"),
    "output_tokens": ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens"),
    "cache_read_tokens": ("gen_ai.usage.cache_read.input_tokens", "gen_ai.usage.cache_read_input_tokens"),
    "cache_write_tokens": ("gen_ai.usage.cache_write.input_tokens", "gen_ai.usage.cache_creation.input_tokens",
                           "gen_ai.usage.cache_creation_input_tokens"),
    "reasoning_tokens": ("gen_ai.usage.reasoning.output_tokens",),
    "input_audio_tokens": ("gen_ai.usage.audio.input_tokens",),
    "input_image_tokens": ("gen_ai.usage.image.input_tokens",),
    "output_audio_tokens": ("gen_ai.usage.audio.output_tokens",),
}
#: A span carries usage when it has one of these.
_TOTALS = (*TOKENS["input_tokens"], *TOKENS["output_tokens"])

#: How many unusable spans a dead letter's message names, and the longest message (a header).
_SHOWN = 3
_MESSAGE_CHARS = 500
#: The span field an attribute list may name instead of an attribute.
SPAN_NAME = "@name"
#: The contract's longest optional text (``ShortText``): longer context is cut, not refused.
_SHORT = 256
#: The range of a JSON integer (OTLP's are 64-bit: times unsigned, attribute values signed), and
#: how deep attribute values may nest (protobuf, which a dead letter is written in, stops at 100).
_INT64 = range(-(2**63), 2**63)
_UINT64 = range(2**64)
_DEPTH = 32
#: A JSON message's start, found without copying the message (``bytes.lstrip`` copies a protobuf
#: one whole: its first byte, 0x0a, is JSON's white space).
_JSON_START = re.compile(rb"[ \t\r\n\x0b\x0c]*[\[{]").match  # (bytes.isspace's white space)
_HEX = {size: re.compile(f"[0-9a-f]{{{2 * size}}}").fullmatch for size in (8, 16)}
#: The contract's fast decoder (``streams.stages.decoding``), as the stream checks each event: an
#: event is written as JSON and checked there, in a few µs, not built as a pydantic model (10).
_CONTRACT = decoder_for(UsageEvent)
_ENCODE = msgspec.json.Encoder().encode

Attributes = list[str]


class SpanMapping(Strict):
    """``config/otlp.yaml``: where a span's business context is. Each field lists attribute names,
    tried in order, each on the span first and then on its resource; the first present wins."""

    operations: list[str] = Field(default_factory=lambda: list(INFERENCE), min_length=1)
    tenant_id: Attributes = Field(default_factory=lambda: ["costline.tenant_id", "tenant.id"], min_length=1)
    user_id: Attributes = Field(default_factory=lambda: ["costline.user_id", "enduser.id", "user.id"])
    service: Attributes = Field(default_factory=lambda: ["service.name"])
    route: Attributes = Field(default_factory=lambda: ["costline.route", "http.route"])
    feature: Attributes = Field(default_factory=lambda: ["costline.feature"])
    step: Attributes = Field(default_factory=lambda: ["costline.step", SPAN_NAME])
    #: Tag name → attribute names (as above).
    tags: dict[str, Attributes] = Field(default_factory=dict, max_length=64)
    #: Provider spellings added to (or overriding) ``PROVIDERS``.
    providers: dict[str, str] = Field(default_factory=dict)
    #: Instrumentation scopes whose ``input_tokens`` leave cache reads and writes out (a copy of
    #: Anthropic's raw count): their cache counts are always added to it.
    input_excludes_cache: list[str] = Field(default_factory=list)
    #: Instrumentation scopes whose ``output_tokens`` leave reasoning out: it is always added to it.
    output_excludes_reasoning: list[str] = Field(default_factory=list)

    @field_validator("providers")
    @classmethod
    def _lowercase(cls, providers: dict[str, str]) -> dict[str, str]:
        return {name.lower(): catalog for name, catalog in providers.items()}  # (looked up lowercased)

    @classmethod
    def from_file(cls, path: Path | None) -> SpanMapping:
        """The mapping in ``path``; the defaults when the file does not exist."""
        return load_model(path, cls)

    def outcome(self, value: bytes | None) -> SpanOutcome:
        """What one message of the spans topic gives: its events, its spans' counts, and its dead
        letter (``rejection``, and ``dead_value``: None for the message as it arrived)."""
        try:
            spans = read_message(value)
        except NotOtlp as exc:
            return SpanOutcome(rejection=Rejection(reason="invalid_otlp", message=_cut(str(exc))))
        out = SpanOutcome(spans=len(spans))
        bad: list[tuple[Span, str]] = []
        for span in spans:
            try:
                event = self.event_of(span, out)
            except UnusableSpan as exc:
                bad.append((span, f"span {span.trace_id or '?'}/{span.span_id or '?'}: {exc}"))
                continue
            if event is None:
                out.skipped += 1
            else:
                out.events.append(event)
        if bad:
            more = f" (+{len(bad) - _SHOWN} more)" if len(bad) > _SHOWN else ""
            out.rejection = Rejection(reason="invalid_span",
                                      message=_cut("; ".join(reason for _, reason in bad[:_SHOWN]) + more))
            out.dead_value = traces_of([span for span, _ in bad])
        return out

    def event_of(self, span: Span, counts: SpanOutcome | None = None) -> Mapped | None:
        """The usage event of an inference span with usage; None for any other span. Raises
        ``UnusableSpan`` for an inference span that cannot make a valid event. ``counts``: where a
        span whose totals were completed is counted."""
        operation = span.attributes.get("gen_ai.operation.name")
        if operation not in self.operations or not any(name in span.attributes for name in _TOTALS):
            return None
        if span.problem:
            raise UnusableSpan(span.problem)
        usage = {name: count for name, names in TOKENS.items() if (count := _count(span.attributes, names)) is not None}
        if _complete(usage, span.scope in self.input_excludes_cache, span.scope in self.output_excludes_reasoning) \
                and counts is not None:
            counts.completed += 1
        provider = _text(span.attributes, ("gen_ai.provider.name", "gen_ai.system"))
        model = _text(span.attributes, ("gen_ai.response.model", "gen_ai.request.model"))
        if provider is None:
            raise UnusableSpan("no gen_ai.provider.name or gen_ai.system: its instrumentation must set one "
                               "(a span processor can add it)")
        if model is None:
            raise UnusableSpan("no gen_ai.response.model or gen_ai.request.model: its instrumentation must set one")
        if not span.end_ns:
            raise UnusableSpan("no end time: the span was exported before it ended")
        # (64 bits: before the year 2555, within datetime's range. A time the contract does not take
        # is dead-lettered by the stream with its reason.)
        timestamp = from_epoch_ns(span.end_ns)
        tenant = self._lookup(span, self.tenant_id)
        if tenant is None:
            raise UnusableSpan(f"no tenant: none of the attributes {', '.join(self.tenant_id)} is set "
                               "(config/otlp.yaml tenant_id)")
        tags = {name: value[:_SHORT] for name, names in self.tags.items()
                if (value := self._lookup(span, names)) is not None}
        latency = (span.end_ns - span.start_ns) // 1_000_000 if span.start_ns else None
        values = {
            "event_id": f"otel-{span.trace_id}-{span.span_id}",
            "timestamp": timestamp.isoformat().replace("+00:00", "Z"),
            "tenant_id": tenant, "user_id": _short(self._lookup(span, self.user_id)),
            "provider": self.providers.get(spelled := provider.strip().lower(), PROVIDERS.get(spelled, provider)),
            "model": model, "usage": usage, "service": _short(self._lookup(span, self.service)),
            "route": _short(self._lookup(span, self.route)), "feature": _short(self._lookup(span, self.feature)),
            "step": _short(self._lookup(span, self.step)), "trace_id": span.trace_id, "span_id": span.span_id,
            "parent_span_id": span.parent_span_id or None, "tags": tags,
            "status": "error" if span.status == Status.STATUS_CODE_ERROR else "ok",
            "latency_ms": latency if latency is not None and 0 <= latency <= MAX_LATENCY_MS else None,
        }
        value = _ENCODE({k: v for k, v in values.items() if v is not None})
        try:
            event: Any = _CONTRACT.decode(value)
        except Undecided:  # pydantic decides, and words the reason (as the stream's validation does)
            try:
                event = UsageEvent.model_validate_json(value)
            except ValidationError as exc:
                error = exc.errors(include_url=False, include_input=False)[0]
                where = ".".join(str(p) for p in error["loc"]) or "event"
                raise UnusableSpan(f"{where}: {error['msg']}") from None
        return Mapped(event.kafka_key(), value, event.timestamp_ms())

    def _lookup(self, span: Span, names: Attributes) -> str | None:
        """The first of ``names`` set on the span, then on its resource, as text (blank text counts
        as not set: an empty ``enduser.id`` must not refuse the call, nor hide the resource's tenant)."""
        for name in names:
            if name == SPAN_NAME:
                if span.name.strip():
                    return span.name
                continue
            for attributes in (span.attributes, span.resource):
                value = attributes.get(name)
                if value is None or isinstance(value, list | dict | bytes):
                    continue
                text = str(value).lower() if isinstance(value, bool) else str(value)
                if text.strip():
                    return text
        return None


class Mapped(NamedTuple):
    """A span's usage event as the OTLP input publishes it on usage.raw (key, JSON, event time)."""

    key: bytes
    value: bytes
    timestamp_ms: int


@dataclass
class SpanOutcome:
    """What one message gave: its events; the number of spans in it, of those skipped, and of
    those whose totals were completed; and its dead letter: why (None: it has none), and what
    (``dead_value``: the unusable spans' ``TracesData``; None: the message as it arrived)."""

    events: list[Mapped] = field(default_factory=list)
    spans: int = 0
    skipped: int = 0
    completed: int = 0
    rejection: Rejection | None = None
    dead_value: bytes | None = None


@dataclass(frozen=True)
class Span:
    """A span as the mapping reads it, from either encoding: ids in lowercase hex, attribute values
    as Python values (text, int, float, bool, bytes, lists and dicts of them)."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    start_ns: int
    end_ns: int
    status: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope: str
    #: What is wrong with its ids (a model call's span with one is dead-lettered; another is skipped).
    problem: str | None = None


class NotOtlp(ValueError):
    """The message is not an OTLP traces message; the text says what is wrong with it."""


class UnusableSpan(ValueError):
    """An inference span that cannot make a valid usage event; the text says why."""


def read_message(value: bytes | None) -> list[Span]:
    """The spans of one message, in either encoding. Raises ``NotOtlp``.

    JSON begins with ``{`` (pdata's) or ``[``; a ``TracesData`` begins with its field 1's tag, 0x0a,
    which is also JSON's newline, and its next byte (the first resource's length) may be ``{`` or
    ``[``: a message beginning with 0x0a is read as protobuf first."""
    if not value:
        raise NotOtlp("empty message")
    looks_json = _JSON_START(value) is not None
    if value[:1] == b"\n":
        try:
            return _from_proto(value)
        except NotOtlp:
            if not looks_json:
                raise
    return _from_json(value) if looks_json else _from_proto(value)


# ---- otlp_proto ---------------------------------------------------------------------------------

def _from_proto(value: bytes) -> list[Span]:
    try:
        data = TracesData.FromString(value)
    except (DecodeError, RuntimeError, RecursionError) as exc:  # (upb raises DecodeError; others may differ)
        raise NotOtlp(f"neither OTLP JSON nor an OTLP protobuf TracesData: {exc}") from None
    if not data.resource_spans:
        raise NotOtlp("an OTLP protobuf message without resource spans (or not OTLP at all)")
    spans = []
    for resource_spans in data.resource_spans:
        resource = _proto_attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            scope = scope_spans.scope.name
            for s in scope_spans.spans:
                problem = _ids_problem(s.trace_id, s.span_id, s.parent_span_id)
                spans.append(Span(s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name,
                                  s.start_time_unix_nano, s.end_time_unix_nano, s.status.code,
                                  _proto_attributes(s.attributes), resource, scope, problem))
    return spans


def _ids_problem(trace_id: bytes, span_id: bytes, parent_span_id: bytes) -> str | None:
    """What is wrong with a span's ids, or None."""
    for name, value, size, optional in (("trace id", trace_id, 16, False), ("span id", span_id, 8, False),
                                        ("parent span id", parent_span_id, 8, True)):
        if optional and not value:
            continue
        fault = _id_fault(value, size)
        if fault is not None:
            return f"its {name} {fault}"
    return None


def _id_fault(value: bytes, size: int) -> str | None:
    """What is wrong with an id, in either encoding (OTLP's are 16 or 8 bytes, never all zero)."""
    if len(value) != size:
        return f"is {len(value)} bytes long, not {size}"
    if not any(value):
        return "is all zeros (an invalid id)"
    return None


#: AnyValue's kinds read as they are (most attributes: a call's span has a dozen, each read per span).
_SCALARS = frozenset(("string_value", "int_value", "bool_value", "double_value", "bytes_value"))


def _proto_attributes(items: Any) -> dict[str, Any]:
    attributes = {}
    for kv in items:
        value = kv.value
        kind = value.WhichOneof("value")
        attributes[kv.key] = getattr(value, kind) if kind in _SCALARS else _proto_value(value)
    return attributes


def _proto_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_proto_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return _proto_attributes(value.kvlist_value.values)
    return getattr(value, kind) if kind else None


def traces_of(spans: list[Span]) -> bytes:
    """``spans`` as a ``TracesData``, each under its own resource and scope: what the dead-letter
    topic keeps of a message's unusable spans, read back by ``read_message`` as the same spans."""
    data = TracesData()
    groups: dict[tuple[int, str], ScopeSpans] = {}
    resources: dict[int, ResourceSpans] = {}
    for span in spans:
        key = (id(span.resource), span.scope)
        if key not in groups:
            if id(span.resource) not in resources:
                resources[id(span.resource)] = data.resource_spans.add(
                    resource=Resource(attributes=_key_values(span.resource)))
            groups[key] = resources[id(span.resource)].scope_spans.add(scope=InstrumentationScope(name=span.scope))
        groups[key].spans.append(ProtoSpan(
            trace_id=bytes.fromhex(span.trace_id), span_id=bytes.fromhex(span.span_id),
            parent_span_id=bytes.fromhex(span.parent_span_id), name=span.name, start_time_unix_nano=span.start_ns,
            end_time_unix_nano=span.end_ns, status=Status(code=span.status), attributes=_key_values(span.attributes)))
    return data.SerializeToString()


def _key_values(attributes: dict[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=key, value=_any_value(value)) for key, value in attributes.items()]


def _any_value(value: Any) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    if isinstance(value, list):
        return AnyValue(array_value=ArrayValue(values=[_any_value(v) for v in value]))
    if isinstance(value, dict):
        return AnyValue(kvlist_value=KeyValueList(values=_key_values(value)))
    return AnyValue() if value is None else AnyValue(string_value=value)


# ---- otlp_json ----------------------------------------------------------------------------------

#: How JSON's types are named in what is wrong with a message.
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string"}


def _from_json(value: bytes) -> list[Span]:
    try:
        data = json.loads(value)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise NotOtlp(f"invalid JSON: {str(exc)[:200]}") from None
    spans = []
    try:
        resource_spans = _field(data, "resourceSpans", list, "the message")
        if not resource_spans:
            raise NotOtlp("an OTLP JSON message without resource spans")
        for i, rs in enumerate(resource_spans):
            where = f"resourceSpans[{i}]"
            resource = _json_attributes(_field(_field(rs, "resource", dict, where, {}), "attributes", list, where, []),
                                        f"{where}.resource")
            for j, ss in enumerate(_field(rs, "scopeSpans", list, where, [])):
                here = f"{where}.scopeSpans[{j}]"
                scope = _field(_field(ss, "scope", dict, here, {}), "name", str, here, "")
                for k, s in enumerate(_field(ss, "spans", list, here, [])):
                    spans.append(_json_span(s, f"{here}.spans[{k}]", resource, scope))
    except RecursionError:  # (attribute values nested deeper than Python's stack)
        raise NotOtlp("not OTLP JSON: attribute values nested too deep") from None
    return spans


def _json_span(s: Any, at: str, resource: dict[str, Any], scope: str) -> Span:
    status = _field(s, "status", dict, at, {})
    ids, problem = [], None
    for name, size in (("traceId", 16), ("spanId", 8), ("parentSpanId", 8)):
        try:
            ids.append(_json_id(s, name, size, at, required=name != "parentSpanId"))
        except UnusableSpan as exc:
            ids.append("")
            problem = problem or str(exc)
    return Span(*ids, _field(s, "name", str, at, ""),
                _json_int(s.get("startTimeUnixNano", 0), f"{at}.startTimeUnixNano"),
                _json_int(s.get("endTimeUnixNano", 0), f"{at}.endTimeUnixNano"),
                _json_status(status.get("code", 0), f"{at}.status.code"),
                _json_attributes(_field(s, "attributes", list, at, []), at), resource, scope, problem)


def _field(obj: Any, name: str, kind: type, where: str, default: Any = ...) -> Any:
    if not isinstance(obj, dict):
        raise NotOtlp(f"not OTLP JSON: {where} is not an object")
    value = obj.get(name, default)
    if value is ...:
        raise NotOtlp(f"not OTLP JSON: {where} has no {name!r}")
    if not isinstance(value, kind):
        raise NotOtlp(f"not OTLP JSON: {where}.{name} is not {_JSON_TYPES.get(kind, kind.__name__)}")
    return value


def _json_id(span: dict[str, Any], name: str, size: int, where: str, required: bool = True) -> str:
    """An id as pdata writes it (hex), or as protobuf's generic JSON mapping does (base64); an id
    that is neither is ``UnusableSpan`` (the span's problem, not the message's)."""
    text = span.get(name, "")
    if not isinstance(text, str) or (not text and required):
        raise UnusableSpan(f"{where}.{name} is missing or not a string")
    if not text:
        return ""
    if _HEX[size](text.lower()):
        raw = bytes.fromhex(text)
    else:
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != size:
            raise UnusableSpan(f"{where}.{name} {text[:40]!r} is not a {size}-byte id in hex")
    fault = _id_fault(raw, size)
    if fault is not None:
        raise UnusableSpan(f"{where}.{name} {fault}")
    return raw.hex()


def _json_int(value: Any, where: str, signed: bool = False) -> int:
    """A 64-bit integer, as pdata writes it (a string) or as a number; ``signed``: an attribute's
    ``intValue`` (times and status codes are unsigned)."""
    digits = value[1:] if signed and isinstance(value, str) and value.startswith("-") else value
    # (ASCII digits only: isdigit alone takes "²"; and at most 20 of them before int() reads them)
    if isinstance(digits, str) and 0 < len(digits) <= 20 and digits.isascii() and digits.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value in (_INT64 if signed else _UINT64):
        return value
    raise NotOtlp(f"not OTLP JSON: {where} is not a 64-bit {'integer' if signed else 'unsigned integer'}")


def _json_status(value: Any, where: str) -> int:
    """A status code, as a number (pdata since 2022) or by its enum name (earlier Collectors)."""
    if isinstance(value, str) and value in Status.StatusCode.keys():
        return Status.StatusCode.Value(value)
    return _json_int(value, where)


def _json_attributes(items: list[Any], where: str, depth: int = 0) -> dict[str, Any]:
    attributes = {}
    for item in items:
        key = _field(item, "key", str, f"{where}.attributes")
        attributes[key] = _json_value(_field(item, "value", dict, f"{where}.attributes[{key!r}]", {}),
                                      f"{where}.attributes[{key!r}]", depth)
    return attributes


def _json_value(value: Any, where: str, depth: int = 0) -> Any:
    if not isinstance(value, dict):
        raise NotOtlp(f"not OTLP JSON: {where} holds a value that is not an object")
    if depth > _DEPTH:
        raise NotOtlp(f"not OTLP JSON: {where} nests values more than {_DEPTH} deep")
    if "stringValue" in value:
        return value["stringValue"]
    if "intValue" in value:
        return _json_int(value["intValue"], where, signed=True)
    if "boolValue" in value:
        return value["boolValue"]
    if "doubleValue" in value:
        return value["doubleValue"]
    if "arrayValue" in value:
        return [_json_value(v, where, depth + 1) for v in _field(value["arrayValue"], "values", list, where, [])]
    if "kvlistValue" in value:
        return _json_attributes(_field(value["kvlistValue"], "values", list, where, []), where, depth + 1)
    if "bytesValue" in value:
        try:
            return base64.b64decode(value["bytesValue"], validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise NotOtlp(f"not OTLP JSON: {where} bytesValue is not base64") from None
    return None


# ---- the usage ------------------------------------------------------------------------------------

def _count(attributes: dict[str, Any], names: tuple[str, ...]) -> int | None:
    """The first of ``names`` present, as a token count. Raises ``UnusableSpan`` for a value that
    is not a whole number (a float with a fraction, text, a list)."""
    for name in names:
        if name not in attributes:
            continue
        value = attributes[name]
        if isinstance(value, float) and value.is_integer():  # (some SDKs record counts as doubles)
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise UnusableSpan(f"{name} is {repr(value)[:40]}, not a token count")
        return value
    return None


def _complete(usage: dict[str, int], excludes_cache: bool, excludes_reasoning: bool) -> bool:
    """Completes totals that leave their parts out (see the module docstring), in place; whether
    it did."""
    completed = False
    cached = usage.get("cache_read_tokens", 0) + usage.get("cache_write_tokens", 0)
    if cached and (excludes_cache or cached > usage.get("input_tokens", 0)):
        usage["input_tokens"] = usage.get("input_tokens", 0) + cached
        completed = True
    reasoning = usage.get("reasoning_tokens", 0)
    if reasoning and (excludes_reasoning or reasoning > usage.get("output_tokens", 0)):
        usage["output_tokens"] = usage.get("output_tokens", 0) + reasoning
        completed = True
    return completed


def _text(attributes: dict[str, Any], names: tuple[str, ...]) -> str | None:
    for name in names:
        value = attributes.get(name)
        if isinstance(value, str) and value.strip():
            return value
    return None


def _short(text: str | None) -> str | None:
    return None if text is None else text[:_SHORT]


def _cut(message: str) -> str:
    """A dead letter's message, within a header's reasonable size (attribute values are the sender's)."""
    return message if len(message) <= _MESSAGE_CHARS else message[:_MESSAGE_CHARS - 1] + "…"
