"""What the OTLP input costs a span, beside what the stream costs the event it becomes.

    .venv/bin/python bench/otlp.py [--calls 20000] [--repeat 3]

The simulated workload's calls (streams.operations.simulate) are recorded as spans by the real
OpenTelemetry SDK, each a child of its request's span (so half the spans are skipped, as an HTTP
service's would be), and written as a Collector's Kafka exporter writes them: otlp_proto and
otlp_json, one message for each batch of 512 spans (the SDK's batch size) and one message a span.
Each message set is mapped (``SpanMapping.outcome``: read, mapped, checked against the contract and
encoded as the OTLP input publishes it). The stream's own attribution of the same events, from their JSON
(``Attribution.row_raw``), is timed in the same run: the ratio is the input's cost per call against
the stream's. No Kafka: the transactional publish costs one produce a call on top. Prints a table,
then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streams.operations.simulate import Workload  # noqa: E402
from streams.runtime.loop import tune_gc  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.stages.attribution import Attribution  # noqa: E402
from streams.stages.spans import SpanMapping  # noqa: E402
from tests.otlp import ENCODINGS, LAYOUTS, Spans, messages  # noqa: E402

#: The SDK's BatchSpanProcessor exports at most this many spans at once.
EXPORT_BATCH = 512


def record(calls: int) -> list:
    """The workload's calls as spans of one resource a tenant, each under a request's span."""
    events = list(Workload(calls, tenants=200, seed=7, start=datetime(2026, 11, 30, tzinfo=UTC)).generate())
    by_tenant: dict[str, Spans] = {}
    for event in events:
        spans = by_tenant.setdefault(event.tenant_id, Spans({"service.name": event.service or "app",
                                                              "tenant.id": event.tenant_id}))
        end = event.timestamp_ms() * 1_000_000
        u = event.usage
        with spans.parent("POST /v1/answer"):
            spans.call("instrumentation", f"chat {event.model}", {
                "gen_ai.operation.name": "chat", "gen_ai.provider.name": event.provider,
                "gen_ai.request.model": event.model, "gen_ai.usage.input_tokens": u.input_tokens,
                "gen_ai.usage.output_tokens": u.output_tokens, "gen_ai.usage.cache_read.input_tokens": u.cache_read_tokens,
                "gen_ai.usage.cache_write.input_tokens": u.cache_write_tokens,
                "gen_ai.usage.reasoning.output_tokens": u.reasoning_tokens,
                "costline.feature": event.feature or "", "costline.step": event.step or "",
                "enduser.id": event.user_id or ""}, start_ns=end - 800_000_000, end_ns=end)
    return [s for spans in by_tenant.values() for s in spans.finished()]


def timed(work: Callable[[], object], repeat: int) -> tuple[float, list[float]]:
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs), runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    mapping = SpanMapping()
    attribution = Attribution.from_settings(Settings.from_env(environ={}))
    spans = record(args.calls)
    tune_gc()  # (the worker's collector settings: without them, JSON messages' objects were walked again and again)
    figures: dict[str, float] = {}
    raws: list[bytes] = []
    print(f"calls                       {args.calls:>10,}  ({len(spans):,} spans: each call under its request's)")
    for encoding in ENCODINGS:
        for layout in LAYOUTS:
            found = [s for b in range(0, len(spans), EXPORT_BATCH)
                     for s in messages(spans[b:b + EXPORT_BATCH], encoding, layout)]

            def run(found: list[bytes] = found) -> list[bytes]:
                return [e.value for m in found for e in mapping.outcome(m).events]

            out = run()
            assert len(out) == args.calls, (encoding, layout, len(out))
            raws = out
            seconds, runs = timed(run, args.repeat)
            figures[f"{encoding}/{layout}"] = round(seconds / args.calls * 1e6, 2)
            print(f"{encoding:<10} {layout:<6} {len(found):>8,} messages  {figures[f'{encoding}/{layout}']:>7.2f} µs a call "
                  f"({min(runs) / args.calls * 1e6:.2f}-{max(runs) / args.calls * 1e6:.2f})")
    now = datetime.now(UTC)
    stream, _ = timed(lambda: [attribution.row_raw(r, now) for r in raws], args.repeat)
    stream_us = round(stream / args.calls * 1e6, 2)
    print(f"the stream's attribution of the same events   {stream_us:>7.2f} µs an event")
    ratios = {name: round(us / stream_us, 2) for name, us in figures.items()}
    print("input / attribution          " + "  ".join(f"{name} {r:.2f}" for name, r in ratios.items()))
    print(json.dumps({"bench": "otlp", "calls": args.calls, "us_per_call": figures,
                      "attribution_us_per_event": stream_us, "ratio_to_attribution": ratios}))


if __name__ == "__main__":
    main()
