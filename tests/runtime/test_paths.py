"""The worker's path (fast decoder, quota stage per batch, quota states written directly) against
the record-by-record path it replaced (pydantic validation, ``QuotaEngine.apply`` event by event,
states serialized from the model), on 200,000 simulated events with copies and bad records mixed
in: the same ledger rows, byte for byte, the same quota states, alerts, dead letters and
changelog, batch by batch. The worker's path runs with room for 500 live state entries (of about
6,000) and 50 tenants' derived revenue values: nearly every entry it reads was frozen to its
changelog bytes since its last use, and nearly every billing period rebuilt from its entry."""

from __future__ import annotations

import dataclasses
import random
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

from streams.operations.simulate import Workload
from streams.runtime.memory import MemoryRecord
from streams.runtime.metrics import Counters
from streams.runtime.processor import BatchProcessor, quota_state
from streams.runtime.state import ChangelogTables
from streams.settings import Settings
from streams.stages.attribution import Attribution
from streams.stages.plans import Plans
from streams.stages.quotas import QuotaEngine, QuotaTables, restore_entry
from streams.storage.tables import LEDGER

ROOT = Path(__file__).resolve().parents[2]
EVENTS = 200_000
BATCH = 5_000


def stream() -> list[MemoryRecord]:
    """The simulate mix over 1,000 tenants and 3 partitions (by tenant), with 1% of the events
    sent again later and 0.2% bad records."""
    settings = Settings.from_env(environ={"COSTLINE_CONFIG_DIR": str(ROOT / "config")})
    rng = random.Random(19)
    # About 67 minutes of event times from 10:00 UTC yesterday: never across a day or a month, whose
    # windows would start again and cross fewer thresholds (run from 2 hours before now, between
    # about 00:50 and 02:00 UTC the run saw 91 alerts instead of over 100).
    start = (datetime.now(UTC) - timedelta(days=1)).replace(hour=10, minute=0, second=0, microsecond=0)
    raws = [(e.tenant_id, e.model_dump_json(exclude_none=True).encode())
            for e in Workload(EVENTS, tenants=1_000, seed=19, start=start).generate()]
    for _ in range(EVENTS // 100):
        raws.insert(rng.randrange(len(raws)), raws[rng.randrange(len(raws))])
    for _ in range(EVENTS // 500):
        raws.insert(rng.randrange(len(raws)), ("acme", rng.choice([b"{", b'{"event_id": 1}', b"\xff", b"[]"])))
    offsets = [0, 0, 0]
    records = []
    for tenant, raw in raws:
        partition = zlib.crc32(tenant.encode()) % 3
        records.append(MemoryRecord(settings.topics.raw, partition, offsets[partition], tenant.encode(), raw))
        offsets[partition] += 1
    return records


def processor(one_by_one: bool) -> BatchProcessor:
    settings = Settings.from_env(environ={"COSTLINE_CONFIG_DIR": str(ROOT / "config")})
    attribution = Attribution.from_settings(settings)
    # The worker's layout with room for 500 live entries (most tenants frozen between their events),
    # against tables that hold every entry as objects.
    state = ChangelogTables("changelog", QuotaTables._fields, restore_entry) if one_by_one else \
        quota_state("changelog", live_entries=500)
    clock = iter(range(1_800_000_000, 1_900_000_000)).__next__  # one second a batch, the same for both
    second = [float(clock())]
    quotas = QuotaEngine(Plans.from_file(settings.plans_file), lambda p: QuotaTables(**state.views(p)),
                         clock=lambda: second[0])
    if not one_by_one:
        quotas.revenue.derived_limit = 50
    made = BatchProcessor(settings.topics, Counters(), attribution=dataclasses.replace(attribution, fast=not one_by_one),
                          quotas=quotas, state=state, one_by_one=one_by_one)
    made.tick = lambda: second.__setitem__(0, float(clock()))  # type: ignore[attr-defined]
    return made


def test_the_worker_path_gives_what_the_record_by_record_path_gave_on_200000_events():
    records = stream()
    new, old = processor(one_by_one=False), processor(one_by_one=True)
    attributed_at = LEDGER.column_names.index("attributed_at")
    totals = {"rows": 0, "states": 0, "alerts": 0, "dead": 0, "rated": 0}
    revenue = LEDGER.column_names.index("revenue_usd")
    for base in range(0, len(records), BATCH):
        chunk = records[base:base + BATCH]
        got, expected = new.process(chunk), old.process(chunk)
        new.tick(), old.tick()
        # Every ledger column but when the attribution was computed, which is each run's own clock.
        rows = [row[:attributed_at] + row[attributed_at + 1:] for row in map(LEDGER.row, got.records)]
        assert rows == [row[:attributed_at] + row[attributed_at + 1:] for row in map(LEDGER.row, expected.records)], base
        assert [k for k in got.windows] == [k for k in expected.windows]
        assert [c.state_json(got.settled.get(k)) for k, c in got.windows.items()] == \
            [c.state(expected.settled.get(k)).model_dump_json().encode() for k, c in expected.windows.items()]
        assert [a.model_dump_json() for a in got.alerts] == [a.model_dump_json() for a in expected.alerts]
        assert [(r.offset(), j) for r, j in got.dead] == [(r.offset(), j) for r, j in expected.dead]
        assert got.expired == expected.expired and got.offsets == expected.offsets
        assert {(p, k): v for p, k, v in got.changelog} == {(p, k): v for p, k, v in expected.changelog}
        totals["rows"] += len(rows)
        totals["states"] += len(got.windows)
        totals["alerts"] += len(got.alerts)
        totals["dead"] += len(got.dead)
        totals["rated"] += sum(row[revenue] is not None for row in rows)
    assert new.counters.duplicates == old.counters.duplicates == EVENTS // 100
    assert new.state.frozen > 80_000 and new.state.thawed > 80_000, (new.state.frozen, new.state.thawed)
    assert old.state.frozen == old.state.thawed == 0
    # What the comparison covered.
    assert totals["rows"] == EVENTS and totals["dead"] == EVENTS // 500, totals
    assert totals["alerts"] > 100 and totals["states"] > 50_000 and totals["rated"] > EVENTS // 2, totals
