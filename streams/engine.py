"""The hot path, in batches: usage.raw → validate → price → tag → quotas → ClickHouse.

One thread of the worker process runs a batch loop on a confluent-kafka consumer and a
transactional producer. Each batch of up to ``sink_batch`` records (or whatever has arrived
``sink_within_s`` after the previous batch was read) goes through the same plain functions as
before, record by record, and then:

1. lands in ClickHouse (role ``all``: ledger and alerts; retried until it lands), or is kept for
   ``usage.attributed`` (role ``stream``, for a separate sink worker);
2. in one Kafka transaction: its dead letters, alerts, latest quota state per window, the
   changelog of the quota keys it changed, the attributed records (role ``stream``), and the
   next source offset of each partition (in the changelog too).

Step 1 is encoded on this thread and sent by the ClickHouse writer's thread while this thread
processes the next batch (chDB runs without the GIL); step 2 follows once the batch has landed,
before the next batch starts landing, and before the next batch is processed when it has landed
by the time that batch is read (a stream below full speed). This thread writes the transaction's
records; its commit, a wait on the brokers, runs on a thread of its own while this one reads and
processes on, and is waited for before the next transaction begins. A rebalance commits the
batch in flight before it gives the partitions up.

The transaction makes the quota state, the alerts and the positions move together: a worker
that dies mid-batch leaves nothing of that batch visible to ``read_committed`` readers, and
whoever takes its partitions restores the quota tables as of the last committed batch
(``streams.state``) and reads on from the position committed with them. The consumer group's
offsets are committed after each transaction, for lag monitoring and as the start of a
partition that has no position in the changelog yet. (The offsets are not committed through
the transaction: librdkafka's ``send_offsets_to_transaction`` can block forever once the group
coordinator's broker has restarted, confluentinc/librdkafka#5456 and #5511.) ClickHouse rows of a batch that landed but was not
committed are written again and collapse by ``event_id`` (the ledger is a ReplacingMergeTree).

Why not a Faust agent: Faust hands each record through its consumer thread, conductor and
stream iterator one by one, with a few asyncio tasks per record; on this design's 2-core
reference machine an agent that does nothing at all peaks at about 14,000 records/s, below the
throughput this stage needs. Faust still hosts the worker (web endpoints, the sink role,
start-up and shutdown); this loop runs as a service of the Faust app.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from schemas.attributed import AttributedUsage
from schemas.dead_letter import Rejection, dead_letter_headers
from schemas.quota import QuotaAlert
from schemas.usage import epoch_ms
from streams.metrics import Counters
from streams.pipeline import Enricher, attribute_raw
from streams.plans import Plans
from streams.quotas import QuotaEngine, WindowRef
from streams.settings import Settings
from streams.sink import ALERTS, LEDGER, Backoff, Encoded, RecordBatch, Sink, SinkStats, land
from streams.state import ChangelogTables
from streams.topics import MAX_RECORD_BYTES, changelog_topic

log = logging.getLogger(__name__)

#: Waits between attempts to restore the last committed state after an aborted batch: 0.5 s, doubling, up to 5 s.
_REWIND_BACKOFF = Backoff(first_s=0.5, max_s=5.0)
#: Exit status of a worker stopped while a batch could not be written (nothing was committed).
EXIT_UNLANDED = 75
#: Exit status of a worker whose batch loop met an error it cannot recover from.
EXIT_FAILED = 70


def transactional_id(settings: Settings) -> str:
    """Stable across restarts of the same worker, so a restarted worker fences its predecessor
    (whose open transaction is aborted at once instead of after the transaction timeout)."""
    return f"{settings.app_id}-engine-{socket.gethostname()}-{settings.web_port}"


def _while_retriable(call: Callable[[float], None]) -> None:
    """Calls a transactional producer method (with a 30 s timeout) until it succeeds or fails with
    an error that retrying cannot fix."""
    while True:
        try:
            call(30)
            return
        except KafkaException as exc:
            if not exc.args[0].retriable():
                raise


def _in_background(call: Callable[[], None]) -> Future[None]:
    """Runs ``call`` on a new daemon thread (a commit left hanging does not hold up the process's exit)."""
    future: Future[None] = Future()

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(exc)
        else:
            future.set_result(None)

    threading.Thread(target=run, name="costline-commit", daemon=True).start()
    return future


def tune_gc() -> None:
    """Keeps Python's cycle collector from taking a fifth of the hot path's time.

    The batch loop allocates a few hundred objects per event, and the default thresholds then run
    a collection every 700 net allocations, walking the younger generations each time and, every
    100 of those, the whole heap (every quota window and memo). Almost nothing here is freed by the
    collector (records and rows are freed by reference counting), so: what exists once the worker
    has started moves to the permanent generation (``gc.freeze``), and the youngest generation is
    collected after 200,000 net allocations, more than a batch keeps alive (5,000 events hold
    about 75,000 objects), so that a batch is mostly freed before any collection walks it. The
    middle generation is collected every 5 of those, so that it holds at most about a million
    objects when walked, as it did with thresholds of 10,000 and 100 before.

    Measured, 1,000 tenants: no collection in 400,000 events (2.35 µs per event before, with
    10,000); bench/e2e.py over 3 interleaved pairs, 15,101–15,990 events/s and 7.3–7.8 CPU s per
    100k against 13,932–14,330 and 7.6–8.4. 100,000 distinct tenants, 200,000 events: 3.9 µs per
    event in collections against 7.6, the longest pause 177 ms against 103 ms.
    """
    gc.freeze()
    gc.set_threshold(200_000, 5, 100)


@dataclass
class Batch:
    """What one batch produced, before it is landed and committed."""

    records: RecordBatch[AttributedUsage] = field(default_factory=lambda: RecordBatch(LEDGER))
    alerts: list[QuotaAlert] = field(default_factory=list)
    #: The latest (usage, as of) of each quota window the batch counted into, by window key.
    windows: dict[str, tuple[WindowRef, Decimal, datetime]] = field(default_factory=dict)
    dead: list[tuple[Message, Rejection]] = field(default_factory=list)
    offsets: dict[int, int] = field(default_factory=dict)
    #: The changelog records of the quota keys the batch changed, and of its next offsets.
    changelog: list[tuple[int, bytes, bytes | None]] = field(default_factory=list)


class Rewind(Exception):
    """The batch's transaction was aborted: restore the partitions and read them again."""


class BatchEngine:
    def __init__(self, settings: Settings, enricher: Enricher, plans: Plans, counters: Counters,
                 sink: Sink | None, insert_wrapper: Callable[[Any], Any] | None = None) -> None:
        if settings.role == "all" and sink is None:
            raise ValueError("role all lands in ClickHouse and needs its clients")
        self.settings = settings
        self.enricher = enricher
        self.counters = counters
        #: Role ``stream`` publishes usage.attributed instead of writing ClickHouse.
        self.sink = sink if settings.role == "all" else None
        self.wrap = insert_wrapper or (lambda insert: insert)
        self.topics = settings.topics
        self.state = ChangelogTables(changelog_topic(settings))
        self.quotas = QuotaEngine(plans, *(self.state.tables.values()))
        self.stopping = threading.Event()
        self.assigned: set[int] = set()
        #: Latest high watermark per (topic, partition), for the consumer-lag metric.
        self.highwaters: dict[tuple[str, int], int] = {}
        self._thread: threading.Thread | None = None
        #: The batch processed last, landing but not committed yet, and its landing.
        self._pending: tuple[Batch, Future[bool] | None] | None = None
        #: The batch whose transaction is being committed, and that commit (on a thread of its own).
        self._committing: tuple[Batch, Future[None]] | None = None
        servers = settings.kafka_bootstrap_servers
        self.consumer = Consumer({
            "bootstrap.servers": servers, "group.id": settings.app_id, "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "isolation.level": "read_committed",
            # A fetch response holds about two batches of typical events (5,000 × ~700 bytes) or any one
            # record up to the largest accepted, and the prefetched queue about two batches. Larger
            # buffers did not read faster, and they count in RSS: bench/e2e.py peak RSS 660-673 MB
            # with fetch.max.bytes 32 MB and a 16 MB queue, 634-636 MB with these, at 14.8-15.0k events/s.
            "fetch.max.bytes": MAX_RECORD_BYTES + 65_536, "max.partition.fetch.bytes": MAX_RECORD_BYTES + 65_536,
            "queued.max.messages.kbytes": 8 * 1024,
            # Eager rebalancing (every partition revoked, then the new set assigned and restored).
            "partition.assignment.strategy": "range", "log_level": 3, "logger": logging.getLogger("librdkafka"),
        })
        self.producer = self._new_producer()

    def _new_producer(self) -> Producer:
        """The transactional producer (``init_transactions`` is called before its first use)."""
        return Producer({
            "bootstrap.servers": self.settings.kafka_bootstrap_servers,
            "transactional.id": transactional_id(self.settings),
            "transaction.timeout.ms": 30_000, "linger.ms": 5, "compression.type": "lz4",
            "partitioner": "murmur2_random", "message.max.bytes": MAX_RECORD_BYTES + 65_536,
            "log_level": 3, "logger": logging.getLogger("librdkafka"),
        })

    # ---- lifecycle (called from the Faust service) ------------------------------------------

    def start(self) -> None:
        tune_gc()
        self._thread = threading.Thread(target=self._run, name="costline-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 60.0) -> None:
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        try:
            self.producer.init_transactions(30)
            self.consumer.subscribe([self.topics.raw], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                    on_lost=self._on_revoke)
            within = self.settings.sink_within_s
            read_at = time.monotonic()
            while not self.stopping.is_set():
                # A batch waits for records at most ``within`` from when the last one was read: records
                # that arrived while that one was processed are taken at once, not after another wait.
                # bench/e2e.py at 8,000 events/s, 2 interleaved pairs: event → queryable p50 198-250 ms
                # against 362-514, event → quota state p99 473-681 ms against 892-1,026.
                wait = max(0.0, read_at + within - time.monotonic())
                messages = self.consumer.consume(self.settings.sink_batch, timeout=wait)
                read_at = time.monotonic()
                try:
                    if self._landed():
                        self._finish()  # batch N has landed already: its quota state need not wait for N+1
                    # Else batch N+1 is processed while batch N lands (ClickHouse runs without the GIL).
                    batch = self.apply(messages) if messages else None
                    self._finish()
                except Rewind:
                    self._rewind()  # the batch read after it is dropped with it: it is read again
                    continue
                if batch is not None:
                    self._pending = (batch, self._start_landing(batch))
            self._finish()
            self._settle()
        except Rewind:
            pass  # stopping: whatever was not committed is read again by the next owner
        except Exception:  # noqa: BLE001 - the worker must not go on half alive
            log.exception("the batch loop failed; exiting so that a supervisor restarts the worker")
            os._exit(EXIT_FAILED)
        self.consumer.close()
        self.producer.flush(10)

    # ---- rebalances --------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        numbers = [tp.partition for tp in partitions]
        self.assigned.update(numbers)
        started = time.monotonic()
        read = self.state.restore(self.settings.kafka_bootstrap_servers, numbers)
        self.quotas.forget_partitions()
        for tp in partitions:  # start where the restored state ends (else the group's committed offset)
            if tp.partition in self.state.offsets:
                tp.offset = self.state.offsets[tp.partition]
        consumer.assign(partitions)
        log.info("assigned %s[%s]: restored %d quota records in %.2fs", self.topics.raw, numbers, read,
                 time.monotonic() - started)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        numbers = [tp.partition for tp in partitions]
        try:
            self._finish()  # the batch landing now still belongs to this worker: commit it first
            self._settle()
        except Rewind:
            pass  # not committed: the partitions' next owner reads it again
        self.assigned.difference_update(numbers)
        self.state.clear()  # eager rebalancing: every partition is revoked, the next assignment restored
        self.quotas.forget_partitions()
        log.info("revoked %s[%s]", self.topics.raw, numbers)

    def _rewind(self) -> None:
        """After an aborted transaction: the state and positions as of the last committed batch.
        Tried again while the cluster cannot answer (an abort usually means a broker went away)."""
        attempt = 0
        while True:
            try:
                self._restore_positions()
                return
            except KafkaException as exc:
                wait = _REWIND_BACKOFF.delay(attempt)
                log.warning("restoring the last committed state failed (%s); retrying in %.1fs", exc.args[0], wait)
                attempt += 1
                if self.stopping.wait(wait):
                    raise Rewind from exc  # stopping: nothing of this is committed; the next owner reads it

    def _restore_positions(self) -> None:
        partitions = [TopicPartition(self.topics.raw, p) for p in sorted(self.assigned)]
        self.state.restore(self.settings.kafka_bootstrap_servers, self.assigned)
        self.quotas.forget_partitions()
        for tp in self.consumer.committed(partitions, timeout=30):
            if tp.partition in self.state.offsets:
                self.consumer.seek(TopicPartition(tp.topic, tp.partition, self.state.offsets[tp.partition]))
            elif tp.offset >= 0:
                self.consumer.seek(tp)
            else:
                self.consumer.seek(TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING))  # nothing committed

    # ---- one batch ---------------------------------------------------------------------------

    def _landed(self) -> bool:
        """Whether a batch is pending and needs no more waiting to be committed."""
        return self._pending is not None and (self._pending[1] is None or self._pending[1].done())

    def _finish(self) -> None:
        """Waits for the pending batch to land, then writes its transaction and starts committing
        it; first waits for the commit before it (raises ``Rewind`` if either was aborted). A stop
        while the batch cannot land exits the process (``EXIT_UNLANDED``)."""
        self._settle()
        if self._pending is None:
            return
        batch, landing = self._pending
        self._pending = None
        if landing is not None and not landing.result():
            self._abandon(batch)
        self._write_transaction(batch)
        self._committing = (batch, _in_background(lambda: _while_retriable(self.producer.commit_transaction)))

    def _settle(self) -> None:
        """Waits for the transaction being committed; once it is, commits the consumer group's offsets
        and counts the batch. If it was aborted, the pending batch is dropped with it (both are read
        again) and ``Rewind`` raised.

        The commit waits on the brokers (librdkafka flushes the batch's records, then ends the
        transaction), 10-17 ms a batch here, without the GIL. On a thread of its own it overlaps
        reading and processing the next batch instead of holding up this thread."""
        if self._committing is None:
            return
        batch, commit = self._committing
        self._committing = None
        try:
            commit.result()
        except KafkaException as exc:
            self._pending = None  # it may land in the meantime: landed again, its rows collapse by event_id
            self._abort_after(exc)
        self._committed(batch)

    def apply(self, messages: list[Message]) -> Batch:
        """Validates, prices, tags and counts each record into the quota tables, in offset order."""
        batch = Batch()
        now = datetime.now(UTC)
        max_future = timedelta(seconds=self.settings.max_future_s)
        max_bytes = self.settings.max_event_bytes
        c = self.counters
        # Role ``all`` reads each record's ledger row now, while it is in cache (see ``RecordBatch``).
        keep = batch.records.add if self.sink is not None else batch.records.append
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", error)
                continue
            partition, offset = message.partition(), message.offset()
            batch.offsets[partition] = offset + 1
            c.events_in += 1
            try:
                out = attribute_raw(message.value(), self.enricher, now=now, max_future=max_future,
                                    max_bytes=max_bytes)
            except Exception as exc:  # noqa: BLE001 - a bug on one event must not stop the stream
                log.exception("processing failed for %s[%s]@%s", message.topic(), partition, offset)
                out = Rejection(reason="processing_error", message=f"{type(exc).__name__}: {exc}"[:500])
            if isinstance(out, Rejection):
                batch.dead.append((message, out))
                continue
            c.attributed += 1
            c.unpriced += not out.priced
            self.state.partition = partition
            try:
                quota = self.quotas.apply(out, partition, offset)
            except Exception:  # noqa: BLE001 - the event still reaches the ledger; the error is counted
                c.quota_errors += 1
                log.exception("quota update failed for %s[%s]@%s", message.topic(), partition, offset)
            else:
                c.duplicates += quota.duplicate
                if quota.late:
                    c.late += 1
                    out = out.model_copy(update={"late": True})
                batch.alerts.extend(quota.alerts)
                for counted in quota.counted:
                    batch.windows[counted[0].key] = counted
            keep(out)
        self.quotas.end_batch()
        batch.changelog = self.state.drain(batch.offsets)  # this batch's changes only
        return batch

    def _start_landing(self, batch: Batch) -> Future[bool] | None:
        """Encodes the batch here and lands it on the writer's own thread, which every user of the
        writer client goes through; None when this role does not write ClickHouse.

        Encoding is Python work. On the writer's thread it took the GIL from this thread in
        slices, and this thread waited for it; here it runs between batches, and the writer's
        thread only waits on ClickHouse, without the GIL. Measured on this loop alone (apply, then
        land while the next batch is applied; 8 interleaved runs of 40,000 events): 33.6 against
        36.2 µs an event, median; bench/e2e.py, 3 interleaved pairs: 13,925–15,878 against
        12,646–14,344 events/s, 7.3–8.8 against 9.2–9.9 CPU s per 100k events."""
        if self.sink is None:
            return None
        compression = self.sink.compression
        encoded = [table.encode(rows, compression) for table, rows in ((LEDGER, batch.records), (ALERTS, batch.alerts))
                   if rows]
        return self.sink.executor.submit(self._land, encoded)

    def _land(self, encoded: list[Encoded]) -> bool:
        for batch in encoded:
            stats = self.counters.sinks.setdefault(batch.table.name, SinkStats())
            if not land(self.sink.writer, batch, stats, stopping=self.stopping, send=self.wrap(batch.table.send)):
                return False
        return True

    def _abandon(self, batch: Batch) -> None:
        log.error("stopping with %d unlanded rows; exiting without committing their offsets", len(batch.records))
        os._exit(EXIT_UNLANDED)

    def _write_transaction(self, batch: Batch) -> None:
        """Begins the batch's transaction and queues its records (committed by ``_settle``'s commit)."""
        t, p = self.topics, self.producer
        try:
            p.begin_transaction()
            for message, rejection in batch.dead:
                log.info("dead-lettered %s[%s]@%s: %s: %s", message.topic(), message.partition(), message.offset(),
                         rejection.reason, rejection.message)
                self._produce(t.dlq, message.key(), message.value() or b"", timestamp=message.timestamp()[1],
                              headers=dead_letter_headers(rejection, message.topic(), message.partition(),
                                                          message.offset()))
            for alert in batch.alerts:
                self._produce(t.alerts, alert.tenant_id.encode(), alert.model_dump_json().encode())
            for ref, usage, as_of in batch.windows.values():
                quota_state = ref.state(usage, as_of)
                self._produce(t.state, quota_state.key.encode(), quota_state.model_dump_json().encode())
            if self.settings.role == "stream":
                for record in batch.records:
                    self._produce(t.attributed, record.tenant_id.encode(), record.model_dump_json().encode(),
                                  timestamp=epoch_ms(record.event_time))
            for partition, key, value in batch.changelog:
                self._produce(self.state.topic, key, value, partition=partition)
        except KafkaException as exc:
            self._abort_after(exc)

    def _abort_after(self, exc: KafkaException) -> None:
        """Aborts the batch's transaction after ``exc`` and raises ``Rewind``."""
        log.warning("aborting the batch's transaction (%s); re-reading from the committed offsets", exc.args[0])
        self._abort()
        raise Rewind from exc

    def _committed(self, batch: Batch) -> None:
        """Counts a committed batch and commits its offsets to the consumer group."""
        t, c = self.topics, self.counters
        c.dead_lettered += len(batch.dead)  # counted once committed (an aborted batch is redone)
        c.alerts += len(batch.alerts)
        offsets = [TopicPartition(t.raw, partition, offset) for partition, offset in batch.offsets.items()]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:  # the group's offset only trails the committed position
            log.info("consumer offset commit failed: %s", exc.args[0])
        for partition, offset in batch.offsets.items():
            c.processed(t.raw, partition, offset - 1)
            low, high = self.consumer.get_watermark_offsets(TopicPartition(t.raw, partition), cached=True)
            if high >= 0:
                self.highwaters[(t.raw, partition)] = high

    def _abort(self) -> None:
        """Aborts the open transaction; a producer in a fatal state (a broker restart can leave it
        so: INVALID_TXN_STATE after a timed-out record) is replaced by a new one with the same
        transactional id, whose ``init_transactions`` aborts whatever the old one left open."""
        try:
            self.producer.abort_transaction(30)
            return
        except KafkaException as exc:
            log.warning("the transactional producer cannot abort (%s); starting a new one", exc.args[0])
        self.producer = self._new_producer()  # the old one only holds records of the aborted batch
        _while_retriable(self.producer.init_transactions)

    def _produce(self, topic: str, key: bytes | None, value: bytes | None, *, partition: int = -1,
                 timestamp: int = 0, headers: Any = None) -> None:
        """Queues one record of the transaction; ``partition`` -1 is the key's partition (librdkafka's
        RD_KAFKA_PARTITION_UA) and ``timestamp`` 0 the current time."""
        produce = self.producer.produce
        while True:
            try:
                # Positional (topic, value, key, partition, callback, on_delivery, timestamp, headers):
                # 0.68 µs a record, against 1.14 with keyword arguments built per record.
                produce(topic, value, key, partition, None, None, timestamp, headers)
                return
            except BufferError:
                self.producer.poll(0.05)
