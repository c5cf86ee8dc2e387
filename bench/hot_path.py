"""The worker's per-event Python work on one core, without Kafka or ClickHouse: what bounds
end-to-end throughput, measured away from the broker's and the database's noise.

    .venv/bin/python bench/hot_path.py [--events 100000] [--tenants 1000] [--distinct-tenants]

Batches of 5,000 realistic events (streams.simulate), as JSON bytes, go through the engine's own
``BatchEngine.apply`` (validate → price → tag → record → quota windows and their changelog →
ledger row), then the rest of the engine thread's work per batch: the ledger batch encoded for
ClickHouse and one quota state per changed window. Kafka's messages are stood in for by their
bytes, partition and offset; nothing is consumed, produced or inserted. Each stage is also timed
alone over the same events. Prints a table, then one JSON line for tracking over time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streams.engine import BatchEngine, tune_gc  # noqa: E402
from streams.metrics import Counters  # noqa: E402
from streams.pipeline import Enricher, attribute  # noqa: E402
from streams.plans import Plans  # noqa: E402
from streams.quotas import QuotaEngine  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.simulate import Workload  # noqa: E402
from streams.sink import LEDGER, RecordBatch, Sink  # noqa: E402
from streams.state import ChangelogTables  # noqa: E402
from streams.validation import validate  # noqa: E402

BATCH = 5_000


class Record:
    """What ``BatchEngine.apply`` reads of a consumed Kafka message."""

    __slots__ = ("_value", "_partition", "_offset")

    def __init__(self, value: bytes, partition: int, offset: int) -> None:
        self._value, self._partition, self._offset = value, partition, offset

    def error(self) -> None:
        return None

    def value(self) -> bytes:
        return self._value

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def topic(self) -> str:
        return "usage.raw"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--tenants", type=int, default=1_000)
    parser.add_argument("--distinct-tenants", action="store_true", help="every tenant occurs (round robin)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    os.sched_setaffinity(0, {0})  # one core, as the engine thread has
    # No broker is needed: the engine's Kafka clients are never used here, and say so when none answers.
    logging.getLogger("librdkafka").setLevel(logging.CRITICAL)

    start = datetime.now(UTC) - timedelta(minutes=10)
    events = list(Workload(args.events, tenants=args.tenants, seed=11, start=start).generate())
    if args.distinct_tenants:
        events = [e.model_copy(update={"tenant_id": f"tenant-{i % args.tenants:06d}"}) for i, e in enumerate(events)]
    raws = [e.model_dump_json(exclude_none=True).encode() for e in events]
    batches = [[Record(raw, 0, base + i) for i, raw in enumerate(raws[base:base + BATCH])]
               for base in range(0, len(raws), BATCH)]
    settings = Settings.from_env(environ={"COSTLINE_CONFIG_DIR": str(ROOT / "config")})
    enricher = Enricher.from_config_dir(settings.config_dir)
    plans = Plans.from_file(settings.config_dir / "plans.yaml")

    def engine_run() -> float:
        """The engine thread's work, batch after batch, with fresh quota tables; µs an event."""
        engine = BatchEngine(settings, enricher, plans, Counters(), Sink(writer=None, reader=None))  # type: ignore[arg-type]
        engine.assigned = {0}
        started = time.perf_counter()
        for messages in batches:
            batch = engine.apply(messages)
            LEDGER.encode(batch.records)
            for ref, usage, as_of in batch.windows.values():
                ref.state(usage, as_of).model_dump_json().encode()
        elapsed = time.perf_counter() - started
        engine.consumer.close()
        return elapsed / len(raws) * 1e6

    now = datetime.now(UTC)
    valid = [validate(raw, now=now) for raw in raws]
    records = [attribute(event, enricher, now) for event in valid]

    def quota_run() -> None:
        state = ChangelogTables("bench-changelog")
        quotas = QuotaEngine(plans, *state.tables.values())
        for base in range(0, len(records), BATCH):
            for offset in range(base, min(base + BATCH, len(records))):
                state.partition = 0
                quotas.apply(records[offset], 0, offset)
            quotas.end_batch()
            state.drain({0: base + BATCH})

    def encode_run() -> None:
        for base in range(0, len(records), BATCH):
            batch = RecordBatch(LEDGER)
            for record in records[base:base + BATCH]:
                batch.add(record)
            LEDGER.encode(batch)

    stages: dict[str, Callable[[], Any]] = {
        "validate": lambda: [validate(raw, now=now) for raw in raws],
        "price": lambda: [enricher.pricer.price(event) for event in valid],
        "tag": lambda: [enricher.paths.path_for(event) for event in valid],
        "attribute (price, tag, record)": lambda: [attribute(event, enricher, now) for event in valid],
        "quota windows + changelog": quota_run,
        "ledger row + encode": encode_run,
    }
    tune_gc()
    engine_run()  # warm-up: memos, caches, first allocations
    totals = sorted(engine_run() for _ in range(args.repeat))
    timings = {}
    for name, stage in stages.items():
        runs = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            stage()
            runs.append((time.perf_counter() - started) / len(raws) * 1e6)
        timings[name] = statistics.median(runs)

    total = statistics.median(totals)
    print(f"events per run                  {len(raws):>10,}  ({args.tenants:,} tenants"
          f"{', all of them' if args.distinct_tenants else ''})")
    for name, us in timings.items():
        print(f"  {name:<30s} {us:>10.2f} µs/event")
    print(f"engine thread, whole batch loop {total:>10.2f} µs/event (median of {args.repeat}; "
          f"{min(totals):.2f}–{max(totals):.2f})")
    print(f"single-core ceiling             {1e6 / total:>10,.0f} events/s")
    print(json.dumps({"bench": "hot_path", "events": len(raws), "tenants": args.tenants,
                      "distinct_tenants": args.distinct_tenants, "us_per_event": round(total, 2),
                      "eps_ceiling": round(1e6 / total),
                      "stages_us": {name: round(us, 2) for name, us in timings.items()}}))


if __name__ == "__main__":
    main()
