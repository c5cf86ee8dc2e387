"""Pricing throughput on one core: events priced per second by the same Pricer the worker uses.

    .venv/bin/python bench/pricing.py [--events 200000]

The events are a realistic mix (streams.operations.simulate: 9 models of 5 providers, cache and reasoning
tokens, tiered prompts), built before the clock starts; the loop is Pricer.price() per event,
as the worker calls it. Prints a table, then one JSON line for tracking over time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streams.operations.simulate import Workload  # noqa: E402
from streams.stages.pricing import Pricer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    os.sched_setaffinity(0, {0})  # one core

    events = list(Workload(args.events, tenants=1000, seed=1).generate())
    pricer = Pricer.from_file(Path(__file__).resolve().parent.parent / "config" / "prices.yaml")
    for ev in events[:1000]:  # warm the caches, as a running worker has them
        pricer.price(ev)

    rates = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        for ev in events:
            pricer.price(ev)
        rates.append(len(events) / (time.perf_counter() - started))
    rates.sort()
    best, median = rates[-1], rates[len(rates) // 2]
    print(f"events per run      {len(events):>12,}")
    print(f"runs                {args.repeat:>12}")
    print(f"median events/s     {median:>12,.0f}")
    print(f"best events/s       {best:>12,.0f}")
    print(f"median µs/event     {1e6 / median:>12.2f}")
    print(json.dumps({"bench": "pricing", "events": len(events), "eps_median": round(median), "eps_best": round(best),
                      "us_per_event": round(1e6 / median, 2)}))


if __name__ == "__main__":
    main()
