"""The worker's per-event Python work on one core, without Kafka or ClickHouse: what bounds
end-to-end throughput, measured away from the broker's and the database's noise.

    .venv/bin/python bench/hot_path.py [--events 100000] [--tenants 1000] [--distinct-tenants]

Batches of 5,000 realistic events (streams.operations.simulate), as JSON bytes, go through the
worker's own ``BatchProcessor.process`` (validate → price → tag → record → quota windows and their
changelog → ledger row), then the rest of the loop thread's work per batch: the ledger batch
encoded for ClickHouse (by the compiled writer; the reference path's by the Python encoder) and one quota state per changed window. Kafka's messages are stood in for
by ``streams.runtime.memory``'s records; nothing is consumed, produced or inserted. Each stage is also timed
alone over the same events. Prints a table, then one JSON line for tracking over time.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
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

from streams.operations.simulate import Workload  # noqa: E402
from streams.runtime.loop import tune_gc  # noqa: E402
from streams.runtime.memory import MemoryRecord  # noqa: E402
from streams.runtime.metrics import Counters  # noqa: E402
from streams.runtime.processor import BatchProcessor, quota_state  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.stages.attribution import Attribution  # noqa: E402
from streams.stages.plans import Plans  # noqa: E402
from streams.stages.quotas import QuotaEngine, QuotaTables  # noqa: E402
from streams.stages.revenue import RevenueMeter  # noqa: E402
from streams.stages.validation import validate  # noqa: E402
from streams.storage.tables import LEDGER, RecordBatch  # noqa: E402

BATCH = 5_000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--tenants", type=int, default=1_000)
    parser.add_argument("--distinct-tenants", action="store_true", help="every tenant occurs (round robin)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--live-state-entries", type=int, default=None,
                        help="quota and billing entries kept as objects (default: the worker's setting)")
    parser.add_argument("--without-revenue-limits", action="store_true",
                        help="keep the rate cards, strip the revenue_usd and margin_percent limits")
    parser.add_argument("--without-rating", action="store_true",
                        help="plans without rate cards and revenue limits: the baseline for what rating costs")
    args = parser.parse_args()
    os.sched_setaffinity(0, {0})  # one core, as the loop thread has

    start = datetime.now(UTC) - timedelta(minutes=10)
    events = list(Workload(args.events, tenants=args.tenants, seed=11, start=start).generate())
    if args.distinct_tenants:
        events = [e.model_copy(update={"tenant_id": f"tenant-{i % args.tenants:06d}"}) for i, e in enumerate(events)]
    raws = [e.model_dump_json(exclude_none=True).encode() for e in events]
    settings = Settings.from_env(environ={"COSTLINE_CONFIG_DIR": str(ROOT / "config")})
    live = settings.live_state_entries if args.live_state_entries is None else args.live_state_entries

    raw_topic = settings.topics.raw
    batches = [[MemoryRecord(raw_topic, 0, base + i, None, raw) for i, raw in enumerate(raws[base:base + BATCH])]
               for base in range(0, len(raws), BATCH)]
    attribution = Attribution.from_settings(settings)
    one_by_one_attribution = dataclasses.replace(attribution, fast=False)  # the reference: pydantic validates
    plans = Plans.from_file(settings.plans_file)
    if args.without_rating or args.without_revenue_limits:
        plans = plans.without_rating(keep_cards=not args.without_rating)

    def engine_run(one_by_one: bool = False) -> float:
        """The loop thread's work, batch after batch, with fresh quota tables; µs an event.
        ``one_by_one``: the reference path (the quota stage event by event)."""
        state = quota_state("bench-changelog", live)  # (as the worker builds them)
        quotas = QuotaEngine(plans, lambda partition: QuotaTables(**state.views(partition)))
        processor = BatchProcessor(settings.topics, Counters(), attribution=one_by_one_attribution if one_by_one else attribution,
                                   quotas=quotas, state=state, one_by_one=one_by_one)
        started = time.perf_counter()
        for records in batches:
            batch = processor.process(records)
            LEDGER.encode(batch.records)
            for key, counted in batch.windows.items():  # as streams.runtime.checkpoint writes them
                counted.state_json(batch.settled.get(key)) if not one_by_one else \
                    counted.state(batch.settled.get(key)).model_dump_json().encode()
        elapsed = time.perf_counter() - started
        return elapsed / len(raws) * 1e6

    def quota_run(one_by_one: bool = False) -> None:
        state = quota_state("bench-changelog", live)
        quotas = QuotaEngine(plans, lambda partition: QuotaTables(**state.views(partition)))
        for base in range(0, len(records), BATCH):
            chunk = range(base, min(base + BATCH, len(records)))
            if one_by_one:
                for offset in chunk:
                    quotas.apply(records[offset], 0, offset)
            else:
                quotas.apply_batch(records[base:base + BATCH], [0] * len(chunk), list(chunk))
            quotas.end_batch()
            state.drain({0: base + BATCH})

    def revenue_run() -> None:
        meter, periods = RevenueMeter(plans), {}
        for record in records:
            rated = meter.rate(record, periods, now)
            record.stamp(rated.revenue, rated.period, False)

    def encode_run(compiled: bool = True) -> None:
        rows = records if compiled else models  # (the reference path's records, for its Python encoder)
        for base in range(0, len(rows), BATCH):
            batch = RecordBatch(LEDGER, compiled=compiled)
            for record in rows[base:base + BATCH]:
                batch.add(record)
            LEDGER.encode(batch)

    stages: dict[str, Callable[[], Any]] = {
        "validate": lambda: [validate(raw, now=now) for raw in raws],
        "  the same, pydantic alone": lambda: [validate(raw, now=now, fast=False) for raw in raws],
        "price (quote)": lambda: [attribution.pricer.quote(event) for event in valid],
        "  in Decimal, the reference": lambda: [attribution.pricer.price(event) for event in valid],
        "tag": lambda: [attribution.paths.path_for(event) for event in valid],
        "attribute (price, tag, row)": lambda: [attribution.row(event, now) for event in valid],
        "  the reference's record": lambda: [attribution.attribute(event, now) for event in valid],
        "quota windows + changelog": quota_run,
        "  the same, event by event": lambda: quota_run(one_by_one=True),
        "revenue (rate, stamp)": revenue_run,
        "ledger row + encode": encode_run,
        "  the same, in Python": lambda: encode_run(compiled=False),
    }
    tune_gc()
    engine_run()  # warm-up: memos, caches, first allocations
    engine_run(one_by_one=True)
    totals, references = [], []
    for _ in range(args.repeat):  # paired: the reference path and this one, turn about, in the same run
        for one_by_one, runs in ((True, references), (False, totals)):
            gc.collect()  # each run from the same heap, without the garbage cycles of the run before
            runs.append(engine_run(one_by_one=one_by_one))
    totals.sort()
    references.sort()
    # The stages' inputs, made after the whole-batch runs so that those do not carry them in their heap.
    now = datetime.now(UTC)
    valid = [validate(raw, now=now) for raw in raws]
    records = [attribution.row(event, now) for event in valid]
    models = [attribution.attribute(event, now) for event in valid]
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
    print(f"loop thread, whole batch        {total:>10.2f} µs/event (median of {args.repeat}; "
          f"{min(totals):.2f}–{max(totals):.2f})")
    print(f"single-core ceiling             {1e6 / total:>10,.0f} events/s")
    reference = statistics.median(references)
    print(f"reference path (one by one)     {reference:>10.2f} µs/event (median of {args.repeat}; "
          f"{min(references):.2f}–{max(references):.2f}); this path takes {total / reference:.3f} of it")
    print(json.dumps({"bench": "hot_path", "events": len(raws), "tenants": args.tenants,
                      "distinct_tenants": args.distinct_tenants, "us_per_event": round(total, 2),
                      "reference_us_per_event": round(reference, 2), "ratio_to_reference": round(total / reference, 3),
                      "eps_ceiling": round(1e6 / total),
                      "stages_us": {name: round(us, 2) for name, us in timings.items()}}))


if __name__ == "__main__":
    main()
