"""The quota stage's state: in-memory tables, changelogged to a compacted Kafka topic.

The engine (``streams.engine``) owns the tables of the source partitions assigned to it. Every
key written while an event of partition *p* is applied belongs to partition *p* of the changelog
(the source topic is keyed by tenant, and so are the quota keys), and the keys changed by a
batch are written once each, at the end of the batch, inside the Kafka transaction that also
commits the batch's source offsets. A worker that takes over a partition reads that partition
of the changelog up to its last committed record (``read_committed``) and has exactly the state
that belongs with the committed offset: nothing of a batch that was not committed.

Record key ``<table>|<key>``, value the JSON of the entry, or a tombstone for a deleted key.
Each batch also writes ``_offset|<partition>``: the next source offset to read. It is the
worker's position, committed atomically with the state it belongs to, and a worker that takes
over a partition starts reading there (the consumer group's own committed offset trails it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, MutableMapping
from datetime import datetime
from decimal import Decimal
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from schemas.trusted import json_writer
from streams.quotas import QUOTA_TABLES
from streams.topics import READ_TRANSACTIONAL, SilentLogger, retrying

_SEP = "|"
_OFFSET = "_offset"


class TrackedTable(MutableMapping[str, Any]):
    """A dict that remembers which keys changed, and for which partition, since the last drain."""

    def __init__(self, name: str, owner: ChangelogTables) -> None:
        self.name = name
        self.data: dict[str, Any] = {}
        self._owner = owner

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self._owner.dirty[(self.name, key)] = self._owner.partition

    def __delitem__(self, key: str) -> None:
        del self.data[key]
        self._owner.dirty[(self.name, key)] = self._owner.partition

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __contains__(self, key: object) -> bool:
        return key in self.data


class ChangelogTables:
    """The three quota tables (``QUOTA_TABLES``) of one worker, and their changelog topic."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        #: The source partition whose event is being applied; set by the engine before each event.
        self.partition = -1
        self.dirty: dict[tuple[str, str], int] = {}
        self.tables = {name: TrackedTable(name, self) for name in QUOTA_TABLES}
        #: The next source offset per partition, as of the state held (from the changelog).
        self.offsets: dict[int, int] = {}

    def table(self, name: str) -> TrackedTable:
        return self.tables[name]

    def drain(self, offsets: dict[int, int]) -> list[tuple[int, bytes, bytes | None]]:
        """The changelog records of the keys changed since the last drain, and of the next source
        ``offsets`` of the batch they belong to: (partition, key, value)."""
        records = []
        for (name, key), partition in self.dirty.items():
            data = self.tables[name].data
            value = _encode(data[key]).encode() if key in data else None
            records.append((partition, f"{name}{_SEP}{key}".encode(), value))
        self.dirty.clear()
        for partition, offset in offsets.items():
            self.offsets[partition] = offset
            records.append((partition, f"{_OFFSET}{_SEP}{partition}".encode(), str(offset).encode()))
        return records

    def clear(self) -> None:
        """Drops all state. The engine's consumer rebalances eagerly: a rebalance revokes every
        partition, and the new assignment is restored whole, so no key needs to know its partition."""
        for table in self.tables.values():
            table.data.clear()
        self.dirty.clear()
        self.offsets.clear()

    def restore(self, servers: str, partitions: Iterable[int], timeout_s: float = 120.0) -> int:
        """Reads ``partitions`` of the changelog up to their last committed record into the (cleared)
        tables; returns the count."""
        wanted = sorted(set(partitions))
        self.clear()
        if not wanted:
            return 0
        consumer = Consumer({"bootstrap.servers": servers, "group.id": "costline-restore", "enable.auto.commit": False,
                             **READ_TRANSACTIONAL,
                             "log_level": 0, "logger": SilentLogger()})
        read = 0
        try:
            deadline = time.monotonic() + timeout_s
            pending = set()
            for p in wanted:  # an empty partition (a new worker) needs no reading
                tp = TopicPartition(self.topic, p)
                low, high = retrying(lambda tp=tp: consumer.get_watermark_offsets(tp, timeout=10),
                                     timeout_s=max(0.0, deadline - time.monotonic()))
                if high > low:
                    pending.add(p)
            consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in sorted(pending)])
            while pending:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"restoring {self.topic} partitions {sorted(pending)} took over {timeout_s:.0f}s")
                for msg in consumer.consume(10_000, timeout=0.5):
                    error = msg.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            pending.discard(msg.partition())
                            continue
                        if error.fatal() or not error.retriable():
                            raise KafkaException(error)
                        continue
                    name, _, key = msg.key().decode().partition(_SEP)
                    if name == _OFFSET:
                        self.offsets[msg.partition()] = int(msg.value())
                        continue
                    table = self.tables.get(name)
                    if table is None:
                        continue
                    value = msg.value()
                    if value is None:
                        table.data.pop(key, None)
                    else:
                        table.data[key] = json.loads(value)
                    read += 1
        finally:
            consumer.close()
        return read


def _text(value: object) -> str:
    """Decimals and datetimes of the quota tables, as text (read back by ``streams.quotas``)."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"cannot store a {type(value).__name__} in the quota changelog")


#: The changelog's JSON encoder (without the check for circular references: the entries are plain trees).
_encode = json_writer(default=_text)
