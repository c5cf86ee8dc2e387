"""The processor and the loop's process policy, one part at a time."""

from __future__ import annotations

import gc
from datetime import timedelta
from types import SimpleNamespace

import pytest
from confluent_kafka import KafkaError

from schemas.usage import UsageEvent
from streams.runtime import loop as loop_module
from streams.runtime.checkpoint import Unlanded
from streams.runtime.loop import EXIT_FAILED, EXIT_UNLANDED, LoopThread
from streams.runtime.memory import MemoryBroker, MemoryRecord
from streams.runtime.metrics import Counters, render
from streams.runtime.processor import BatchProcessor
from streams.storage.sink import SinkStats
from tests.runtime.conftest import AT, TOPICS, usage_event


class ErrorRecord(MemoryRecord):
    """What a consumer hands over in place of a record when a fetch fails."""

    def __new__(cls, code: int):
        record = super().__new__(cls)
        object.__setattr__(record, "_code", code)
        return record

    def __init__(self, code: int) -> None:
        super().__init__(TOPICS.raw, 0, -1, None, None)

    def error(self) -> KafkaError:
        return KafkaError(self._code)


def test_consumer_errors_are_skipped_and_failures_of_one_event_do_not_stop_the_batch(make_worker, monkeypatch):
    """The reference path (event by event): a quota failure is the one event's."""
    broker = MemoryBroker()
    worker = make_worker(broker)
    worker.processor.one_by_one = True
    good = broker.append(TOPICS.raw, 0, b"acme", usage_event(0))
    boom = broker.append(TOPICS.raw, 0, b"acme", usage_event(1))
    quota_bug = broker.append(TOPICS.raw, 0, b"acme", usage_event(2))
    attribute_raw, apply = worker.attribution.attribute_raw, worker.quotas.apply

    def attribute_failing_on_the_second(value, now=None):
        if value == boom.value():
            raise ZeroDivisionError("a bug")
        return attribute_raw(value, now)

    def apply_failing_on_the_third(record, partition, offset, now=None):
        if offset == quota_bug.offset():
            raise KeyError("another bug")
        return apply(record, partition, offset, now)

    monkeypatch.setattr(worker.processor, "attribution", SimpleNamespace(attribute_raw=attribute_failing_on_the_second))
    monkeypatch.setattr(worker.quotas, "apply", apply_failing_on_the_third)
    batch = worker.processor.process([ErrorRecord(KafkaError._PARTITION_EOF), good, ErrorRecord(KafkaError._TRANSPORT),
                                      boom, quota_bug])
    assert [r.event_id for r in batch.records] == ["e-00000", "e-00002"]  # a quota failure still reaches the ledger
    [(record, rejection)] = batch.dead
    assert record is boom and (rejection.reason, rejection.message) == ("processing_error", "ZeroDivisionError: a bug")
    c = worker.counters
    assert (c.events_in, c.attributed, c.quota_errors) == (3, 2, 1)
    assert batch.offsets == {(TOPICS.raw, 0): 3} and len(batch) == 3


def test_in_a_batch_a_quota_failure_is_the_tenants_and_its_events_still_reach_the_ledger(make_worker, monkeypatch):
    broker = MemoryBroker()
    worker = make_worker(broker)
    records = [broker.append(TOPICS.raw, 0, tenant.encode(), usage_event(i, tenant))
               for i, tenant in enumerate(["acme", "globex", "acme", "globex"])]
    count_group = worker.quotas._count_group

    def failing_for_acme(tenant, *args):
        if tenant == "acme":
            raise KeyError("a bug")
        return count_group(tenant, *args)

    monkeypatch.setattr(worker.quotas, "_count_group", failing_for_acme)
    batch = worker.processor.process(records)
    assert [r.event_id for r in batch.records] == ["e-00000", "e-00001", "e-00002", "e-00003"]
    assert [r.revenue_usd is None for r in batch.records] == [True, False, True, False]  # acme's were not rated
    assert {counted.ref.tenant for counted in batch.windows.values()} == {"globex"}
    c = worker.counters
    assert (c.events_in, c.attributed, c.quota_errors) == (4, 4, 2)


def test_in_a_batch_late_events_are_kept_stamped_late_and_copies_are_dropped_and_counted(make_worker):
    """The batch path's last step (``fast.keep_outcomes``): a copy of an event already in the batch
    is not kept and counts as a duplicate; an event 40 days behind its tenant's watermark (its
    windows and billing period closed, whatever the day) is kept, not rated, stamped late and
    counted late; the others are kept and rated, in order."""
    broker = MemoryBroker()
    worker = make_worker(broker)
    late = UsageEvent.model_validate_json(usage_event(9)).model_copy(
        update={"event_id": "e-late", "timestamp": AT - timedelta(days=40)}).model_dump_json().encode()
    records = [broker.append(TOPICS.raw, 0, b"acme", value)
               for value in (usage_event(0), usage_event(1), usage_event(1), late, usage_event(2))]
    batch = worker.processor.process(records)
    assert [(r.event_id, r.late) for r in batch.records] == [
        ("e-00000", False), ("e-00001", False), ("e-late", True), ("e-00002", False)]
    assert [r.revenue_usd is not None for r in batch.records] == [True, True, False, True]
    c = worker.counters
    assert (c.events_in, c.attributed, c.duplicates, c.late, c.quota_errors) == (5, 5, 1, 1, 0)


def test_a_processor_of_usage_needs_attribution_quotas_and_state_together(attribution):
    with pytest.raises(ValueError, match="together"):
        BatchProcessor(TOPICS, Counters(), attribution=attribution)


def test_a_record_of_a_topic_no_stage_reads_is_a_bug_not_a_dead_letter():
    processor = BatchProcessor(TOPICS, Counters())
    with pytest.raises(ValueError, match="no stage reads topic 'elsewhere'"):
        processor.process([MemoryRecord("elsewhere", 0, 0, None, b"{}")])


class FakeExit(BaseException):
    pass


@pytest.mark.parametrize(("failure", "status"), [(Unlanded("stopping with 3 unlanded rows"), EXIT_UNLANDED),
                                                 (RuntimeError("a bug"), EXIT_FAILED)])
def test_the_loop_thread_ends_the_process_when_the_loop_cannot_go_on(make_worker, monkeypatch, failure, status):
    exits: list[int] = []

    def exit_(code: int) -> None:
        exits.append(code)
        raise FakeExit

    monkeypatch.setattr(loop_module.os, "_exit", exit_)
    worker = make_worker(MemoryBroker())

    def fail() -> None:
        raise failure

    monkeypatch.setattr(worker.loop, "run", fail)
    closed: list[bool] = []
    thread = LoopThread(worker.loop, lambda: closed.append(True))
    thresholds = gc.get_threshold()
    try:
        thread._main()
    except FakeExit:
        pass
    finally:
        gc.set_threshold(*thresholds)
    assert exits == [status] and closed == []


def test_the_loop_thread_runs_the_loop_until_stopped_then_closes_the_clients(make_worker):
    broker = MemoryBroker()
    broker.append(TOPICS.raw, 0, b"acme", usage_event(0))
    worker = make_worker(broker)
    closed: list[bool] = []
    thread = LoopThread(worker.loop, lambda: closed.append(True))
    thresholds = gc.get_threshold()
    try:
        thread.start()
        assert gc.get_threshold() == (200_000, 5, 100)
        worker.committed_offsets(1)
        thread.stop(timeout_s=10)
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
    assert closed == [True] and worker.transactions.committed == 2  # the early quota state, then the positions


def test_metrics_render_counters_sink_figures_and_lag():
    counters = Counters(events_in=7, dead_lettered=1)
    counters.sinks["usage_ledger"] = SinkStats(landed=6, batches=2, errors=1, batch_seconds_sum=0.5,
                                               batch_seconds_max=0.25)
    counters.processed(TOPICS.raw, 0, 5)
    text = render(counters, {(TOPICS.raw, 0): 10, (TOPICS.raw, 1): 3})
    for line in ["costline_events_in_total 7", "costline_dead_lettered_total 1",
                 'costline_rows_landed_total{table="usage_ledger"} 6',
                 'costline_clickhouse_errors_total{table="usage_ledger"} 1',
                 'costline_clickhouse_failing_seconds{table="usage_ledger"} 0',
                 'costline_batch_seconds_sum{table="usage_ledger"} 0.5',
                 'costline_batch_seconds_count{table="usage_ledger"} 2',
                 'costline_batch_seconds_max{table="usage_ledger"} 0.25',
                 'costline_consumer_lag{topic="usage.raw",partition="0"} 4',
                 'costline_consumer_lag{topic="usage.raw",partition="1"} 3']:
        assert line in text.splitlines(), line
    assert counters.health()["sinks"]["usage_ledger"]["landed"] == 6
