"""The batch loop's Kafka side, on confluent-kafka: the group consumer (``KafkaSource``), the
transactional producer (``KafkaTransactions``) and the changelog reader (``KafkaChangelog``).
Each turns the client's retriable failures into the loop's own (``streams.runtime.ports``).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from streams.messaging.topics import (
    MAX_LEDGER_RECORD_BYTES,
    READ_TRANSACTIONAL,
    REFETCH_PROMPTLY,
    SilentLogger,
    is_transient,
    retrying,
)
from streams.runtime.ports import OnAssign, OnRevoke, TransactionFailed, TransportError
from streams.runtime.processor import TopicPartitionKey
from streams.runtime.state import ChangelogRecord
from streams.settings import Settings

log = logging.getLogger(__name__)

#: How long a member that stopped heartbeating keeps its partitions. Kafka's default (45 s) is how
#: long a worker restarted after ``kill -9`` would wait before anything is processed; a broker's
#: lowest allowed value (``group.min.session.timeout.ms``) is 6 s. Heartbeats come from librdkafka's
#: own thread, so a long batch does not miss them.
SESSION_TIMEOUT_MS = 6_000


def instance_id(settings: Settings) -> str:
    """Stable across restarts of the same worker: a restarted worker's transactional producer
    fences its predecessor (whose open transaction is aborted at once, not after its timeout)."""
    return f"{settings.deployment}-{settings.role}-{socket.gethostname()}-{settings.web_port}"


def group_id(settings: Settings) -> str:
    """The consumer group: the sink role reads other topics than the stream, in a group of its own."""
    return f"{settings.deployment}-sink" if settings.role == "sink" else settings.deployment


def group_consumer(settings: Settings, group: str) -> Consumer:
    """A consumer in ``group`` as the worker's readers of records are made (the batch loop's
    ``KafkaSource`` and the OTLP input's): offsets committed by hand, committed records only, a
    bounded prefetch, eager rebalancing."""
    return Consumer({
        "bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": group,
        "enable.auto.commit": False, "auto.offset.reset": "earliest", "isolation.level": "read_committed",
        "session.timeout.ms": SESSION_TIMEOUT_MS, "heartbeat.interval.ms": SESSION_TIMEOUT_MS // 4,
        # Fetches below the largest record's size: a fetch response is held decompressed until its
        # last record is consumed, and at 8 MiB a few lz4 responses held 60-80 MB of the stream
        # worker's resident memory (memray, 1,000 tenants). A record batch larger than these limits is
        # still returned whole (the fetch protocol guarantees progress since Kafka 0.10.1, and
        # librdkafka grows its request): the fault suite's 2 MB records pass through to the DLQ.
        # 1 MiB (256 KiB a partition) saved 70 MB but was slower in both pairs measured (-4%, -12%
        # events/s); 4 MiB (1 MiB a partition) saves 35-50 MB, -12% and +25% in two pairs: this
        # host's drift. docs/performance.md has the runs. A prefetch queue of about two batches.
        "fetch.max.bytes": 4 * 1024 * 1024, "max.partition.fetch.bytes": 1024 * 1024,
        "queued.max.messages.kbytes": 8 * 1024,
        **REFETCH_PROMPTLY,
        # Eager rebalancing: every partition is revoked, then the new set assigned and restored whole
        # (ChangelogTables.clear, and the OTLP input's stored positions, rely on it).
        "partition.assignment.strategy": "range", "log_level": 3, "logger": logging.getLogger("librdkafka"),
    })


class KafkaSource:
    def __init__(self, settings: Settings) -> None:
        self.consumer = group_consumer(settings, group_id(settings))

    def subscribe(self, topics: list[str], on_assign: OnAssign, on_revoke: OnRevoke, on_lost: OnRevoke) -> None:
        def assigned(consumer: Consumer, partitions: list[TopicPartition]) -> None:
            starts = on_assign([(tp.topic, tp.partition) for tp in partitions])
            for tp in partitions:
                tp.offset = starts.get((tp.topic, tp.partition), tp.offset)
            consumer.assign(partitions)

        def revoked(consumer: Consumer, partitions: list[TopicPartition]) -> None:
            on_revoke([(tp.topic, tp.partition) for tp in partitions])

        def lost(consumer: Consumer, partitions: list[TopicPartition]) -> None:
            on_lost([(tp.topic, tp.partition) for tp in partitions])

        self.consumer.subscribe(topics, on_assign=assigned, on_revoke=revoked, on_lost=lost)

    def poll(self, max_records: int, timeout_s: float) -> Sequence[Message]:
        return self.consumer.consume(max_records, timeout=timeout_s)

    def seek(self, partition: TopicPartitionKey, offset: int) -> None:
        _transport(lambda: self.consumer.seek(TopicPartition(partition[0], partition[1], offset)))

    def committed(self, partitions: list[TopicPartitionKey]) -> dict[TopicPartitionKey, int]:
        if not partitions:
            return {}
        found = _transport(lambda: self.consumer.committed([TopicPartition(t, p) for t, p in partitions], timeout=30))
        return {(tp.topic, tp.partition): tp.offset for tp in found}

    def commit_offsets(self, offsets: dict[TopicPartitionKey, int]) -> None:
        try:
            self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                                 asynchronous=True)
        except KafkaException as exc:  # the group's offset only trails the committed position
            log.info("consumer offset commit failed: %s", exc.args[0])

    def highwater(self, partition: TopicPartitionKey) -> int:
        _, high = self.consumer.get_watermark_offsets(TopicPartition(*partition), cached=True)
        return high

    def close(self) -> None:
        self.consumer.close()


class KafkaTransactions:
    """A transactional producer whose transactional id is stable per worker (``instance_id``, then
    ``suffix``: the OTLP input's producer is ``-otlp``)."""

    def __init__(self, settings: Settings, suffix: str = "") -> None:
        self.config = {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "transactional.id": instance_id(settings) + suffix,
            "transaction.timeout.ms": 30_000, "linger.ms": 5, "compression.type": "lz4",
            "partitioner": "murmur2_random", "message.max.bytes": MAX_LEDGER_RECORD_BYTES + 65_536,
            "log_level": 3, "logger": logging.getLogger("librdkafka"),
        }
        self.producer = Producer(self.config)

    def init(self) -> None:
        _while_retriable(self.producer.init_transactions)

    def begin(self) -> None:
        try:
            self.producer.begin_transaction()
        except KafkaException as exc:
            raise TransactionFailed(exc.args[0].str()) from exc

    def produce(self, topic: str, key: bytes | None, value: bytes | None, *, partition: int = -1,
                timestamp: int = 0, headers: Any = None) -> None:
        produce = self.producer.produce
        while True:
            try:
                # Positional (topic, value, key, partition, callback, on_delivery, timestamp, headers):
                # keyword arguments cost a dict per record, five records per event.
                produce(topic, value, key, partition, None, None, timestamp, headers)
                return
            except BufferError:
                self.producer.poll(0.05)
            except KafkaException as exc:
                raise TransactionFailed(exc.args[0].str()) from exc

    def commit(self) -> None:
        try:
            _while_retriable(self.producer.commit_transaction)
        except KafkaException as exc:
            raise TransactionFailed(exc.args[0].str()) from exc

    def abort(self) -> None:
        """Aborts the open transaction; a producer in a fatal state (a broker restart can leave it
        so: INVALID_TXN_STATE after a timed-out record) is replaced by a new one with the same
        transactional id, whose ``init_transactions`` aborts whatever the old one left open."""
        try:
            self.producer.abort_transaction(30)
            return
        except KafkaException as exc:
            log.warning("the transactional producer cannot abort (%s); starting a new one", exc.args[0])
        self.producer = Producer(self.config)  # the old one only holds records of the aborted batch
        self.init()

    def close(self) -> None:
        self.producer.flush(10)


class KafkaChangelog:
    """Reads a changelog's committed records (``read_committed``), each partition to its end."""

    def __init__(self, servers: str, group: str, timeout_s: float = 120.0) -> None:
        self.servers = servers
        self.group = group  # (it never commits: the name only tells whose reader this is)
        self.timeout_s = timeout_s

    def read(self, topic: str, partitions: Iterable[int]) -> Iterator[ChangelogRecord]:
        wanted = sorted(set(partitions))
        if not wanted:
            return
        consumer = Consumer({"bootstrap.servers": self.servers, "group.id": self.group,
                             "enable.auto.commit": False, **READ_TRANSACTIONAL, "log_level": 0,
                             "logger": SilentLogger()})
        try:
            deadline = time.monotonic() + self.timeout_s
            pending = set()
            for p in wanted:  # an empty partition (a new worker) needs no reading
                tp = TopicPartition(topic, p)
                low, high = _transport(lambda tp=tp: retrying(lambda: consumer.get_watermark_offsets(tp, timeout=10),
                                                              timeout_s=max(0.0, deadline - time.monotonic())))
                if high > low:
                    pending.add(p)
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(pending)])
            while pending:
                if time.monotonic() > deadline:
                    raise TransportError(f"reading {topic} partitions {sorted(pending)} took over {self.timeout_s:.0f}s")
                for msg in consumer.consume(10_000, timeout=0.5):
                    error = msg.error()
                    if error is None:
                        yield msg.partition(), msg.key(), msg.value()
                    elif error.code() == KafkaError._PARTITION_EOF:  # the rest are transaction markers
                        pending.discard(msg.partition())
                    elif error.fatal() or not error.retriable():
                        raise KafkaException(error)  # not transient: the worker exits and says why
        finally:
            consumer.close()


def _transport(call: Callable[[], Any]) -> Any:
    """``call``; a transient failure of it as ``TransportError`` (which the checkpoint retries)."""
    try:
        return call()
    except KafkaException as exc:
        if not is_transient(exc):
            raise
        raise TransportError(exc.args[0].str()) from exc


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
