"""The one way rows reach ClickHouse: ``ClickHouseSink.land``.

A batch's parts (a table and its records each) are encoded on the calling thread, once, into
ClickHouse's Native format (``streams.storage.tables``), and sent by the sink's writer thread,
which does little else than wait on ClickHouse without the GIL. A part that fails is sent again,
byte for byte and with the same ``insert_deduplication_token``, until ClickHouse takes it: the
checkpoint moves the positions behind a batch only after its landing says so, so a failed
insert never loses events and a retried one never doubles them.

Users: the batch loop of every role (``streams.runtime.checkpoint``), ``costline reprice``
(``streams.operations.reprice``), and through usage.attributed, ``costline backfill``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from clickhouse_connect.driver.client import Client

from streams.backoff import Backoff
from streams.errors import CostlineError
from streams.storage.tables import Encoded, TableSpec

log = logging.getLogger(__name__)

#: One attempt at sending an encoded part (``TableSpec.send``, or a wrapper of it that injects faults).
Send = Callable[[Client, Encoded], None]
#: 0.2 s, doubling, up to 30 s between attempts at a failing insert.
_BACKOFF = Backoff()


class SinkFailed(CostlineError):
    """A one-off write gave up after its attempts; the message is ClickHouse's last refusal."""


@dataclass
class SinkStats:
    landed: int = 0
    batches: int = 0
    errors: int = 0
    last_error: str | None = None
    failing_since: float | None = None
    #: Time from a batch's first insert attempt until it landed, retries included.
    batch_seconds_sum: float = 0.0
    batch_seconds_max: float = 0.0


def send_to(client: Client, batch: Encoded) -> None:
    """One attempt at inserting an encoded batch."""
    batch.table.send(client, batch)


class ClickHouseSink:
    """ClickHouse's clients, and the writer thread that lands batches.

    ``writer`` is used by the writer thread only (chDB clients are not shared between threads);
    ``reader`` (from ``connect_readonly``) serves queries. chDB keeps settings per session, so the
    two are never the same client."""

    def __init__(self, writer: Client, reader: Client, stats: dict[str, SinkStats] | None = None, *,
                 send: Send = send_to, backoff: Backoff = _BACKOFF, stopping: threading.Event | None = None,
                 purge_every_s: float | None = None) -> None:
        """``purge_every_s``: the embedded engine's (``connect`` of a ``chdb:`` URL): after a landing,
        at most this often, its allocator gives the memory it keeps for reuse back to the system
        (``SYSTEM JEMALLOC PURGE``, about 4 ms). The engine's allocator keeps freed pages for five
        seconds and purges them only as it allocates again: 20 inserts of 50,000 rows and a merge
        left 97 MB that a purge gave back; a worker with 100,000 tenants peaked 5-14 MB lower
        (``docs/performance.md``)."""
        self.writer = writer
        self.purge_every_s = purge_every_s
        self._purged = time.monotonic()
        self.reader = reader
        #: Per table; the worker's metrics read the same dict.
        self.stats = stats if stats is not None else {}
        self.send = send
        self.backoff = backoff
        #: Set when the worker stops: a failing batch stops retrying, and its landing answers False.
        self.stopping = stopping or threading.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse-writer")

    @property
    def compression(self) -> str | None:
        """How batches are compressed for the writer: as the client compresses its own inserts
        (lz4 or zstd to a server over HTTP; the embedded engine takes them uncompressed)."""
        compression = self.writer.write_compression
        return compression if compression in ("lz4", "zstd") else None

    @property
    def failing(self) -> bool:
        return any(stats.failing_since is not None for stats in self.stats.values())

    def land(self, parts: Sequence[tuple[TableSpec[Any], Sequence[Any]]], attempts: int | None = None) -> Future[bool]:
        """Encodes each non-empty (table, records) part here and lands them in order on the writer
        thread. The future's result is True once every part landed; False if the sink was stopped
        first. With ``attempts`` (one-off writers) it raises ``SinkFailed`` after that many."""
        compression = self.compression
        encoded = [table.encode(records, compression) for table, records in parts if records]
        return self.executor.submit(self._land, encoded, attempts)

    def _land(self, encoded: list[Encoded], attempts: int | None) -> bool:
        landed = all(self._land_one(batch, attempts) for batch in encoded)
        if landed and self.purge_every_s is not None and time.monotonic() - self._purged >= self.purge_every_s:
            self._purged = time.monotonic()
            try:
                self.writer.command("SYSTEM JEMALLOC PURGE")
            except Exception as exc:  # noqa: BLE001 - memory given back later, or never: not a failed landing
                log.info("ClickHouse would not purge its allocator's free memory (%s): not asked again",
                         str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
                self.purge_every_s = None
        return landed

    def _land_one(self, batch: Encoded, attempts: int | None) -> bool:
        stats = self.stats.setdefault(batch.table.name, SinkStats())
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                self.send(self.writer, batch)
            except Exception as exc:  # noqa: BLE001 - any failure of the write is retried, never dropped
                stats.errors += 1
                stats.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                stats.failing_since = stats.failing_since or time.monotonic()
                attempt += 1
                if attempts is not None and attempt >= attempts:
                    stats.failing_since = None
                    raise SinkFailed(f"ClickHouse refused {batch.rows} rows of {batch.table.name} "
                                     f"{attempt} times: {stats.last_error}") from None
                wait = self.backoff.delay(attempt - 1)
                log.warning("ClickHouse insert of %d rows into %s failed (attempt %d), retrying in %.1fs: %s",
                            batch.rows, batch.table.name, attempt, wait, stats.last_error)
                if self.stopping.wait(wait):
                    return False
                continue
            elapsed = time.monotonic() - started
            stats.landed += batch.rows
            stats.batches += 1
            stats.batch_seconds_sum += elapsed
            stats.batch_seconds_max = max(stats.batch_seconds_max, elapsed)
            stats.failing_since = None
            return True

    def close(self) -> None:
        self.executor.shutdown(wait=True)
