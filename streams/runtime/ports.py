"""The seams of the batch loop: what it needs of a source, of a transactional producer, of a
changelog reader and of a sink. ``streams.runtime.kafka`` implements the first three on a Kafka
cluster, ``streams.storage.sink`` the last on ClickHouse; ``streams.runtime.memory`` implements
all four in memory, so that the loop, its commit order, its rewind and its restore are tested
without a broker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, Protocol

from streams.runtime.processor import Record, TopicPartitionKey
from streams.runtime.state import ChangelogRecord

#: Where a partition without a committed position starts: its first record (librdkafka's OFFSET_BEGINNING).
BEGINNING = -2

#: Called by a source when partitions are assigned; returns the offsets to start them at (partitions
#: left out start at the group's committed offset, else at the beginning).
OnAssign = Callable[[list[TopicPartitionKey]], dict[TopicPartitionKey, int]]
OnRevoke = Callable[[list[TopicPartitionKey]], None]


class TransportError(Exception):
    """The cluster did not answer or refused an operation that can be tried again later."""


class TransactionFailed(Exception):
    """A transaction could not be written or committed: it is aborted, and nothing of it is visible."""


class Source(Protocol):
    """A consumer in a group: reads records of its assigned partitions in offset order."""

    def subscribe(self, topics: list[str], on_assign: OnAssign, on_revoke: OnRevoke, on_lost: OnRevoke) -> None:
        """``on_revoke`` before partitions are taken away in a rebalance; ``on_lost`` when they were
        taken away already (this member missed its session timeout)."""
        ...

    def poll(self, max_records: int, timeout_s: float) -> Sequence[Record]:
        """Up to ``max_records`` records; rebalance callbacks run inside this call."""
        ...

    def seek(self, partition: TopicPartitionKey, offset: int) -> None: ...

    def committed(self, partitions: list[TopicPartitionKey]) -> dict[TopicPartitionKey, int]:
        """The group's committed offset of each partition, -1 where none (raises ``TransportError``)."""
        ...

    def commit_offsets(self, offsets: dict[TopicPartitionKey, int]) -> None:
        """Commits the group's offsets without waiting (they only trail the committed positions)."""
        ...

    def highwater(self, partition: TopicPartitionKey) -> int:
        """The partition's end as last seen, -1 when not known yet."""
        ...

    def close(self) -> None: ...


class Transactions(Protocol):
    """A transactional producer: one open transaction at a time."""

    def init(self) -> None: ...
    def begin(self) -> None: ...

    def produce(self, topic: str, key: bytes | None, value: bytes | None, *, partition: int = -1,
                timestamp: int = 0, headers: Any = None) -> None:
        """Queues a record of the open transaction (partition -1: the key's; timestamp 0: now)."""
        ...

    def commit(self) -> None:
        """Commits the open transaction, waiting for the brokers (raises ``TransactionFailed``)."""
        ...

    def abort(self) -> None: ...
    def close(self) -> None: ...


class ChangelogReader(Protocol):
    def read(self, topic: str, partitions: Iterable[int]) -> Iterator[ChangelogRecord]:
        """The committed records of ``partitions`` of ``topic``, in log order per partition (raises
        ``TransportError``)."""
        ...


class Sink(Protocol):
    def land(self, parts: Sequence[tuple[Any, Sequence[Any]]]) -> Future[bool]:
        """Writes each (table, rows) part on a thread of its own, retrying until it lands; the
        future's result is False only if the sink was stopped first."""
        ...
