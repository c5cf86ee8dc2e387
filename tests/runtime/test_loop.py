"""The batch loop end to end in memory: what a batch produces, the order in which it is made
durable, the rewind after an aborted transaction, the restore by the partitions' next owner, a
rebalance mid-stream, and each role's topics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from decimal import Decimal
from pathlib import Path

import pytest

from schemas.attributed import HEADER_IN_BLOCK, AttributedUsage
from schemas.dead_letter import HEADER_MESSAGE, HEADER_OFFSET, HEADER_REASON
from schemas.usage import UsageEvent
from streams.runtime.checkpoint import Unlanded
from streams.runtime.loop import BatchLoop, tune_malloc
from streams.runtime.memory import MemoryBroker, MemorySink
from streams.runtime.ports import TransactionFailed
from streams.stages.plans import Plans
from streams.stages.rating import usage_amount
from streams.storage.tables import LEDGER
from tests.runtime.conftest import CHANGELOG, TOPICS, alerts, cost_of, states, usage_event

TENANTS = {0: "acme", 1: "globex"}


def fill(broker: MemoryBroker, first: int, last: int) -> None:
    """Events first..last-1, acme's on partition 0 and globex's on partition 1 (alternating)."""
    for i in range(first, last):
        partition = i % 2
        broker.append(TOPICS.raw, partition, TENANTS[partition].encode(), usage_event(i, TENANTS[partition]))


def expected_usage(last: int) -> dict[str, Decimal]:
    totals: dict[str, Decimal] = {}
    for i in range(last):
        totals[TENANTS[i % 2]] = totals.get(TENANTS[i % 2], Decimal(0)) + cost_of(i)
    return totals


def expected_alerts(last: int) -> list[tuple[str, Decimal, str]]:
    """The crossings of 50% and 100% of 1 USD, in event order per tenant (acme's partition first)."""
    out = []
    for partition, tenant in TENANTS.items():
        total = Decimal(0)
        for i in range(partition, last, 2):
            before, total = total, total + cost_of(i)
            out += [(tenant, Decimal(p), f"e-{i:05d}") for p in (50, 100) if before < Decimal(p) / 100 <= total]
    return out


def ledger_ids(sink: MemorySink) -> list[str]:
    return [record.event_id for record in sink.tables.get("usage_ledger", [])]


def ledger_revenue(*sinks: MemorySink) -> dict[str, Decimal]:
    """Each tenant's revenue in the ledger, each event once; an event landed again (after a
    rewind or by the next owner) must carry the same revenue as before."""
    by_event: dict[str, tuple[str, Decimal]] = {}
    for sink in sinks:
        for record in sink.tables.get("usage_ledger", []):
            seen = by_event.setdefault(record.event_id, (record.tenant_id, record.revenue_usd))
            assert seen[1] == record.revenue_usd, f"{record.event_id} rated twice, differently"
    totals: dict[str, Decimal] = {}
    for tenant, revenue in by_event.values():
        totals[tenant] = totals.get(tenant, Decimal(0)) + revenue
    return totals


def expected_revenue(plans: Plans, last: int) -> dict[str, Decimal]:
    """Each tenant's usage rating of its period's total tokens (the events' revenue must add up to it)."""
    card = plans.plans["team"].rate_card
    tokens: dict[str, Decimal] = {}
    for i in range(last):
        usage = UsageEvent.model_validate_json(usage_event(i)).usage
        tokens[TENANTS[i % 2]] = tokens.get(TENANTS[i % 2], Decimal(0)) + usage.input_tokens + usage.output_tokens
    return {tenant: usage_amount(card, {"tokens": total}).quantize(Decimal("1e-12")) for tenant, total in tokens.items()}


def test_a_batch_is_attributed_counted_landed_and_committed_with_its_dead_letters(make_worker):
    broker = MemoryBroker(partitions=2)
    fill(broker, 0, 60)
    broker.append(TOPICS.raw, 0, b"acme", b'{"event_id": "bad-1"}')
    broker.append(TOPICS.raw, 1, b"globex", b"\xff not utf-8")
    worker = make_worker(broker, batch_size=7).start()
    worker.committed_offsets(62)
    assert worker.checkpoint.ready.is_set()  # consuming: /v1/health says ok
    worker.stop()
    assert not worker.checkpoint.ready.is_set()  # its partitions revoked

    assert sorted(ledger_ids(worker.sink)) == [f"e-{i:05d}" for i in range(60)]
    assert sum(r.cost_usd for r in worker.sink.tables["usage_ledger"]) == sum(map(cost_of, range(60)))
    assert states(broker) == expected_usage(60)
    assert alerts(broker) == expected_alerts(60) and len(expected_alerts(60)) == 4
    assert sorted((a.tenant_id, a.threshold_percent, a.event_id) for a in worker.sink.tables["quota_alerts"]) == \
        sorted(expected_alerts(60))
    dead = broker.records(TOPICS.dlq)
    assert [(d.value(), dict(d.headers())[HEADER_REASON], dict(d.headers())[HEADER_OFFSET]) for d in dead] == [
        (b'{"event_id": "bad-1"}', b"invalid_event", b"30"), (b"\xff not utf-8", b"invalid_utf8", b"30")]
    c = worker.counters
    assert (c.events_in, c.attributed, c.dead_lettered, c.alerts, c.late, c.duplicates) == (62, 60, 2, 4, 0, 0)
    assert c.positions == {(TOPICS.raw, 0): 31, (TOPICS.raw, 1): 31}
    positions = {r.key(): r.value() for r in broker.records(CHANGELOG) if r.key().startswith(b"_offset")}
    assert positions == {b"_offset|0": b"31", b"_offset|1": b"31"}
    assert worker.transactions.aborted == 0


def test_a_batchs_positions_wait_for_its_landing_and_its_quota_states_do_not(make_worker):
    broker = MemoryBroker(partitions=2)
    fill(broker, 0, 8)
    sink = MemorySink()
    sink.hold()  # ClickHouse does not take the batch
    worker = make_worker(broker, sink=sink, batch_size=100).start()
    # The first poll reads all 8 events; the turn after the second waits in the checkpoint for the landing.
    worker.until(lambda: worker.counters.events_in == 8 and worker.source.polls >= 2, "the next turn of the loop")
    # Committed already: a transaction of the batch's quota states alone (one window a tenant).
    assert (worker.transactions.committed, worker.transactions.open, broker.group_offsets) == (1, None, {})
    assert states(broker) == expected_usage(8) and len(broker.records(TOPICS.state)) == 2
    assert broker.records(CHANGELOG) == [] and broker.records(TOPICS.dlq) == []
    sink.release()
    worker.committed_offsets(8)
    worker.stop()
    assert worker.transactions.committed == 2 and sorted(ledger_ids(sink)) == [f"e-{i:05d}" for i in range(8)]
    assert len(broker.records(TOPICS.state)) == 2  # not sent again with the positions
    positions = {r.key(): r.value() for r in broker.records(CHANGELOG) if r.key().startswith(b"_offset")}
    assert positions == {b"_offset|0": b"4", b"_offset|1": b"4"}


def test_a_batch_that_lands_while_the_next_read_waits_is_committed_at_once(make_worker):
    """Its positions must not wait for the read to end (up to COSTLINE_SINK_WITHIN_S)."""
    broker = MemoryBroker(partitions=2)
    fill(broker, 0, 8)
    sink = MemorySink()
    sink.hold()
    worker = make_worker(broker, sink=sink, batch_size=100)
    worker.loop.within_s = 60.0  # the next read waits a minute for records that do not come
    worker.start()
    worker.until(lambda: worker.counters.events_in == 8 and worker.source.polls >= 3, "the next read to wait")
    assert worker.transactions.committed == 1 and broker.group_offsets == {}  # the early quota states only
    sink.release()
    worker.until(lambda: worker.transactions.committed == 2, "the commit, within the read", timeout_s=5)
    assert len(broker.records(TOPICS.state)) == 2 and worker.counters.events_in == 8  # one window a tenant
    assert {r.key(): r.value() for r in broker.records(CHANGELOG) if r.key().startswith(b"_offset")} == {
        b"_offset|0": b"4", b"_offset|1": b"4"}
    worker.stop()  # a stop ends the read too


def test_the_quota_states_of_a_batch_processed_while_the_one_before_lands_go_out_with_that_ones_commit(
        make_worker):
    broker = MemoryBroker(partitions=2)
    fill(broker, 0, 16)
    sink = MemorySink()
    sink.hold()
    # Two batches of 8 (acme's partition, then globex's): the second is read and processed while
    # the first cannot land; the loop then waits in the first batch's commit for its landing.
    worker = make_worker(broker, sink=sink, batch_size=8).start()
    worker.until(lambda: worker.counters.events_in == 16, "the second batch processed")
    assert worker.transactions.committed == 1 and list(states(broker)) == ["acme"]  # the first's, early
    sink.release()
    # The first batch's commit carries the second's states; then the second's own commit.
    worker.committed_offsets(16)
    worker.stop()
    assert worker.transactions.committed == 3
    assert states(broker) == expected_usage(16) and len(broker.records(TOPICS.state)) == 2


def test_after_a_batch_of_mostly_one_event_a_tenant_a_smaller_batch_is_read(make_worker):
    """Such a batch holds the most memory an event, and gains nothing from its size."""
    broker = MemoryBroker(partitions=1)
    for i in range(12):  # twelve tenants, an event each
        broker.append(TOPICS.raw, 0, f"t-{i}".encode(), usage_event(i, f"t-{i}"))
    for i in range(12, 36):  # then one tenant's events
        broker.append(TOPICS.raw, 0, b"acme", usage_event(i, "acme"))
    worker = make_worker(broker, batch_size=12)
    worker.loop.sparse_batch_size = 4
    processor = worker.loop.processor
    process, sizes = processor.process, []

    def process_noting_the_size(records):
        sizes.append(len(records))
        return process(records)

    processor.process = process_noting_the_size
    worker.start()
    worker.committed_offsets(36)
    worker.stop()
    # The first reads are of the sparse size (at a start the loop cannot know): three sparse
    # batches, then one of acme's events, which is not sparse: the whole batch size again.
    assert sizes == [4, 4, 4, 4, 12, 8]
    assert sorted(ledger_ids(worker.sink)) == [f"e-{i:05d}" for i in range(36)]


def test_a_rebalance_within_a_read_drops_what_the_earlier_reads_held():
    """A read in slices keeps records across the consumer's reads; a rebalance between two of them
    seeks back to the restored positions, so those records could come again in the same batch
    (and be counted twice by the quota stage's batch path), or be of partitions revoked since.
    What the consumer returns after the rebalance is kept: it reads from the new assignment."""

    class Checkpoint:  # a batch staged and landing all along: the read goes in slices
        staged, rebalances = True, 0

        def landed(self) -> bool:
            return False

    class Source:
        def __init__(self) -> None:
            self.reads = [["a1", "a2"], ["a3"], ["b1", "b2"], ["b3"]]

        def poll(self, max_records: int, timeout_s: float) -> list[str]:
            if len(self.reads) == 2:
                checkpoint.rebalances += 1  # the rebalance runs within the third read
            return self.reads.pop(0) if self.reads else []

    checkpoint = Checkpoint()
    loop = BatchLoop(source=Source(), topics=[], processor=None, checkpoint=checkpoint, transactions=None,
                     batch_size=5, within_s=0.1, stopping=threading.Event())
    assert loop._read(0.1, 5) == ["b1", "b2", "b3"]


def test_a_worker_stopped_while_its_batch_cannot_land_commits_no_position_of_it(make_worker):
    broker = MemoryBroker(partitions=1)
    broker.append(TOPICS.raw, 0, b"acme", usage_event(0))
    sink = MemorySink()
    sink.hold()
    worker = make_worker(broker, sink=sink).start()
    worker.until(lambda: worker.counters.events_in == 1, "the batch to be processed")
    sink.stopping.set()  # the host stops the sink, then the loop
    with pytest.raises(Unlanded, match="stopping with 1 unlanded rows"):
        worker.stop()
    # Only its quota state went out (early); read again from the same positions after a restart,
    # the event gives that same state.
    assert (worker.transactions.committed, broker.group_offsets, broker.records(CHANGELOG)) == (1, {}, [])
    assert states(broker) == {"acme": cost_of(0)}


def test_an_aborted_transaction_is_rewound_and_its_events_counted_once(make_worker, plans):
    broker = MemoryBroker(partitions=2)
    fill(broker, 0, 40)
    worker = make_worker(broker, batch_size=10)
    commit, failed = worker.transactions.commit, []

    def commit_failing_after_the_first() -> None:
        if worker.transactions.committed == 1 and len(failed) < 2:  # the next two commits fail
            failed.append(1)
            worker.changelog.fail_reads = 1   # and the rewind cannot read the changelog at once
            raise TransactionFailed("injected: the transaction coordinator went away")
        commit()

    worker.transactions.commit = commit_failing_after_the_first
    worker.start()
    worker.committed_offsets(40)
    worker.stop()

    assert worker.transactions.aborted == 2
    assert states(broker) == expected_usage(40)                 # counted once, not once per attempt
    assert alerts(broker) == expected_alerts(40)                # each crossing published once
    assert ledger_revenue(worker.sink) == expected_revenue(plans, 40)  # rated once, not once per attempt
    # The ledger saw the rewound batches land again: the same events, collapsing by event_id.
    assert sorted(set(ledger_ids(worker.sink))) == [f"e-{i:05d}" for i in range(40)]
    assert len(ledger_ids(worker.sink)) > 40


def test_the_next_owner_restores_the_state_and_reads_on_from_the_committed_positions(make_worker, plans):
    broker = MemoryBroker(partitions=2)
    fill(broker, 0, 30)
    first = make_worker(broker, batch_size=8).start()
    first.committed_offsets(30)
    first.stop()
    fill(broker, 30, 64)
    second = make_worker(broker, batch_size=8)
    second.changelog.fail_reads, second.source.fail_committed = 1, 1  # a broker still restarting
    second.start()
    second.committed_offsets(64)
    second.stop()

    assert second.counters.events_in == 34                       # nothing read twice
    assert sorted(ledger_ids(first.sink) + ledger_ids(second.sink)) == [f"e-{i:05d}" for i in range(64)]
    assert states(broker) == expected_usage(64)
    assert alerts(broker) == expected_alerts(64)
    assert ledger_revenue(first.sink, second.sink) == expected_revenue(plans, 64)  # the period's tiers carried on


def test_a_rebalance_commits_the_batch_in_flight_and_restores_the_assignment(make_worker, plans):
    broker = MemoryBroker(partitions=2)
    fill(broker, 0, 24)
    worker = make_worker(broker, batch_size=6).start()
    worker.committed_offsets(24)
    worker.source.rebalance()
    fill(broker, 24, 50)
    worker.committed_offsets(50)
    worker.stop()
    assert states(broker) == expected_usage(50) and alerts(broker) == expected_alerts(50)
    assert sorted(ledger_ids(worker.sink)) == [f"e-{i:05d}" for i in range(50)]
    assert ledger_revenue(worker.sink) == expected_revenue(plans, 50)


def test_the_stream_role_publishes_ledger_blocks_that_the_sink_role_lands(make_worker, attribution):
    broker = MemoryBroker(partitions=2)
    fill(broker, 0, 40)
    # Blocks of a few rows: each batch of 9 events is cut into several.
    stream = make_worker(broker, role="stream", batch_size=9, block_bytes=2_000).start()
    stream.committed_offsets(40)
    stream.stop()
    blocks = [r.value() for r in broker.records(TOPICS.ledger)]
    assert broker.records(TOPICS.attributed) == []  # JSON only when asked for
    rows = [row for block in blocks for row in LEDGER.block_rows(block)]
    assert sorted(row["event_id"] for row in rows) == [f"e-{i:05d}" for i in range(40)]
    assert sum(row["cost_usd"] for row in rows) == sum(map(cost_of, range(40)))
    assert len(blocks) > 40 // 9 + 1 and all(len(LEDGER.block_rows(block)) < 9 for block in blocks)

    backfilled = attribution.attribute_raw(usage_event(99))
    broker.append(TOPICS.attributed, 0, b"acme", backfilled.model_dump_json().encode())
    broker.append(TOPICS.attributed, 0, b"acme", b'{"not": "a record"}')
    broker.append(TOPICS.ledger, 0, None, b"not a block")
    broker.append(TOPICS.ledger, 1, None, blocks[0][:-3])
    sink = make_worker(broker, role="sink", batch_size=16).start()
    sink.committed_offsets(len(blocks) + 2, TOPICS.ledger)
    sink.committed_offsets(2, TOPICS.attributed)
    sink.committed_offsets(len(expected_alerts(40)), TOPICS.alerts)
    sink.stop()
    assert sorted(ledger_ids(sink.sink)) == [f"e-{i:05d}" for i in range(40)] + ["e-00099"]
    assert sum(r.cost_usd for r in sink.sink.tables["usage_ledger"]) == sum(map(cost_of, [*range(40), 99]))
    assert sorted(a.event_id for a in sink.sink.tables["quota_alerts"]) == sorted(a[2] for a in expected_alerts(40))
    dead = {r.value(): dict(r.headers()) for r in broker.records(TOPICS.dlq)}
    assert [h[HEADER_REASON] for h in dead.values()] == [b"invalid_event", b"invalid_block", b"invalid_block"]
    assert dead[b"not a block"][HEADER_MESSAGE].startswith(b"not a ledger block: a block of 110 columns")
    assert dead[blocks[0][:-3]][HEADER_MESSAGE].startswith(b"not a ledger block: the block ends inside column")


def test_json_published_beside_the_blocks_is_not_landed_twice(make_worker):
    broker = MemoryBroker(partitions=2)
    fill(broker, 0, 20)
    stream = make_worker(broker, role="stream", batch_size=9, publish_json=True).start()
    stream.committed_offsets(20)
    stream.stop()
    published = [AttributedUsage.model_validate_json(r.value()) for r in broker.records(TOPICS.attributed)]
    assert sorted(r.event_id for r in published) == [f"e-{i:05d}" for i in range(20)]
    assert all(dict(r.headers()) == {HEADER_IN_BLOCK: b"1"} for r in broker.records(TOPICS.attributed))
    sink = make_worker(broker, role="sink", batch_size=64).start()
    sink.committed_offsets(20, TOPICS.attributed)
    sink.committed_offsets(len(broker.records(TOPICS.ledger)), TOPICS.ledger)
    sink.stop()
    assert sorted(ledger_ids(sink.sink)) == [f"e-{i:05d}" for i in range(20)]  # once each, from the blocks


def test_backfilled_records_on_usage_attributed_are_landed_by_the_all_role(make_worker, attribution):
    broker = MemoryBroker(partitions=1)
    record = attribution.attribute_raw(usage_event(7))
    broker.append(TOPICS.attributed, 0, b"acme", json.dumps(json.loads(record.model_dump_json())).encode())
    worker = make_worker(broker).start()
    worker.committed_offsets(1, TOPICS.attributed)
    worker.stop()
    assert ledger_ids(worker.sink) == ["e-00007"] and worker.counters.events_in == 0
    assert broker.records(TOPICS.state) == []  # quota windows counted it when it first arrived


def test_partitions_lost_get_nothing_more_written_and_are_read_again_from_the_last_commit(make_worker):
    broker = MemoryBroker(partitions=2)
    fill(broker, 0, 20)
    sink = MemorySink()
    worker = make_worker(broker, sink=sink, batch_size=100).start()
    worker.committed_offsets(20)
    sink.hold()                                  # the next batch is processed, but cannot land ...
    # ... when the worker misses its session timeout: noticed at the poll after that batch is staged.
    worker.source.lose(when=lambda: worker.counters.events_in == 30)
    fill(broker, 20, 30)
    worker.until(lambda: worker.counters.events_in == 40, "the dropped batch to be read again")
    sink.release()
    worker.committed_offsets(30)
    worker.stop()
    assert worker.counters.events_in == 40       # the dropped batch was read again
    # Each batch's early quota states and then its positions; of the batch dropped, only its early
    # states, which went out before the loss was noticed (and equal those of the batch read again).
    assert worker.transactions.committed == 2 + 1 + 2 and broker.group_offsets[(TOPICS.raw, 0)] == 15
    assert states(broker) == expected_usage(30) and alerts(broker) == expected_alerts(30)


def test_a_counted_calls_reservation_is_published_with_the_state_that_counts_it(make_worker):
    """An enforcer drops a hold as it applies the usage that counted its call: the reservation id
    travels in the window's state record of the same batch, never in an earlier one."""
    from schemas.quota import QuotaState

    broker = MemoryBroker(partitions=1)
    for i in range(6):
        event = UsageEvent.model_validate_json(usage_event(i)).model_copy(
            update={"reservation_id": f"r-{i}" if i % 2 == 0 else None})
        broker.append(TOPICS.raw, 0, b"acme", event.model_dump_json().encode())
    worker = make_worker(broker, batch_size=4).start()
    worker.committed_offsets(6)
    worker.stop()
    published = [QuotaState.model_validate_json(r.value()) for r in broker.records(TOPICS.state)]
    # Two batches (4 events, then 2), each with its reservations and the usage that counted them.
    assert [(state.settled, state.usage) for state in published] == [
        (["r-0", "r-2"], sum(map(cost_of, range(4)))), (["r-4"], sum(map(cost_of, range(6))))]


_FREED_BUFFERS = """
import sys
from streams.runtime.loop import tune_malloc
def rss_mb():
    return next(int(line.split()[1]) // 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))
tuned = tune_malloc() if sys.argv[1] == "tuned" else False
big = bytearray(8 << 20)
del big  # (glibc now takes blocks of up to 8 MiB from its heap, unless tuned)
buffers, kept = [], []
for _ in range(100):
    buffers.append(bytearray(1 << 20))  # 1 MiB, as a decompressed fetch response
    kept.append(bytearray(100_000))     # a block of the heap after it, still in use
before = rss_mb()
buffers.clear()
print(tuned, before - rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc are Linux's")
def test_large_buffers_freed_between_blocks_in_use_are_given_back_once_malloc_is_tuned():
    def freed_mb(mode: str) -> tuple[str, int]:
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
        out = subprocess.run([sys.executable, "-c", _FREED_BUFFERS, mode], capture_output=True, text=True,
                             check=True, env=env, cwd=Path(__file__).resolve().parents[2]).stdout.split()
        return out[0], int(out[1])

    assert freed_mb("plain")[1] < 10      # 100 MiB freed, and all of it still resident
    tuned, freed = freed_mb("tuned")
    assert tuned == "True" and freed >= 90


def test_a_malloc_threshold_set_in_the_environment_is_kept(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert tune_malloc() is False
