"""Spans made by the real OpenTelemetry SDK, written as an OpenTelemetry Collector's Kafka exporter
writes them: ``otlp_proto`` (a ``TracesData``) or ``otlp_json`` (pdata's JSON: lowerCamelCase
names, ids in lowercase hex, 64-bit integers as strings, enums as numbers, empty fields left out),
one message for a whole export batch or one message a span (resource and scope copied into each).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, TracesData
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

ENCODINGS = ("otlp_proto", "otlp_json")
LAYOUTS = ("batch", "span")


class Spans:
    """A tracer provider of a resource, recording every span it ends."""

    def __init__(self, resource: Mapping[str, Any]) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(resource=Resource.create(dict(resource)))
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def call(self, scope: str, name: str, attributes: Mapping[str, Any], *, start_ns: int, end_ns: int,
             error: bool = False) -> None:
        """One model call's span, as an instrumentation named ``scope`` records it."""
        tracer = self.provider.get_tracer(scope)
        span = tracer.start_span(name, kind=SpanKind.CLIENT, attributes=dict(attributes), start_time=start_ns)
        if error:
            span.set_status(Status(StatusCode.ERROR, "the model is overloaded"))
        span.end(end_time=end_ns)

    @contextmanager
    def parent(self, name: str) -> Iterator[None]:
        """A span the calls inside are children of (an application's request, an agent's run)."""
        tracer = self.provider.get_tracer("app")
        with tracer.start_as_current_span(name):
            yield

    def finished(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())


def messages(spans: list[ReadableSpan], encoding: str, layout: str) -> list[bytes]:
    """The exporter's messages of ``spans``: one for the batch, or one a span."""
    data = TracesData(resource_spans=encode_spans(spans).resource_spans)
    if layout == "span":
        parts = [TracesData(resource_spans=[ResourceSpans(resource=rs.resource, schema_url=rs.schema_url,
                                                          scope_spans=[ScopeSpans(scope=ss.scope, schema_url=ss.schema_url,
                                                                                  spans=[s])])])
                 for rs in data.resource_spans for ss in rs.scope_spans for s in ss.spans]
    else:
        parts = [data]
    return [p.SerializeToString() if encoding == "otlp_proto" else collector_json(p) for p in parts]


def collector_json(data: TracesData) -> bytes:
    """``data`` as pdata's JSON marshaler writes it."""
    document = MessageToDict(data, use_integers_for_enums=True)  # (int64 as strings, camelCase, no empty fields)
    for rs in document.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                _hex_ids(span)
                for link in span.get("links", []):
                    _hex_ids(link)
    return json.dumps(document, separators=(",", ":")).encode()


def _hex_ids(obj: dict[str, Any]) -> None:
    for name in ("traceId", "spanId", "parentSpanId"):
        if obj.get(name):
            obj[name] = base64.b64decode(obj[name]).hex()
