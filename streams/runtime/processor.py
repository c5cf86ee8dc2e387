"""The batch processor: records in, one ``Batch`` out. No Kafka client, no database.

``BatchProcessor.process`` takes the records of one poll, in offset order per partition, and
runs each through the stages that its topic needs:

- ``usage.raw``: attribution (validate → price → tag, ``streams.stages.attribution``), then the
  quota windows (``streams.stages.quotas``). A record that fails validation becomes a dead letter.
- ``usage.attributed`` and ``quota.alerts`` (the sink role, and role ``all`` for what
  ``costline backfill`` publishes): parsed back into ledger records and alerts.
- ``usage.ledger`` (the sink role): stream workers' ledger blocks, checked (``TableSpec.read_block``)
  and kept as they are, to be inserted as they are.

Every piece of state a stage keeps is handed to it when the processor is built (the quota
tables, through ``ChangelogTables``); the processor only carries the records between stages.
Adding a stage to the usage path means one call in ``_usage``.

What the batch produced (``Batch``) is made durable by ``streams.runtime.checkpoint``.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from confluent_kafka import KafkaError
from pydantic import ValidationError

from schemas.attributed import HEADER_IN_BLOCK, AttributedUsage
from schemas.dead_letter import Rejection
from schemas.quota import QuotaAlert
from streams.runtime.metrics import Counters
from streams.runtime.state import ChangelogTables
from streams.settings import Topics
from streams.stages.attribution import Attribution
from streams.stages.quotas import COLD_TABLES, Counted, QuotaEngine, QuotaTables, restore_entry, tenant_of
from streams.stages.revenue import stamp_fresh
from streams.storage.compiled import fast
from streams.storage.tables import LEDGER, Blocks, LedgerRow, RecordBatch

log = logging.getLogger(__name__)
#: A row's tenant (for the batch's count of tenants: in C, not a Python frame a row).
_TENANT = operator.attrgetter("tenant_id")

#: A (topic, partition) pair.
TopicPartitionKey = tuple[str, int]


class Record(Protocol):
    """What the processor reads of a consumed record: confluent-kafka's ``Message`` has these
    methods, and so has ``streams.runtime.memory.MemoryRecord``."""

    def error(self) -> KafkaError | None: ...
    def topic(self) -> str: ...
    def partition(self) -> int: ...
    def offset(self) -> int: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def timestamp(self) -> tuple[int, int]: ...
    def headers(self) -> list[tuple[str, bytes]] | None: ...


@dataclass
class Batch:
    """What one batch produced, before it is landed and committed."""

    #: The ledger's records (the stream's ``LedgerRow``s; records on the reference path and the
    #: sink's), each written into the batch's Native blocks as it is added.
    records: RecordBatch[AttributedUsage | LedgerRow]
    #: Ledger blocks read from usage.ledger (the sink role), to land as they are.
    blocks: Blocks = field(default_factory=Blocks)
    #: The quota alerts this batch's events crossed (published and landed).
    alerts: list[QuotaAlert] = field(default_factory=list)
    #: Alerts read from quota.alerts (the sink role), to land only.
    read_alerts: list[QuotaAlert] = field(default_factory=list)
    #: The latest count of each quota window the batch counted into, by window key.
    windows: dict[str, Counted] = field(default_factory=dict)
    #: The reservations whose calls the batch counted into each window, by window key (published
    #: with the window's state, so an enforcer drops a hold as it applies the usage).
    settled: dict[str, list[str]] = field(default_factory=dict)
    dead: list[tuple[Record, Rejection]] = field(default_factory=list)
    #: The quota.state keys of windows past their grace period (tombstones, after the states).
    expired: list[str] = field(default_factory=list)
    #: The next offset to read of each partition the batch read from.
    offsets: dict[TopicPartitionKey, int] = field(default_factory=dict)
    #: The changelog records of the quota keys the batch changed, and of its next usage.raw offsets.
    changelog: list[tuple[int, bytes, bytes | None]] = field(default_factory=list)
    #: Most of its tenants had one event in it (many tenants at a low rate each): the loop reads a
    #: smaller batch next (``streams.runtime.loop.SPARSE_BATCH``).
    sparse: bool = False
    #: Its quota states were queued in a transaction already (``Checkpoint.commit``: they go out
    #: before the batch lands).
    states_sent: bool = False

    def __len__(self) -> int:
        return len(self.records) + self.blocks.rows + len(self.alerts) + len(self.read_alerts) + len(self.dead)


def quota_state(topic: str, live_entries: int) -> ChangelogTables:
    """The quota stage's tables, changelogged to ``topic``, its per-tenant ones frozen by tenant beyond
    ``live_entries`` live entries (``streams.runtime.state``). (The worker, the benchmarks and the
    path tests build them here, so that they measure and test the worker's layout.)"""
    return ChangelogTables(topic, QuotaTables._fields, restore_entry, cold=COLD_TABLES, live_entries=live_entries,
                           group_of=tenant_of)


class BatchProcessor:
    """Runs the stages over a batch of records; see the module docstring."""

    def __init__(self, topics: Topics, counters: Counters, *, attribution: Attribution | None = None,
                 quotas: QuotaEngine | None = None, state: ChangelogTables | None = None,
                 block_bytes: int | None = None, one_by_one: bool = False) -> None:
        """``attribution``, ``quotas`` and ``state`` are needed to process usage.raw (roles ``all``
        and ``stream``). Each ledger row is written as its record is added, while the record is in
        the CPU's cache (see ``RecordBatch``), into blocks of ``block_bytes`` if it is given (the
        stream role's, published one a Kafka record). ``one_by_one``: the quota stage applied event by event (``QuotaEngine.apply``) and the
        ledger encoded in Python (``TableSpec.native_reference``), the reference the worker's path
        is tested and measured against."""
        if (attribution is None) != (quotas is None) or (quotas is None) != (state is None):
            raise ValueError("usage.raw needs attribution, quotas and their state together")
        self.topics, self.counters, self.block_bytes, self.one_by_one = topics, counters, block_bytes, one_by_one
        #: The usage.raw stages and the quota stage's state (None in the sink role).
        self.attribution, self.quotas, self.state = attribution, quotas, state
        #: How a record of each topic the sink role reads is parsed.
        self._parsers: dict[str, Callable[[bytes], AttributedUsage | QuotaAlert]] = {
            topics.attributed: AttributedUsage.model_validate_json, topics.alerts: QuotaAlert.model_validate_json}

    def process(self, records: Sequence[Record]) -> Batch:
        batch = Batch(records=RecordBatch(LEDGER, compiled=not self.one_by_one, block_bytes=self.block_bytes))
        now = datetime.now(UTC)
        raw = self.topics.raw
        keep = batch.records.add
        usage: list[Record] = []
        for record in records:
            error = record.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", error)
                continue
            topic = record.topic()
            batch.offsets[(topic, record.partition())] = record.offset() + 1
            if topic != raw:
                self._landed(record, batch, keep)
            elif self.one_by_one:
                self._usage(record, batch, keep, now)
            else:
                usage.append(record)
        if usage:
            self._usage_batch(usage, batch, keep, now)
        if self.quotas is not None:
            self.quotas.end_batch()
            positions = {p: offset for (topic, p), offset in batch.offsets.items() if topic == raw}
            batch.changelog = self.state.drain(positions)  # this batch's changes only
        return batch

    def _usage_batch(self, records: list[Record], batch: Batch, keep: Callable[[AttributedUsage | LedgerRow], None],
                     now: datetime) -> None:
        """The batch's usage events through every stage: attribution event by event, then the quota
        windows for the whole batch at once (``QuotaEngine.apply_batch``, which gives what
        ``_usage`` event by event gives)."""
        c = self.counters
        counted: list[Record] = []
        attributed: list[AttributedUsage | LedgerRow] = []
        for record in records:
            out = self._attributed(record, now)
            if isinstance(out, Rejection):
                batch.dead.append((record, out))
            else:
                counted.append(record)
                attributed.append(out)
        if len(set(map(_TENANT, attributed))) * 2 > len(attributed):
            batch.sparse = True
            # Most tenants have one event in this batch (as with many tenants at a low rate each):
            # no window has events to sum, and event by event does without the batch path's
            # bookkeeping, which then costs more than it saves (100,000 distinct tenants: 9% fewer
            # events/s end to end).
            for record, out in zip(counted, attributed, strict=True):
                self._counted(record, out, batch, keep, now)
            return
        outcome = self.quotas.apply_batch(attributed, [r.partition() for r in counted], [r.offset() for r in counted],
                                          now)  # stage 4
        failed = set(outcome.failed)
        c.quota_errors += len(failed)
        # Each row stamped with its rating and kept, in order (in C): one whose quota update failed
        # still reaches the ledger (the error is counted); a duplicate is not landed again (see ``_usage``).
        duplicates, late = fast.keep_outcomes(attributed, outcome.events, failed, keep)
        c.duplicates += duplicates
        c.late += late
        batch.alerts.extend(outcome.alerts)
        batch.expired.extend(outcome.expired)
        batch.windows.update(outcome.counted)
        for key, reservations in outcome.settled.items():
            batch.settled.setdefault(key, []).extend(reservations)

    def _attributed(self, record: Record, now: datetime) -> AttributedUsage | LedgerRow | Rejection:
        """Stages 1-3 for one usage event; a bug on one event makes it a dead letter, never stops the stream."""
        c = self.counters
        c.events_in += 1
        try:
            # The stream's path makes ledger rows (priced in integers, written in C); the reference
            # path makes the records they are held to.
            out = self.attribution.attribute_raw(record.value(), now) if self.one_by_one else \
                self.attribution.row_raw(record.value(), now)
        except Exception as exc:  # noqa: BLE001 - a bug on one event must not stop the stream
            log.exception("processing failed for %s[%s]@%s", record.topic(), record.partition(), record.offset())
            return Rejection(reason="processing_error", message=f"{type(exc).__name__}: {exc}"[:500])
        if not isinstance(out, Rejection):
            c.attributed += 1
            c.unpriced += not out.priced
        return out

    def _usage(self, record: Record, batch: Batch, keep: Callable[[AttributedUsage | LedgerRow], None], now: datetime) -> None:
        """One usage event through every stage, in order (the reference path: ``one_by_one``)."""
        out = self._attributed(record, now)  # stages 1-3
        if isinstance(out, Rejection):
            batch.dead.append((record, out))
            return
        self._counted(record, out, batch, keep, now)

    def _counted(self, record: Record, out: AttributedUsage | LedgerRow, batch: Batch,
                 keep: Callable[[AttributedUsage | LedgerRow], None], now: datetime) -> None:
        """Stage 4 for one attributed event (``QuotaEngine.apply``), then the event is kept."""
        c = self.counters
        partition, offset = record.partition(), record.offset()
        try:
            quota = self.quotas.apply(out, partition, offset, now)  # stage 4
        except Exception:  # noqa: BLE001 - the event still reaches the ledger; the error is counted
            c.quota_errors += 1
            log.exception("quota update failed for %s[%s]@%s", record.topic(), partition, offset)
        else:
            if quota.duplicate:
                # Not landed again: the ledger keeps the copy that the quota windows and the revenue
                # counted (landed with its batch, before that batch's commit). Landed, the copy would
                # replace it (a later attributed_at) without its revenue.
                c.duplicates += 1
                return
            c.late += quota.late
            stamp_fresh(out, quota.rated, quota.late)  # (``out`` is this batch's own, not yet kept)
            batch.alerts.extend(quota.alerts)
            if quota.expired:
                batch.expired.extend(quota.expired)
            reservation = out.reservation_id
            for counted in quota.counted:
                batch.windows[counted.ref.key] = counted
                if reservation is not None:
                    batch.settled.setdefault(counted.ref.key, []).append(reservation)
        keep(out)

    def _landed(self, record: Record, batch: Batch, keep: Callable[[AttributedUsage | LedgerRow], None]) -> None:
        """A record of usage.attributed, quota.alerts or usage.ledger, for ClickHouse; one that does
        not parse is dead-lettered with the reason."""
        if record.topic() == self.topics.ledger:
            block = record.value() or b""
            try:
                rows = LEDGER.read_block(block)
            except ValueError as exc:
                batch.dead.append((record, Rejection(reason="invalid_block", message=f"not a ledger block: {exc}")))
                return
            batch.blocks.add(block, f"{record.topic()}:{record.partition()}:{record.offset()}", rows)
            return
        if record.topic() == self.topics.attributed and (HEADER_IN_BLOCK, b"1") in (record.headers() or ()):
            return  # its row was landed from its stream worker's ledger block
        parse = self._parsers.get(record.topic())
        if parse is None:
            raise ValueError(f"no stage reads topic {record.topic()!r}")
        try:
            parsed = parse(record.value() or b"")
        except ValidationError as exc:
            batch.dead.append((record, Rejection(
                reason="invalid_event", message=f"not a {record.topic()} record: {exc.errors()[0]['msg']}")))
            return
        if isinstance(parsed, QuotaAlert):
            batch.read_alerts.append(parsed)
        else:
            keep(parsed)
