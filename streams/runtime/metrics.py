"""The worker's counters, and their Prometheus text exposition (``GET /metrics``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from streams.storage.sink import SinkStats


@dataclass
class Counters:
    events_in: int = 0
    attributed: int = 0
    unpriced: int = 0
    dead_lettered: int = 0
    late: int = 0
    duplicates: int = 0
    alerts: int = 0
    quota_errors: int = 0
    #: The OTLP input's (``streams.runtime.spans``).
    otlp_messages: int = 0
    otlp_spans: int = 0
    otlp_events: int = 0
    otlp_skipped: int = 0
    otlp_completed: int = 0
    otlp_dead_lettered: int = 0
    otlp_aborted: int = 0
    #: Per ClickHouse table.
    sinks: dict[str, SinkStats] = field(default_factory=dict)
    #: Next offset to process per (topic, partition), for the consumer lag.
    positions: dict[tuple[str, int], int] = field(default_factory=dict)

    def processed(self, topic: str, partition: int, offset: int) -> None:
        key = (topic, partition)
        if offset + 1 > self.positions.get(key, 0):
            self.positions[key] = offset + 1

    def health(self) -> dict[str, object]:
        return {
            "events_in": self.events_in, "attributed": self.attributed, "unpriced": self.unpriced,
            "dead_lettered": self.dead_lettered, "late": self.late, "duplicates": self.duplicates,
            "alerts": self.alerts, "quota_errors": self.quota_errors,
            "otlp": {"messages": self.otlp_messages, "spans": self.otlp_spans, "events": self.otlp_events,
                     "skipped": self.otlp_skipped, "completed": self.otlp_completed,
                     "dead_lettered": self.otlp_dead_lettered, "aborted": self.otlp_aborted},
            "sinks": {name: vars(stats) for name, stats in self.sinks.items()},
        }


_COUNTERS = [
    ("events_in", "Usage records read from usage.raw"),
    ("attributed", "Events validated, priced and tagged"),
    ("unpriced", "Attributed events without a price (unknown model)"),
    ("dead_lettered", "Records sent to usage.dlq"),
    ("late", "Events later than their quota windows' grace period"),
    ("duplicates", "Re-sent copies of events, not counted again in quota windows, revenue or the ledger"),
    ("alerts", "Quota alerts sent"),
    ("quota_errors", "Events whose quota update failed"),
    ("otlp_messages", "Messages read from the OpenTelemetry spans topic"),
    ("otlp_spans", "Spans in those messages"),
    ("otlp_events", "Spans published to usage.raw as usage events"),
    ("otlp_skipped", "Spans that are not model calls with usage (agent, tool and other spans)"),
    ("otlp_completed", "Spans whose input or output total left out its cache or reasoning part, which was added"),
    ("otlp_dead_lettered", "Span messages sent to usage.dlq (not OTLP, or with an unusable inference span)"),
    ("otlp_aborted", "OTLP input transactions aborted (their messages read and published again)"),
]


def render(counters: Counters, highwaters: dict[tuple[str, int], int]) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP costline_{name} {help_text}")
        lines.append(f"# TYPE costline_{name} {kind}")
        lines.extend(f"costline_{name}{labels} {value:g}" for labels, value in samples)

    for attr, help_text in _COUNTERS:
        metric(f"{attr}_total", "counter", help_text, [("", getattr(counters, attr))])
    sinks = sorted(counters.sinks.items())

    def per_table(get: object) -> list[tuple[str, float]]:
        return [(f'{{table="{name}"}}', get(stats)) for name, stats in sinks]  # type: ignore[operator]

    metric("rows_landed_total", "counter", "Rows written to ClickHouse", per_table(lambda s: s.landed))
    metric("clickhouse_errors_total", "counter", "Failed ClickHouse insert attempts (each retried)",
           per_table(lambda s: s.errors))
    metric("clickhouse_failing_seconds", "gauge", "How long inserts have been failing (0 when healthy)",
           per_table(lambda s: time.monotonic() - s.failing_since if s.failing_since else 0))
    metric("batch_seconds", "summary", "Time to land a batch, retries included",
           [(f'_sum{{table="{n}"}}', s.batch_seconds_sum) for n, s in sinks]
           + [(f'_count{{table="{n}"}}', s.batches) for n, s in sinks])
    metric("batch_seconds_max", "gauge", "Longest time to land a batch", per_table(lambda s: s.batch_seconds_max))
    metric("consumer_lag", "gauge", "Records not yet processed per topic partition",
           [(f'{{topic="{t}",partition="{p}"}}', max(hw - counters.positions.get((t, p), 0), 0))
            for (t, p), hw in sorted(highwaters.items())])
    return "\n".join(lines) + "\n"
