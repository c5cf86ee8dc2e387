"""A worker's batch loop in memory: the real processor, checkpoint and loop on the seams of
``streams.runtime.memory``, with a broker whose logs the tests read back."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from schemas.quota import QuotaAlert, QuotaState
from schemas.usage import TokenUsage, UsageEvent
from streams.messaging.topics import LEDGER_BLOCK_BYTES
from streams.operations.processes import wait_for
from streams.runtime.checkpoint import Checkpoint
from streams.runtime.loop import BatchLoop
from streams.runtime.memory import MemoryBroker, MemoryChangelog, MemorySink, MemorySource, MemoryTransactions
from streams.runtime.metrics import Counters
from streams.runtime.processor import BatchProcessor
from streams.runtime.state import ChangelogTables
from streams.runtime.worker import role_topics
from streams.settings import Topics
from streams.stages.attribution import Attribution
from streams.stages.plans import Plans
from streams.stages.quotas import QuotaEngine, QuotaTables, restore_entry

TOPICS = Topics.with_prefix("")
CHANGELOG = "costline-quota-changelog"
#: A daily spend limit of 1 USD per tenant with alerts at 50% and 100%, and a rate card whose
#: tiers the tests' events cross (so each event's revenue depends on everything counted before it).
PLANS = ("default_plan: team\n"
         "plans: {team: {limits: [{id: daily-spend, metric: cost_usd, window: day, limit: 1, thresholds: [50, 100]}],\n"
         "  rate_card: {charges: [{id: tokens, metric: tokens, per: 1000, price: graduated, free_units: 20000,\n"
         "    tiers: [{up_to: 100, unit_amount: '0.01'}, {up_to: 300, unit_amount: '0.008'}, {unit_amount: '0.005'}]}]}}}\n")
AT = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(hours=1)


def cost_of(i: int) -> Decimal:
    """gpt-4o at $2.50 per million input tokens and $10 per million output tokens."""
    return (Decimal(10_000 + 1_000 * (i % 7)) * Decimal("2.5") + Decimal(100 * (i % 5)) * 10) / 1_000_000


def usage_event(i: int, tenant: str = "acme") -> bytes:
    return UsageEvent(event_id=f"e-{i:05d}", timestamp=AT + timedelta(seconds=i), tenant_id=tenant, provider="openai",
                      model="gpt-4o", usage=TokenUsage(input_tokens=10_000 + 1_000 * (i % 7),
                                                       output_tokens=100 * (i % 5))).model_dump_json().encode()


@dataclass
class Worker:
    """One worker's loop and what it is made of."""

    broker: MemoryBroker
    role: str
    sink: MemorySink | None
    batch_size: int
    plans: Plans
    attribution: Attribution
    counters: Counters = field(default_factory=Counters)
    #: Role ``stream``: where its ledger blocks are cut, and whether it publishes JSON too.
    block_bytes: int = LEDGER_BLOCK_BYTES
    publish_json: bool = False
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.source = MemorySource(self.broker)
        self.transactions = MemoryTransactions(self.broker)
        self.changelog = MemoryChangelog(self.broker)
        reads_raw = self.role in ("all", "stream")
        self.state = ChangelogTables(CHANGELOG, QuotaTables._fields, restore_entry) if reads_raw else None
        self.quotas = QuotaEngine(self.plans, lambda p: QuotaTables(**self.state.views(p))) if reads_raw else None
        self.processor = BatchProcessor(TOPICS, self.counters, attribution=self.attribution if reads_raw else None,
                                        quotas=self.quotas, state=self.state,
                                        block_bytes=self.block_bytes if self.role == "stream" else None)
        self.checkpoint = Checkpoint(
            topics=TOPICS, source=self.source, transactions=self.transactions, counters=self.counters,
            stopping=self.stopping, sink=self.sink, state=self.state, changelog=self.changelog if reads_raw else None,
            on_restore=self.quotas.forget_partitions if self.quotas else lambda: None,
            publish_blocks=self.role == "stream", publish_json=self.role == "stream" and self.publish_json)
        self.loop = BatchLoop(source=self.source, topics=role_topics(self.role, TOPICS), processor=self.processor, checkpoint=self.checkpoint,
                              transactions=self.transactions, batch_size=self.batch_size, within_s=0.01,
                              stopping=self.stopping)
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> Worker:
        def run() -> None:
            try:
                self.loop.run()
            except BaseException as exc:  # noqa: BLE001 - re-raised by stop()
                self.error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def until(self, condition, what: str, timeout_s: float = 20.0) -> None:
        wait_for(lambda: condition() or self.error is not None, timeout_s, what, interval_s=0.01)
        if self.error is not None:
            raise self.error

    def committed_offsets(self, total: int, topic: str = TOPICS.raw) -> None:
        """Waits until the group's offsets of ``topic`` add up to ``total`` records."""
        self.until(lambda: sum(o for (t, _), o in self.broker.group_offsets.items() if t == topic) >= total,
                   f"{total} records of {topic} committed")

    def stop(self) -> None:
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(10)
            assert not self._thread.is_alive(), "the loop did not stop"
        self.source.close()
        if self.error is not None:
            raise self.error


@pytest.fixture
def plans(tmp_path: Path) -> Plans:
    path = tmp_path / "plans.yaml"
    path.write_text(PLANS)
    return Plans.from_file(path)


@pytest.fixture
def make_worker(plans, attribution):
    made: list[Worker] = []

    def make(broker: MemoryBroker, role: str = "all", sink: MemorySink | None = None, batch_size: int = 4,
             **options) -> Worker:
        worker = Worker(broker, role, sink if sink is not None or role == "stream" else MemorySink(), batch_size,
                        plans, attribution, **options)
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.stopping.set()
        if worker.sink is not None:
            worker.sink.release()


def states(broker: MemoryBroker) -> dict[str, Decimal]:
    """The usage of each tenant's window (one a tenant in these tests) in its latest record on
    quota.state, the record an enforcer or a compacted topic keeps. Each window's records must never
    go down: a state published again (an aborted batch's, an early one) repeats or passes the one before."""
    latest: dict[bytes, QuotaState] = {}
    for record in broker.records(TOPICS.state):  # (a key's records are on one partition, in order)
        if record.value() is None:
            latest.pop(record.key(), None)  # a window past its grace period
            continue
        state = QuotaState.model_validate_json(record.value())
        before = latest.get(record.key())
        assert before is None or state.usage >= before.usage, f"{record.key()!r} went down: {before} → {state}"
        latest[record.key()] = state
    by_tenant: dict[str, Decimal] = {}
    for state in latest.values():
        assert state.tenant_id not in by_tenant, "one window a tenant"
        by_tenant[state.tenant_id] = state.usage
    return by_tenant


def alerts(broker: MemoryBroker) -> list[tuple[str, Decimal, str]]:
    """The alerts published on quota.alerts, in order per partition: (tenant, threshold, event id)."""
    return [(a.tenant_id, a.threshold_percent, a.event_id)
            for a in (QuotaAlert.model_validate_json(r.value()) for r in broker.records(TOPICS.alerts))]
