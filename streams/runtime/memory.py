"""The batch loop's seams in memory: a broker of committed logs, a group consumer of one member,
a transactional producer, a changelog reader and a sink. With them the loop runs in a test (or
a benchmark) exactly as in a worker, without a Kafka cluster or a database:

    broker = MemoryBroker(partitions=2)
    broker.append("usage.raw", 0, b"acme", event_bytes)
    source, transactions = MemorySource(broker), MemoryTransactions(broker)

Failures are injected where the real ones occur: ``MemoryTransactions.fail_commits`` aborts the
next commits as a broker restart would, ``MemorySink.hold`` keeps batches from landing as an
unreachable ClickHouse would.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from streams.messaging.partitioning import partition_of
from streams.runtime.ports import BEGINNING, OnAssign, OnRevoke, TransactionFailed, TransportError
from streams.runtime.processor import TopicPartitionKey
from streams.runtime.state import ChangelogRecord
from streams.storage.tables import Blocks


@dataclass(frozen=True, slots=True)
class MemoryRecord:
    """A record of a ``MemoryBroker`` log, read through the same methods as a Kafka message."""

    _topic: str
    _partition: int
    _offset: int
    _key: bytes | None
    _value: bytes | None
    _timestamp: int = 0
    _headers: Any = None

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def timestamp(self) -> tuple[int, int]:
        return (1, self._timestamp)

    def headers(self) -> Any:
        return self._headers


@dataclass
class MemoryBroker:
    """Committed logs per topic and partition (created on first use), and one group's offsets."""

    partitions: int = 1
    logs: dict[str, list[list[MemoryRecord]]] = field(default_factory=dict)
    group_offsets: dict[TopicPartitionKey, int] = field(default_factory=dict)

    def log(self, topic: str) -> list[list[MemoryRecord]]:
        return self.logs.setdefault(topic, [[] for _ in range(self.partitions)])

    def append(self, topic: str, partition: int, key: bytes | None, value: bytes | None, timestamp: int = 0,
               headers: Any = None) -> MemoryRecord:
        log = self.log(topic)[partition]
        record = MemoryRecord(topic, partition, len(log), key, value, timestamp, headers)
        log.append(record)
        return record

    def records(self, topic: str) -> list[MemoryRecord]:
        """Every record of ``topic``, partition by partition."""
        return [record for log in self.log(topic) for record in log]


class MemorySource:
    """The group's only member: every partition of the subscribed topics is assigned to it at
    the first poll, and again after ``rebalance``."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self.positions: dict[TopicPartitionKey, int] = {}
        self.topics: list[str] = []
        self._on_assign: OnAssign | None = None
        self._on_revoke: OnRevoke | None = None
        self._on_lost: OnRevoke | None = None
        self._lost = False
        self._lose_when: Callable[[], bool] | None = None
        self._assigned = False
        #: How many polls the loop made: a test that waits for two more knows a whole turn has run.
        self.polls = 0
        #: How many of the next ``committed`` calls fail, as with a coordinator that went away.
        self.fail_committed = 0

    def subscribe(self, topics: list[str], on_assign: OnAssign, on_revoke: OnRevoke, on_lost: OnRevoke) -> None:
        self.topics, self._on_assign, self._on_revoke, self._on_lost = topics, on_assign, on_revoke, on_lost

    def rebalance(self) -> None:
        """Revokes every partition at the next poll, and assigns them again."""
        self._assigned = False

    def lose(self, when: Callable[[], bool] = lambda: True) -> None:
        """Loses every partition (a missed session timeout) at the first poll at which ``when()``
        holds, and assigns them again."""
        self._lose_when = when

    def poll(self, max_records: int, timeout_s: float) -> Sequence[MemoryRecord]:
        """As a consumer's ``consume``: what is there, up to ``max_records``, waiting up to
        ``timeout_s`` for the first records."""
        self.polls += 1
        if self._lose_when is not None and self._lose_when():
            self._lose_when, self._assigned, self._lost = None, False, True
        if not self._assigned:
            self._reassign()
        deadline = time.monotonic() + timeout_s
        while True:
            out: list[MemoryRecord] = []
            for key in sorted(self.positions):
                log = self.broker.log(key[0])[key[1]]
                start = self.positions[key]
                taken = log[start:start + max_records - len(out)]
                out.extend(taken)
                self.positions[key] = start + len(taken)
            left = deadline - time.monotonic()
            if out or left <= 0:
                return out
            time.sleep(min(left, 0.005))

    def _reassign(self) -> None:
        partitions = [(topic, p) for topic in self.topics for p in range(self.broker.partitions)]
        if self.positions and self._lost and self._on_lost is not None:
            self._on_lost(sorted(self.positions))
        elif self.positions and self._on_revoke is not None:
            self._on_revoke(sorted(self.positions))
        self._lost = False
        self.positions.clear()
        starts = self._on_assign(partitions) if self._on_assign is not None else {}
        for key in partitions:
            offset = starts.get(key, self.broker.group_offsets.get(key, BEGINNING))
            self.positions[key] = 0 if offset == BEGINNING else offset
        self._assigned = True

    def seek(self, partition: TopicPartitionKey, offset: int) -> None:
        self.positions[partition] = 0 if offset == BEGINNING else offset

    def committed(self, partitions: list[TopicPartitionKey]) -> dict[TopicPartitionKey, int]:
        if self.fail_committed > 0:
            self.fail_committed -= 1
            raise TransportError("injected: the group coordinator is not available")
        return {key: self.broker.group_offsets.get(key, -1) for key in partitions}

    def commit_offsets(self, offsets: dict[TopicPartitionKey, int]) -> None:
        self.broker.group_offsets.update(offsets)

    def highwater(self, partition: TopicPartitionKey) -> int:
        return len(self.broker.log(partition[0])[partition[1]])

    def close(self) -> None:
        if self.positions and self._on_revoke is not None:
            self._on_revoke(sorted(self.positions))
        self.positions.clear()


class MemoryTransactions:
    """Records are appended to the broker's logs only when their transaction commits."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self.open: list[tuple[str, int, bytes | None, bytes | None, int, Any]] | None = None
        self.committed = 0
        self.aborted = 0
        #: How many of the next commits fail (and leave their transaction to be aborted).
        self.fail_commits = 0

    def init(self) -> None:
        self.open = None

    def begin(self) -> None:
        if self.open is not None:
            raise TransactionFailed("a transaction is open already")
        self.open = []

    def produce(self, topic: str, key: bytes | None, value: bytes | None, *, partition: int = -1,
                timestamp: int = 0, headers: Any = None) -> None:
        if self.open is None:
            raise TransactionFailed("no transaction is open")
        if partition < 0:  # where a real broker's murmur2 producer puts the key
            partition = partition_of(key or b"", self.broker.partitions)
        self.open.append((topic, partition, key, value, timestamp, headers))

    def commit(self) -> None:
        if self.open is None:
            raise TransactionFailed("no transaction is open")
        if self.fail_commits > 0:
            self.fail_commits -= 1
            raise TransactionFailed("injected: the transaction coordinator went away")
        for topic, partition, key, value, timestamp, headers in self.open:
            self.broker.append(topic, partition, key, value, timestamp, headers)
        self.open = None
        self.committed += 1

    def abort(self) -> None:
        self.open = None
        self.aborted += 1

    def close(self) -> None:
        pass


class MemoryChangelog:
    """Reads a changelog's committed records from the broker."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self.fail_reads = 0

    def read(self, topic: str, partitions: Iterable[int]) -> Iterator[ChangelogRecord]:
        if self.fail_reads > 0:
            self.fail_reads -= 1
            raise TransportError("injected: the changelog's leader is not available")
        for p in sorted(set(partitions)):
            for record in self.broker.log(topic)[p]:
                yield p, record.key() or b"", record.value()


class MemorySink:
    """Lands each part's rows in ``tables`` (by table name), in the order landed. ``hold`` keeps
    landings waiting until ``release``; a sink stopped while holding answers False, as
    ``ClickHouseSink`` does when it is stopped during an outage."""

    def __init__(self) -> None:
        self.tables: dict[str, list[Any]] = {}
        self.landings = 0
        self._open = threading.Event()
        self._open.set()
        self.stopping = threading.Event()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def land(self, parts: Sequence[tuple[Any, Sequence[Any]]]) -> Future[bool]:
        future: Future[bool] = Future()
        # Blocks written elsewhere (the sink role's, from usage.ledger) are read back into rows
        # (their columns as attributes), as ClickHouse would store them.
        rows = [(table.name, [SimpleNamespace(**row) for body in records.bodies for row in table.block_rows(body)]
                 if isinstance(records, Blocks) else list(records)) for table, records in parts if records]

        def write() -> None:
            while not self._open.wait(0.01):
                if self.stopping.is_set():
                    future.set_result(False)
                    return
            for name, records in rows:
                self.tables.setdefault(name, []).extend(records)
            self.landings += 1
            future.set_result(True)

        threading.Thread(target=write, daemon=True).start()
        return future
