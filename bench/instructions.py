"""Instructions per event of a stage, counted by valgrind's callgrind: a measure that does not drift.

This 2-core host's timings drift by a tenth to a half from run to run, so a change worth 2-5% of a
stage cannot be seen in ``bench/hot_path.py``'s microseconds. The number of instructions the
stage executes can: it is the same from run to run to about 0.1% (with ``PYTHONHASHSEED`` fixed),
so two checkouts compare exactly. It is not time: an instruction that misses the cache costs more
than one that does not, so a change is confirmed in time by ``bench/hot_path.py`` and
``bench/e2e.py`` over several pairs.

    .venv/bin/python bench/instructions.py [--stage attribute|quota|batch] [--events N] [--tenants T] [--root DIR]

``--root``: the checkout whose code is measured (default: this one), to count another build (a
``git worktree`` of the commit before a change, say) with the same script. ``attribute``:
validate, price, tag and build the attributed record (the ledger row), from the raw bytes, caches warm.
``quota``: the quota stage per batch of 5,000 (duplicates, rating, windows, thresholds) with its
changelog drained after each batch, from attributed records. ``batch``: the loop thread's whole
work on batches of 5,000 raw records, as ``bench/hot_path.py`` times it (``BatchProcessor.process``,
the ledger's Native block, a quota state per changed window). Needs ``valgrind`` (``apt-get install
valgrind``); about a minute for the default 10,000 events.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
#: The C function the measured work runs under, and nothing else in the run: callgrind counts only
#: while it is on the stack (``--toggle-collect``).
_TOGGLE = "starmap_next"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=("attribute", "quota", "batch"), default="attribute")
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--root", type=Path, default=HERE, help="the checkout to measure (default: this one)")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)  # (the run under valgrind)
    args = parser.parse_args()
    if args.inside:
        run_stage(args.stage, args.events, args.tenants, args.root.resolve())
        return
    with tempfile.TemporaryDirectory() as scratch:
        command = ["valgrind", "--tool=callgrind", f"--toggle-collect={_TOGGLE}",
                   f"--callgrind-out-file={scratch}/callgrind.out", sys.executable, __file__, "--inside",
                   "--stage", args.stage, "--events", str(args.events), "--tenants", str(args.tenants),
                   "--root", str(args.root)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"},
                                  check=False)
        except FileNotFoundError:
            sys.exit("bench/instructions.py: valgrind is not installed: apt-get install valgrind")
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        sys.exit(f"bench/instructions.py: the run under valgrind failed:\n{done.stderr[-2000:]}")
    per_event = int(found.group(1)) / args.events
    print(f"{args.stage} in {args.root}: {per_event:,.0f} instructions an event ({args.events:,} events, "
          f"{args.tenants:,} tenants)")
    print(json.dumps({"bench": "instructions", "stage": args.stage, "events": args.events, "tenants": args.tenants,
                      "instructions_per_event": round(per_event)}))


def run_stage(stage: str, events: int, tenants: int, root: Path) -> None:
    """The stage under callgrind, its inputs made (and its caches warmed) outside the counted call."""
    sys.path.insert(0, str(root))
    from datetime import UTC, datetime, timedelta

    from streams.operations.simulate import Workload
    from streams.runtime.loop import tune_gc
    from streams.runtime.memory import MemoryRecord
    from streams.runtime.metrics import Counters
    from streams.runtime.processor import BatchProcessor, quota_state
    from streams.settings import Settings
    from streams.stages.attribution import Attribution
    from streams.stages.plans import Plans
    from streams.stages.quotas import QuotaEngine, QuotaTables
    from streams.storage.tables import LEDGER

    # A fixed clock: the same windows in every run. (The batch stage's processor reads the host's
    # clock, for when rows are attributed and for the duplicate check's groups; its events, behind
    # it, are counted the same at any later time.)
    now = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    settings = Settings.from_env(environ={"COSTLINE_CONFIG_DIR": str(root / "config")})
    attribution = Attribution.from_settings(settings)
    plans = Plans.from_file(settings.plans_file)
    raws = [event.model_dump_json(exclude_none=True).encode()
            for event in Workload(events, tenants=tenants, seed=11, start=now - timedelta(minutes=10)).generate()]
    # The stream's attribution: ledger rows where the measured checkout makes them (``row_raw``),
    # else its records, so that a checkout from before the rows compares like for like.
    attribute_raw = getattr(attribution, "row_raw", attribution.attribute_raw)
    records = [attribute_raw(raw, now) for raw in raws]  # (also warms the caches)

    def attribute() -> None:
        for raw in raws:
            attribute_raw(raw, now)

    def quota() -> None:
        state = quota_state("bench-changelog", settings.live_state_entries)
        quotas = QuotaEngine(plans, lambda partition: QuotaTables(**state.views(partition)))
        for base in range(0, len(records), 5_000):
            chunk = records[base:base + 5_000]
            quotas.apply_batch(chunk, [0] * len(chunk), list(range(base, base + len(chunk))), now)
            quotas.end_batch()
            state.drain({0: base + len(chunk)})

    batches = [[MemoryRecord(settings.topics.raw, 0, base + i, None, raw) for i, raw in enumerate(raws[base:base + 5_000])]
               for base in range(0, len(raws), 5_000)] if stage == "batch" else []

    def batch() -> None:
        state = quota_state("bench-changelog", settings.live_state_entries)
        quotas = QuotaEngine(plans, lambda partition: QuotaTables(**state.views(partition)))
        processor = BatchProcessor(settings.topics, Counters(), attribution=attribution, quotas=quotas, state=state)
        for records_ in batches:
            done = processor.process(records_)
            LEDGER.encode(done.records)
            for key, counted in done.windows.items():
                counted.state_json(done.settled.get(key))

    tune_gc()
    list(itertools.starmap({"attribute": attribute, "quota": quota, "batch": batch}[stage], [()]))  # (counted: see _TOGGLE)


if __name__ == "__main__":
    main()
