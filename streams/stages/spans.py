"""OpenTelemetry GenAI spans → usage events: the OTLP input's stage, a pure function of a message.

An OpenTelemetry Collector's Kafka exporter writes spans to a topic (``otlp_spans`` by default), as
``otlp_proto`` (the protobuf ``TracesData``, which ``ExportTraceServiceRequest`` is on the wire) or
``otlp_json`` (pdata's JSON: lowerCamelCase names, hex ids, 64-bit integers as strings), a whole
export batch in one message or one span per message, depending on its version. ``read_message``
takes either encoding and either layout (JSON begins with ``{``; a protobuf ``TracesData`` never
does) and gives its spans; ``SpanMapping.event_of`` makes a span a ``UsageEvent``, or says why not.

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
  ``input_excludes_cache``, the cache counts are added to it. Reasoning beyond the output count is
  added to it the same way. Never subtracted: a count is only ever completed, not guessed down.
- ``tenant_id``, ``user_id``, ``route``, ``feature``, ``step`` and ``tags`` from the attributes
  ``config/otlp.yaml`` names (a span's own attribute before its resource's; ``@name`` is the span's
  name); ``service`` from the resource's ``service.name``; ``trace_id``, ``span_id`` and
  ``parent_span_id`` as hex, so that per-trace attribution works.

A span without ``gen_ai.operation.name``, of another operation, or without any usage count is
skipped (and counted). An inference span whose usage or identity cannot make a valid event (no
tenant, a count that is not a whole number, a part beyond its total) makes the message a dead
letter, its reason naming the span; the message's other spans are still published, and a fixed
message re-submitted from the dead-letter topic publishes them again under the same event ids, so
they collapse. A message that is not OTLP is a dead letter too.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Status, TracesData
from pydantic import Field, ValidationError

from schemas.dead_letter import Rejection
from schemas.usage import MAX_LATENCY_MS, UsageEvent
from streams.config import Strict, load_model

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

#: How many unusable spans a dead letter's message names.
_SHOWN = 3
#: The span field an attribute list may name instead of an attribute.
SPAN_NAME = "@name"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

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

    @classmethod
    def from_file(cls, path: Path | None) -> SpanMapping:
        """The mapping in ``path``; the defaults when the file does not exist."""
        return load_model(path, cls)

    def outcome(self, value: bytes | None) -> SpanOutcome:
        """What one message of the spans topic gives: its events, how many spans it skipped, and
        the reason it is a dead letter (or None)."""
        try:
            spans = list(read_message(value))
        except NotOtlp as exc:
            return SpanOutcome(rejection=Rejection(reason="invalid_otlp", message=str(exc)))
        out = SpanOutcome(spans=len(spans))
        bad: list[str] = []
        for span in spans:
            try:
                event = self.event_of(span)
            except UnusableSpan as exc:
                bad.append(f"span {span.trace_id}/{span.span_id}: {exc}")
                continue
            if event is None:
                out.skipped += 1
            else:
                out.events.append(event)
        if bad:
            more = f" (+{len(bad) - _SHOWN} more)" if len(bad) > _SHOWN else ""
            out.rejection = Rejection(reason="invalid_span", message="; ".join(bad[:_SHOWN]) + more)
        return out

    def event_of(self, span: Span) -> UsageEvent | None:
        """The usage event of an inference span with usage; None for any other span. Raises
        ``UnusableSpan`` for an inference span that cannot make a valid event."""
        operation = span.attributes.get("gen_ai.operation.name")
        if operation not in self.operations or not any(name in span.attributes for name in _TOTALS):
            return None
        counts = {name: _count(span.attributes, names) for name, names in TOKENS.items()}
        usage = {name: count for name, count in counts.items() if count is not None}
        _complete(usage, span.scope in self.input_excludes_cache)
        provider = _text(span.attributes, ("gen_ai.provider.name", "gen_ai.system"))
        model = _text(span.attributes, ("gen_ai.response.model", "gen_ai.request.model"))
        if provider is None:
            raise UnusableSpan("no gen_ai.provider.name (or gen_ai.system)")
        if model is None:
            raise UnusableSpan("no gen_ai.response.model (or gen_ai.request.model)")
        if not span.end_ns:
            raise UnusableSpan("no end time")
        tenant = self._lookup(span, self.tenant_id)
        if tenant is None:
            raise UnusableSpan(f"no tenant: none of the attributes {', '.join(self.tenant_id)} is set "
                               "(config/otlp.yaml tenant_id)")
        tags = {name: value for name, names in self.tags.items() if (value := self._lookup(span, names)) is not None}
        latency = (span.end_ns - span.start_ns) // 1_000_000 if span.start_ns else None
        values = {
            "event_id": f"otel-{span.trace_id}-{span.span_id}", "timestamp": _time(span.end_ns),
            "tenant_id": tenant, "user_id": self._lookup(span, self.user_id),
            "provider": self.providers.get(provider.lower(), PROVIDERS.get(provider.lower(), provider)),
            "model": model, "usage": usage, "service": self._lookup(span, self.service),
            "route": self._lookup(span, self.route), "feature": self._lookup(span, self.feature),
            "step": self._lookup(span, self.step), "trace_id": span.trace_id, "span_id": span.span_id,
            "parent_span_id": span.parent_span_id or None, "tags": tags,
            "status": "error" if span.status == Status.STATUS_CODE_ERROR else "ok",
            "latency_ms": latency if latency is not None and 0 <= latency <= MAX_LATENCY_MS else None,
        }
        try:
            return UsageEvent.model_validate({k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            error = exc.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(p) for p in error["loc"]) or "event"
            raise UnusableSpan(f"{where}: {error['msg']}") from None

    def _lookup(self, span: Span, names: Attributes) -> str | None:
        """The first of ``names`` set on the span, then on its resource, as text."""
        for name in names:
            if name == SPAN_NAME:
                if span.name:
                    return span.name
                continue
            for attributes in (span.attributes, span.resource):
                value = attributes.get(name)
                if value is not None and not isinstance(value, list | dict | bytes):
                    return str(value).lower() if isinstance(value, bool) else str(value)
        return None


@dataclass
class SpanOutcome:
    """What one message gave: its events, the number of spans in it, of those skipped, and the
    reason it goes to the dead-letter topic (None if it does not)."""

    events: list[UsageEvent] = field(default_factory=list)
    spans: int = 0
    skipped: int = 0
    rejection: Rejection | None = None


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


class NotOtlp(ValueError):
    """The message is not an OTLP traces message; the text says what is wrong with it."""


class UnusableSpan(ValueError):
    """An inference span that cannot make a valid usage event; the text says why."""


def read_message(value: bytes | None) -> Iterator[Span]:
    """The spans of one message, in either encoding. Raises ``NotOtlp``."""
    if not value:
        raise NotOtlp("empty message")
    if value.lstrip()[:1] in (b"{", b"["):  # (a TracesData begins with field 1: 0x0a)
        yield from _from_json(value)
    else:
        yield from _from_proto(value)


# ---- otlp_proto ---------------------------------------------------------------------------------

def _from_proto(value: bytes) -> Iterator[Span]:
    try:
        data = TracesData.FromString(value)
    except (DecodeError, RuntimeError) as exc:  # (the upb backend raises DecodeError; others may differ)
        raise NotOtlp(f"neither OTLP JSON nor an OTLP protobuf TracesData: {exc}") from None
    if not data.resource_spans:
        raise NotOtlp("an OTLP protobuf message without resource spans (or not OTLP at all)")
    spans = []
    for resource_spans in data.resource_spans:
        resource = {a.key: _proto_value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            scope = scope_spans.scope.name
            for s in scope_spans.spans:
                if len(s.trace_id) != 16 or len(s.span_id) != 8 or len(s.parent_span_id) not in (0, 8):
                    raise NotOtlp(f"a span with a {len(s.trace_id)}-byte trace id and a {len(s.span_id)}-byte "
                                  "span id (OTLP's are 16 and 8 bytes)")
                spans.append(Span(s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name,
                                  s.start_time_unix_nano, s.end_time_unix_nano, s.status.code,
                                  {a.key: _proto_value(a.value) for a in s.attributes}, resource, scope))
    return iter(spans)


def _proto_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_proto_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _proto_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


# ---- otlp_json ----------------------------------------------------------------------------------

def _from_json(value: bytes) -> Iterator[Span]:
    try:
        data = json.loads(value)
    except (UnicodeDecodeError, ValueError) as exc:
        raise NotOtlp(f"invalid JSON: {exc}") from None
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
                    at = f"{here}.spans[{k}]"
                    status = _field(s, "status", dict, at, {})
                    spans.append(Span(
                        _json_id(s, "traceId", 16, at), _json_id(s, "spanId", 8, at),
                        _json_id(s, "parentSpanId", 8, at, required=False), _field(s, "name", str, at, ""),
                        _json_int(s.get("startTimeUnixNano", 0), f"{at}.startTimeUnixNano"),
                        _json_int(s.get("endTimeUnixNano", 0), f"{at}.endTimeUnixNano"),
                        _json_status(status.get("code", 0), f"{at}.status.code"),
                        _json_attributes(_field(s, "attributes", list, at, []), at), resource, scope))
    except AttributeError:  # (a value that is not an object where one must be)
        raise NotOtlp("not OTLP JSON: an object was expected where another value is") from None
    return iter(spans)


def _field(obj: Any, name: str, kind: type, where: str, default: Any = ...) -> Any:
    if not isinstance(obj, dict):
        raise NotOtlp(f"not OTLP JSON: {where} is not an object")
    value = obj.get(name, default)
    if value is ...:
        raise NotOtlp(f"not OTLP JSON: {where} has no {name!r}")
    if not isinstance(value, kind):
        raise NotOtlp(f"not OTLP JSON: {where}.{name} is not a JSON {kind.__name__}")
    return value


def _json_id(span: dict[str, Any], name: str, size: int, where: str, required: bool = True) -> str:
    """An id as pdata writes it (lowercase hex); the base64 of protobuf's generic JSON mapping too."""
    text = span.get(name, "")
    if not isinstance(text, str) or (not text and required):
        raise NotOtlp(f"not OTLP JSON: {where}.{name} is missing or not a string")
    if not text:
        return ""
    if len(text) == 2 * size:
        try:
            return bytes.fromhex(text).hex()
        except ValueError:
            pass
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error:
        raw = b""
    if len(raw) != size:
        raise NotOtlp(f"not OTLP JSON: {where}.{name} {text[:40]!r} is not a {size}-byte id in hex")
    return raw.hex()


def _json_int(value: Any, where: str, signed: bool = False) -> int:
    """A 64-bit integer, as pdata writes it (a string) or as a number; ``signed``: an attribute's
    ``intValue`` (times and status codes are never negative)."""
    if isinstance(value, int) and not isinstance(value, bool) and (signed or value >= 0):
        return value
    digits = value[1:] if signed and isinstance(value, str) and value.startswith("-") else value
    if isinstance(digits, str) and digits.isascii() and digits.isdigit():  # (ASCII: isdigit alone takes "²")
        return int(value)
    raise NotOtlp(f"not OTLP JSON: {where} is not an integer")


def _json_status(value: Any, where: str) -> int:
    """A status code, as a number (pdata since 2022) or by its enum name (earlier Collectors)."""
    if isinstance(value, str) and value in Status.StatusCode.keys():
        return Status.StatusCode.Value(value)
    return _json_int(value, where)


def _json_attributes(items: list[Any], where: str) -> dict[str, Any]:
    attributes = {}
    for item in items:
        key = _field(item, "key", str, f"{where}.attributes")
        attributes[key] = _json_value(_field(item, "value", dict, f"{where}.attributes[{key!r}]", {}),
                                      f"{where}.attributes[{key!r}]")
    return attributes


def _json_value(value: dict[str, Any], where: str) -> Any:
    if "stringValue" in value:
        return value["stringValue"]
    if "intValue" in value:
        return _json_int(value["intValue"], where, signed=True)
    if "boolValue" in value:
        return value["boolValue"]
    if "doubleValue" in value:
        return value["doubleValue"]
    if "arrayValue" in value:
        return [_json_value(v, where) for v in _field(value["arrayValue"], "values", list, where, [])]
    if "kvlistValue" in value:
        return _json_attributes(_field(value["kvlistValue"], "values", list, where, []), where)
    if "bytesValue" in value:
        try:
            return base64.b64decode(value["bytesValue"], validate=True)
        except (binascii.Error, TypeError):
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
            raise UnusableSpan(f"{name} is {value!r}, not a token count")
        return value
    return None


def _complete(usage: dict[str, int], excludes_cache: bool) -> None:
    """Completes totals that leave their parts out (see the module docstring), in place."""
    cached = usage.get("cache_read_tokens", 0) + usage.get("cache_write_tokens", 0)
    if cached and (excludes_cache or cached > usage.get("input_tokens", 0)):
        usage["input_tokens"] = usage.get("input_tokens", 0) + cached
    reasoning = usage.get("reasoning_tokens", 0)
    if reasoning > usage.get("output_tokens", 0):
        usage["output_tokens"] = usage.get("output_tokens", 0) + reasoning


def _text(attributes: dict[str, Any], names: tuple[str, ...]) -> str | None:
    for name in names:
        value = attributes.get(name)
        if isinstance(value, str) and value.strip():
            return value
    return None


def _time(ns: int) -> datetime:
    return _EPOCH + timedelta(microseconds=ns // 1000)
