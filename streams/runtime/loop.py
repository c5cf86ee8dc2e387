"""The batch loop: read a batch, process it, checkpoint it; and the process policy around it.

One thread runs ``BatchLoop.run``. Each turn reads up to ``batch_size`` records (``SPARSE_BATCH``
first, and after a batch of mostly one event a tenant), or what has arrived ``within_s`` after the previous
batch was read, processes them
(``streams.runtime.processor``) and hands them to the checkpoint (``streams.runtime.checkpoint``),
whose docstring numbers the steps that make a batch durable. Three batches are in flight at
once: batch N+1 is processed while batch N lands in ClickHouse (the database works without the
GIL) and batch N-1's transaction commits on the brokers.

Why not a Faust agent: Faust hands each record through its consumer thread, conductor and
stream iterator one by one, with a few asyncio tasks per record; on a 2-core machine an agent
that does nothing at all peaks at about 14,000 records/s, below what this loop sustains, and
Faust's commits cannot be tied to the quota state's changelog. Faust hosts the worker instead
(``streams.runtime.host``): lifecycle and web endpoints.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from streams.runtime.checkpoint import Aborted, Checkpoint, Unlanded
from streams.runtime.ports import Source, Transactions
from streams.runtime.processor import BatchProcessor

log = logging.getLogger(__name__)

#: Exit status of a worker stopped while a batch could not be written (nothing of it was committed).
EXIT_UNLANDED = 75
#: Exit status of a worker whose batch loop met an error it cannot recover from.
EXIT_FAILED = 70
#: How often a read that waits for records checks whether the batch before has landed.
LANDED_CHECK_S = 0.01
#: The most records read after a sparse batch (``Batch.sparse``: most of its tenants had one event
#: in it). Such a batch holds about 10 KB an event until it is written — its attributed records, a
#: new or thawed tenant's state and the six changelog records of each — and nothing is gained by
#: its size: no window has events to sum. With 100,000 distinct tenants, role ``stream``, the
#: worker's peak RSS was 301-303 MB with this cap against 379-380 without, at the same events/s
#: (docs/performance.md). Batches of repeated tenants keep ``batch_size``: with 1,000 tenants a
#: cap of 1,000 on every batch cost role ``stream`` about 15% of its events/s, and of 2,000 role
#: ``all`` a quarter (more, smaller ClickHouse inserts).
SPARSE_BATCH = 1000


@dataclass(kw_only=True)
class BatchLoop:
    """Reads batches of ``topics`` from ``source``, hands each to ``processor`` and ``checkpoint``."""

    source: Source
    topics: list[str]
    processor: BatchProcessor
    checkpoint: Checkpoint
    transactions: Transactions
    batch_size: int
    within_s: float
    stopping: threading.Event
    #: The most records read after a sparse batch (at most ``batch_size``).
    sparse_batch_size: int = SPARSE_BATCH

    def run(self) -> None:
        """Until ``stopping`` is set; then commits what is in flight. Raises ``Unlanded`` when a
        batch cannot land before the stop."""
        checkpoint = self.checkpoint
        self.transactions.init()
        self.source.subscribe(self.topics, on_assign=checkpoint.on_assign, on_revoke=checkpoint.on_revoke,
                              on_lost=checkpoint.on_lost)
        read_at = time.monotonic()
        sparse_size = min(self.batch_size, self.sparse_batch_size)
        # The first read takes the sparse size too: after a start, with a backlog of many tenants
        # (a restart, a rebalance), it would otherwise be the one full-size sparse batch.
        size = sparse_size
        while not self.stopping.is_set():
            # A batch waits for records at most ``within_s`` from when the last one was read: records
            # that arrived while that one was processed are taken at once, not after another wait.
            wait = max(0.0, read_at + self.within_s - time.monotonic())
            try:
                records = self._read(wait, size)
                read_at = time.monotonic()
                if checkpoint.landed():
                    checkpoint.commit()  # batch N has landed already: its quota state need not wait for N+1
                batch = self.processor.process(records) if records else None
                checkpoint.commit(batch)  # else batch N+1 was processed while batch N landed (with N+1's states)
            except Aborted:
                checkpoint.rewind()  # the batch processed since is dropped too: it is read again
                continue
            if batch is not None:
                size = sparse_size if batch.sparse else self.batch_size
                checkpoint.stage(batch)
                batch = None  # (held here, it would live through the next read and processing)
        try:
            checkpoint.close()
        except Aborted:
            pass  # stopping: what was not committed is read again by the partitions' next owner

    def _read(self, wait: float, size: int) -> list:
        """Up to ``size`` records, waiting at most ``wait`` for them. While a batch is landing,
        the wait is cut into slices of ``LANDED_CHECK_S`` and the batch is committed as soon as it
        has landed: its quota state then reaches enforcers up to ``within_s`` earlier than at the
        next batch's read (at half the sustained rate, batches land in about 20 ms and the loop
        would otherwise sit in the consumer's wait for the rest of the 100 ms). Raises ``Aborted``."""
        checkpoint = self.checkpoint
        if not checkpoint.staged or wait <= LANDED_CHECK_S:
            return list(self.source.poll(size, wait))
        deadline = time.monotonic() + wait
        rebalances = checkpoint.rebalances
        records: list = []
        while True:
            got = self.source.poll(size - len(records),
                                   min(LANDED_CHECK_S, max(0.0, deadline - time.monotonic())))
            if checkpoint.rebalances != rebalances:
                # A rebalance ran within this read: what the earlier reads returned may be of
                # partitions revoked since, or come again from the restored positions (a read drops
                # a revoked partition's records itself, but not records kept across reads). They
                # are dropped; this read's records come from the new assignment's positions.
                rebalances, records = checkpoint.rebalances, []
            records.extend(got)
            if checkpoint.staged and checkpoint.landed():
                checkpoint.commit()
            if len(records) >= size or time.monotonic() >= deadline or self.stopping.is_set():
                return records


class LoopThread:
    """Runs a ``BatchLoop`` on a thread of its own, and ends the process when the loop cannot go
    on: a worker half alive (serving health, consuming nothing) would be worse than a restart."""

    def __init__(self, loop: BatchLoop, close: Callable[[], None]) -> None:
        self.loop = loop
        self._close = close
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        tune_gc()
        tune_malloc()
        self._thread = threading.Thread(target=self._main, name="costline-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 60.0) -> None:
        self.loop.stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _main(self) -> None:
        try:
            self.loop.run()
        except Unlanded as exc:
            log.error("%s; exiting", exc)
            os._exit(EXIT_UNLANDED)
        except Exception:  # noqa: BLE001 - the worker must not go on half alive
            log.exception("the batch loop failed; exiting so that a supervisor restarts the worker")
            os._exit(EXIT_FAILED)
        self._close()


def tune_gc() -> None:
    """Keeps Python's cycle collector from taking a fifth of the loop's time.

    The loop allocates a few hundred objects per event; with the default thresholds a collection
    runs every 700 net allocations, walking the younger generations each time and, every 100 of
    those, the whole heap (every quota window and memo). Almost nothing here is freed by the
    collector (records and rows are freed by reference counting), so: what exists once the worker
    has started moves to the permanent generation (``gc.freeze``), and the youngest generation is
    collected after 200,000 net allocations, more than a batch keeps alive (5,000 events hold
    about 75,000 objects), so that a batch is mostly freed before any collection walks it. The
    middle generation is collected every 5 of those, so that it holds at most about a million
    objects when walked. Lower the first threshold and collections walk live batches again;
    raise it far and the longest pause grows (docs/performance.md).
    """
    gc.freeze()
    gc.set_threshold(200_000, 5, 100)


#: glibc's ``M_MMAP_THRESHOLD`` (``malloc.h``).
_M_MMAP_THRESHOLD = -3
#: Allocations of this size and up get a mapping of their own, unmapped when they are freed.
MMAP_THRESHOLD = 128 * 1024


def tune_malloc() -> bool:
    """Keeps large buffers out of the C heap, where, once freed, they stay resident.

    glibc maps each allocation of 128 KiB or more on its own, but raises that threshold to the size
    of every such block freed, up to 32 MiB: once librdkafka has freed its first decompressed fetch
    responses (about 1 MB each), the next ones come from the heap, and freed heap space between
    live blocks is not given back. Fixed at 128 KiB, they are unmapped when freed: with 100,000
    tenants a ``stream`` worker's peak RSS went from 298 to 274-276 MB at the same events/s
    (docs/performance.md). A ``MALLOC_MMAP_THRESHOLD_`` set in the environment is kept (glibc read
    it at start); without glibc there is nothing to call. Returns whether the threshold was set."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
