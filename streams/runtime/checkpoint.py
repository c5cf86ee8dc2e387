"""The checkpoint: what makes a processed batch durable, and what restores the last durable
state after a failure or a rebalance.

A batch goes through four steps, always in this order:

1. **Land** (``stage``). Its ledger rows and alerts go to the sink, which writes them to
   ClickHouse on a thread of its own, retrying the same bytes with the same deduplication token
   until they land, while this thread reads and processes the next batch.
   *Guarantee:* the batch's rows are stored before step 2 moves its positions past them. Moved
   after step 2, a crash between the two would lose the rows for good.
2. **Write the transaction** (``commit``). Begin a Kafka transaction and queue the batch's dead
   letters, alerts, the latest quota state of each window it counted into (unless it went out
   early, below), its ledger rows
   (role ``stream``, for the sink worker: Native blocks on usage.ledger, and JSON records on
   usage.attributed if ``COSTLINE_PUBLISH_ATTRIBUTED`` is set), the changelog records of the quota keys it
   changed and its next source positions (``streams.runtime.state``).
   *Guarantee:* all of these become visible to ``read_committed`` readers together, or none of
   them: the alerts, the changelog and the positions can never disagree.

   **Quota states go out early** where the worker writes ClickHouse itself (role ``all``): the
   states of the batch processed since are queued in this transaction too, or, if no batch is
   staged, in a transaction of their own, without waiting for that batch to land. Enforcers then
   see usage a landing sooner (on a busy 2-core host, a landing took about 100 ms at the median).
   A state is the latest count of its window, computed from the changelog's state and the source in
   offset order: if the batch is then not committed, it is read and processed again from the same
   state, and publishes the same states. (Unless the wall clock moved far in between, a restart
   after an outage longer than the dedup horizon, say: a re-sent copy of an event may then count,
   or the watermark's bound let an event fall late. The batch's states then differ a little from
   the early ones, and replace them.) Alerts are events, not states: they stay with the positions,
   so that an aborted batch does not send them twice. Role ``stream`` commits each batch as soon as it is processed, and has nothing
   to gain.
3. **Commit the transaction**, on a thread of its own (it waits on the brokers, without the GIL)
   while this thread reads and processes the next batch. It is waited for (``settle``) before
   the next transaction begins, so transactions never overlap. If it fails, the transaction is
   aborted and ``Aborted`` raised: the loop then calls ``rewind``.
4. **After the commit**: the consumer group's offsets, committed without waiting, and the
   counters. The group's offsets are for lag monitoring and for the partitions that have no
   position in the changelog (usage.attributed, quota.alerts); they are not sent through the
   transaction because librdkafka's ``send_offsets_to_transaction`` can block forever once the
   group coordinator's broker has restarted (confluentinc/librdkafka#5456, #5511).

**Rewind** (after ``Aborted``): the quota state and positions of the last committed batch are
read back from the changelog and the source seeks to those positions; the batches that were not
committed are read and processed again. Rows of a batch that landed but was not committed are
written again, and collapse by ``event_id`` in the ledger (a ReplacingMergeTree).

**Rebalance**: before partitions are revoked, the batch in flight is committed (steps 2-4);
when partitions are assigned, their state is restored and reading starts at their positions.
Partitions *lost* (the worker missed its session timeout, and another may own them already) get
nothing more written: the batch in flight is dropped unwritten.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import NamedTuple, TypeVar

from schemas.attributed import HEADER_IN_BLOCK
from schemas.dead_letter import Rejection, dead_letter_headers
from schemas.usage import epoch_ms
from streams.backoff import Backoff
from streams.runtime.metrics import Counters
from streams.runtime.ports import (
    BEGINNING,
    ChangelogReader,
    Sink,
    Source,
    TransactionFailed,
    Transactions,
    TransportError,
)
from streams.runtime.processor import Batch, Record, TopicPartitionKey
from streams.runtime.state import ChangelogTables
from streams.settings import Topics
from streams.storage.tables import ALERTS, LEDGER, as_record

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Waits between attempts to restore the last committed state after an aborted batch.
_REWIND_BACKOFF = Backoff(first_s=0.5, max_s=5.0)
#: How long a restore is retried before the worker gives up (below the consumer's 300 s poll interval).
RESTORE_DEADLINE_S = 240.0


class Aborted(Exception):
    """The batch's transaction was aborted: nothing of it is visible, and it must be read again."""


class Unlanded(Exception):
    """The worker is stopping while a batch cannot be written to ClickHouse; nothing of it was committed."""


class Written(NamedTuple):
    """What step 4 needs of a batch whose records are written to its transaction."""

    offsets: dict[TopicPartitionKey, int]
    dead_lettered: int
    alerts: int


class Checkpoint:
    """Steps 1-4 of the module docstring, rewind and rebalance, for one worker's loop."""

    def __init__(self, *, topics: Topics, source: Source, transactions: Transactions, counters: Counters,
                 stopping: threading.Event, sink: Sink | None = None, state: ChangelogTables | None = None,
                 changelog: ChangelogReader | None = None, on_restore: Callable[[], None] = lambda: None,
                 publish_blocks: bool = False, publish_json: bool = False) -> None:
        """``sink`` None: the batch's records are not written to ClickHouse here (role ``stream``,
        which publishes them instead: their Native blocks with ``publish_blocks``, for the sink
        role to insert as they are; each as JSON with ``publish_json``, for other consumers). ``state`` and ``changelog``: the
        quota tables and where to restore them from (roles that read usage.raw); ``on_restore`` is
        told when they were replaced."""
        if (state is None) != (changelog is None):
            raise ValueError("the quota state needs its changelog reader, and the reader its state")
        self.topics = topics
        self.source = source
        #: Assignments, revocations and losses so far: a read that saw this change holds records of
        #: an assignment that is over (``BatchLoop._read``).
        self.rebalances = 0
        self.transactions = transactions
        self.counters = counters
        self.stopping = stopping
        self.sink = sink
        self.state = state
        self.changelog = changelog
        self.on_restore = on_restore
        self.publish_blocks, self.publish_json = publish_blocks, publish_json
        self.assigned: set[TopicPartitionKey] = set()
        #: Set once partitions are assigned and their state restored: the worker is consuming.
        self.ready = threading.Event()
        #: Latest high watermark per (topic, partition), for the consumer-lag metric.
        self.highwaters: dict[TopicPartitionKey, int] = {}
        #: The batch processed last, landing (step 1) but not written yet, and its landing.
        self._pending: tuple[Batch, Future[bool] | None] | None = None
        #: What step 4 needs of the batch whose transaction is being committed (step 3), and that commit.
        self._committing: tuple[Written | None, Future[None]] | None = None

    # ---- the steps -----------------------------------------------------------------------------

    def stage(self, batch: Batch) -> None:
        """Step 1: starts landing ``batch``; ``commit`` takes it through steps 2-3."""
        landing = None
        if self.sink is not None:
            landing = self.sink.land([(LEDGER, batch.records), (LEDGER, batch.blocks),
                                      (ALERTS, batch.alerts + batch.read_alerts)])
        self._pending = (batch, landing)

    @property
    def staged(self) -> bool:
        """Whether a batch is staged and not yet committed."""
        return self._pending is not None

    def landed(self) -> bool:
        """Whether a staged batch needs no more waiting to be committed."""
        return self._pending is not None and (self._pending[1] is None or self._pending[1].done())

    def commit(self, processed: Batch | None = None) -> None:
        """Steps 2-3 for the staged batch, once it has landed; first waits for the commit before it
        (``settle``). ``processed``: the batch processed since, not staged yet, whose quota states
        go out in this transaction (role ``all``: see the module docstring). Raises ``Aborted`` if
        either transaction was aborted, ``Unlanded`` if the worker stops while the batch cannot land."""
        self.settle()
        early = processed if processed is not None and self.sink is not None and self.state is not None \
            and (processed.windows or processed.expired) else None
        if self._pending is None:
            if early is not None:  # nothing staged: the states in a transaction of their own
                try:
                    self.transactions.begin()
                    self._send_states(early)
                except TransactionFailed as exc:
                    self._abort(exc)
                self._committing = (None, _in_background(self.transactions.commit))
            return
        batch, landing = self._pending
        self._pending = None
        if landing is not None and not landing.result():
            raise Unlanded(f"stopping with {len(batch.records) + batch.blocks.rows} unlanded rows; "
                           "their offsets are not committed")
        self._write(batch, early)
        # Only what step 4 needs is kept while the transaction commits: the batch's records were
        # copied into the producer's queue, and held here too they would double the memory of a
        # batch of many tenants (its changelog records are about 3 KB a new tenant) while the next
        # batch is processed.
        written = Written(offsets=batch.offsets, dead_lettered=len(batch.dead), alerts=len(batch.alerts))
        self._committing = (written, _in_background(self.transactions.commit))

    def settle(self) -> None:
        """Waits for the transaction being committed, then step 4. If it was aborted, the staged
        batch is dropped with it (both are read again) and ``Aborted`` raised."""
        if self._committing is None:
            return
        batch, commit = self._committing
        self._committing = None
        try:
            commit.result()
        except TransactionFailed as exc:
            self._pending = None  # it may still land: landed again after the rewind, its rows collapse
            self._abort(exc)
        if batch is not None:  # (None: a transaction of early quota states only)
            self._committed(batch)

    def close(self) -> None:
        """Commits whatever is staged; the worker is stopping."""
        self.commit()
        self.settle()

    def _write(self, batch: Batch, early: Batch | None = None) -> None:
        """Step 2: begins the batch's transaction and queues its records (and ``early``'s quota states)."""
        t, send = self.topics, self.transactions.produce
        try:
            self.transactions.begin()
            for record, rejection in batch.dead:
                dead_letter(self.transactions, t.dlq, record, rejection)
            for alert in batch.alerts:
                send(t.alerts, alert.tenant_id.encode(), alert.model_dump_json().encode())
            if not batch.states_sent:
                self._send_states(batch)
            if self.publish_blocks:
                # Without a key: the sink inserts whatever blocks it reads in one go, and the ledger
                # collapses rows by event_id whatever order they land in.
                for block in batch.records.blocks():
                    send(t.ledger, None, block)
            if self.publish_json:
                in_block = [(HEADER_IN_BLOCK, b"1")] if self.publish_blocks else None
                for attributed in batch.records:
                    send(t.attributed, attributed.tenant_id.encode(), as_record(attributed).model_dump_json().encode(),
                         timestamp=epoch_ms(attributed.event_time), headers=in_block)
            if self.state is not None:
                for partition, key, value in batch.changelog:
                    send(self.state.topic, key, value, partition=partition)
            if early is not None:  # after ``batch``'s: a window's states stay in batch order
                self._send_states(early)
        except TransactionFailed as exc:
            self._abort(exc)

    def _send_states(self, batch: Batch) -> None:
        """Queues the latest quota state of each window ``batch`` counted into, and a tombstone for
        each window it closed (compaction then drops the window's state)."""
        send, topic = self.transactions.produce, self.topics.state
        for key, counted in batch.windows.items():
            send(topic, counted.ref.state_key.encode(), counted.state_json(batch.settled.get(key)))
        for key in batch.expired:
            send(topic, key.encode(), None)
        batch.states_sent = True

    def _abort(self, exc: Exception) -> None:
        log.warning("aborting the batch's transaction (%s); re-reading from the last committed positions", exc)
        self.transactions.abort()
        raise Aborted(str(exc)) from exc

    def _committed(self, batch: Written) -> None:
        """Step 4."""
        c = self.counters
        c.dead_lettered += batch.dead_lettered  # counted once committed (an aborted batch is redone)
        c.alerts += batch.alerts
        self.source.commit_offsets(batch.offsets)
        for key, offset in batch.offsets.items():
            c.processed(key[0], key[1], offset - 1)
            high = self.source.highwater(key)
            if high >= 0:
                self.highwaters[key] = high

    # ---- rewind and rebalance ------------------------------------------------------------------

    def rewind(self) -> None:
        """After ``Aborted``: the state and positions of the last committed batch, and the source
        sought back to them."""
        def restore_and_seek() -> None:
            starts = self._restore()
            rest = [key for key in sorted(self.assigned) if key not in starts]
            committed = self.source.committed(rest)
            for key in sorted(self.assigned):
                offset = starts.get(key, committed.get(key, -1))
                self.source.seek(key, offset if offset >= 0 else BEGINNING)

        self._retrying(restore_and_seek)

    def on_assign(self, partitions: list[TopicPartitionKey]) -> dict[TopicPartitionKey, int]:
        """Restores the state of the usage.raw partitions assigned; returns where to start them."""
        self.rebalances += 1
        self.assigned.update(partitions)
        starts = self._retrying(self._restore) or {}
        self.ready.set()
        return starts

    def on_revoke(self, partitions: list[TopicPartitionKey]) -> None:
        """Commits the batch in flight, which still belongs to this worker, then drops the state
        (the consumer rebalances eagerly: every partition is revoked, the new set restored whole)."""
        self.rebalances += 1
        self.ready.clear()
        try:
            self.close()
        except Aborted:
            pass  # not committed: the partitions' next owner reads it again
        self._drop(partitions)

    def on_lost(self, partitions: list[TopicPartitionKey]) -> None:
        """The partitions were taken away without a revoke (this worker missed its session timeout):
        another worker may own them already, so nothing more is written for them. The staged batch
        is dropped unwritten; a commit already under way cannot be called back, and is waited for
        without step 4."""
        self.rebalances += 1
        self.ready.clear()
        self._pending = None
        if self._committing is not None:
            _, commit = self._committing
            self._committing = None
            try:
                commit.result()
            except TransactionFailed:
                self.transactions.abort()
        log.warning("lost %s without a revoke; their batch in flight is left to their next owner", partitions)
        self._drop(partitions)

    def _drop(self, partitions: list[TopicPartitionKey]) -> None:
        self.assigned.difference_update(partitions)
        if self.state is not None:
            self.state.clear()
            self.on_restore()

    def _restore(self) -> dict[TopicPartitionKey, int]:
        """Reads the quota state of the assigned usage.raw partitions back from the changelog;
        returns the position of each that has one."""
        if self.state is None:
            return {}
        raw = self.topics.raw
        numbers = sorted(p for topic, p in self.assigned if topic == raw)
        read = self.state.load(self.changelog.read(self.state.topic, numbers))
        self.on_restore()
        log.info("restored %d quota records of %s%s", read, raw, numbers)
        return {(raw, p): offset for p, offset in self.state.offsets.items()}

    def _retrying(self, call: Callable[[], T]) -> T | None:
        """``call``, tried again while the cluster cannot answer (an abort or a rebalance often means
        a broker went away), for up to ``RESTORE_DEADLINE_S``; None if the worker stops first (then
        nothing more is committed, and the partitions' next owner reads on from the last commit).
        Past the deadline the error is raised, and the worker exits for its supervisor to restart
        it: retried longer, the consumer would exceed its poll interval inside a rebalance callback
        and be expelled from the group while it still holds the partitions."""
        deadline = time.monotonic() + RESTORE_DEADLINE_S
        attempt = 0
        while True:
            try:
                return call()
            except TransportError as exc:
                wait = _REWIND_BACKOFF.delay(attempt)
                if time.monotonic() + wait > deadline:
                    raise
                log.warning("reading the last committed state failed (%s); retrying in %.1fs", exc, wait)
                attempt += 1
                if self.stopping.wait(wait):
                    return None


def dead_letter(transactions: Transactions, dlq: str, record: Record, rejection: Rejection,
                value: bytes | None = None) -> None:
    """Queues ``record``'s dead letter in the open transaction: its key and timestamp, ``value``
    (by default its own value, as it arrived), and why and where from in the headers
    (``schemas.dead_letter``)."""
    log.info("dead-lettered %s[%s]@%s: %s: %s", record.topic(), record.partition(), record.offset(),
             rejection.reason, rejection.message)
    transactions.produce(dlq, record.key(), (record.value() or b"") if value is None else value,
                         timestamp=record.timestamp()[1],
                         headers=dead_letter_headers(rejection, record.topic(), record.partition(), record.offset()))


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
