"""Recovery commands: re-submit dead letters, and re-attribute a time range of ``usage.raw``.

Both are safe to run more than once: the ledger keeps one row per event (``event_id``), so an
event that reaches it again replaces its earlier row instead of adding to the totals.

``replay_dead_letters`` reads ``usage.dlq`` with its own consumer group and commits as it goes,
so each dead letter is re-submitted once; the original key, bytes and timestamp go back to
``usage.raw`` (or the topic they were read from: usage.attributed, quota.alerts, usage.ledger, an
OpenTelemetry spans topic),
where the worker validates them again (a record that is still invalid returns to the dead-letter
topic with its reason).

``backfill`` reads ``usage.raw`` from the offsets of ``since`` to those of ``until`` (or the end),
attributes every record through the same entry point as the worker
(``Attribution.attribute_raw``, with the worker's limits) and publishes the attributions to
``usage.attributed``, where the worker's loop lands them (role ``all`` reads that topic too; role
``sink`` reads it beside the ledger blocks of usage.ledger). Quota windows are not touched: they counted these events when they
first arrived, and an event they found late keeps its ``late`` flag (read from the ledger).
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from schemas.dead_letter import HEADER_REASON, HEADER_TOPIC, Rejection
from schemas.usage import epoch_ms
from streams.messaging.producer import UsageProducer
from streams.messaging.topics import MAX_LEDGER_RECORD_BYTES, READ_TRANSACTIONAL
from streams.settings import Settings
from streams.stages.attribution import Attribution
from streams.storage.query import query, sql_time

DLQ_REPLAY_GROUP = "dlq-replay"
#: The reasons of the OTLP input's dead letters (``streams.stages.spans``).
OTLP_REASONS = ("invalid_otlp", "invalid_span")


@dataclass
class ReplayResult:
    read: int = 0
    resubmitted: int = 0
    skipped: int = 0
    rejected: Counter[str] = field(default_factory=Counter)


def _read_range(
    consumer: Consumer,
    topic: str,
    starts: Callable[[list[TopicPartition]], list[TopicPartition]],
    until_ms: int | None,
    on_message: Callable[[Message], None],
    timeout_s: float,
) -> list[TopicPartition]:
    """Reads each partition of ``topic`` from its start offset up to the end seen at the start
    (or up to ``until_ms``), calling ``on_message`` in offset order per partition. Returns the
    offset after the last record handed over, per partition, for the caller to commit (records
    that arrived after the start are read past but not handed over, and not committed)."""
    metadata = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
    if metadata is None or metadata.error is not None:
        raise KafkaException(f"topic {topic} does not exist")
    partitions = [TopicPartition(topic, p) for p in sorted(metadata.partitions)]
    ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=timeout_s)[1] for tp in partitions}
    if until_ms is not None:
        stops = consumer.offsets_for_times([TopicPartition(topic, p, until_ms) for p in ends], timeout=timeout_s)
        ends = {tp.partition: tp.offset if tp.offset >= 0 else ends[tp.partition] for tp in stops}
    assignment = [tp for tp in starts(partitions) if tp.offset < ends[tp.partition]]
    remaining = {tp.partition for tp in assignment}
    done: dict[int, int] = {}
    if not remaining:
        return []
    consumer.assign(assignment)
    while remaining:
        msg = consumer.poll(timeout_s)
        if msg is None:
            raise KafkaException(f"no record from {topic} within {timeout_s:.0f}s before reaching its end")
        if msg.error():
            if msg.error().code() == KafkaError._PARTITION_EOF:  # the rest are transaction markers
                remaining.discard(msg.partition())
            continue
        if msg.offset() < ends[msg.partition()]:
            on_message(msg)
            done[msg.partition()] = msg.offset() + 1
        if msg.offset() + 1 >= ends[msg.partition()]:
            remaining.discard(msg.partition())
    return [TopicPartition(topic, p, offset) for p, offset in sorted(done.items())]


def replay_dead_letters(settings: Settings, reason: str | None = None, timeout_s: float = 10.0) -> ReplayResult:
    result = ReplayResult()
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers,
                         "group.id": f"{settings.deployment}-{DLQ_REPLAY_GROUP}", "enable.auto.commit": False,
                         "auto.offset.reset": "earliest", **READ_TRANSACTIONAL})

    def committed_starts(partitions: list[TopicPartition]) -> list[TopicPartition]:
        starts = consumer.committed(partitions, timeout=timeout_s)
        return [TopicPartition(tp.topic, tp.partition, max(tp.offset, 0)) for tp in starts]

    try:
        t = settings.topics
        # A dead letter goes back to the topic it was read from (a ledger block the sink refused
        # to usage.ledger, not to usage.raw, where it could only fail again), and to usage.raw
        # if that topic is not one of the pipeline's (a record from before the header was set).
        sources = {t.raw, t.attributed, t.alerts, t.ledger}
        with UsageProducer(settings.kafka_bootstrap_servers, t.raw,
                           config={"message.max.bytes": MAX_LEDGER_RECORD_BYTES + 65_536}) as producer:
            def resubmit(msg: Message) -> None:
                result.read += 1
                headers = dict(msg.headers() or [])
                if reason is not None and headers.get(HEADER_REASON, b"").decode() != reason:
                    result.skipped += 1
                    return
                source = headers.get(HEADER_TOPIC, b"").decode()
                # (a span message's dead letter goes back to the spans topic it came from, whose name
                # is the Collector's: the replaying shell need not know it)
                spans = headers.get(HEADER_REASON, b"").decode() in OTLP_REASONS and source
                producer.send_raw(msg.value() or b"", key=msg.key(), timestamp_ms=msg.timestamp()[1],
                                  topic=source if source in sources or spans else t.raw)
                result.resubmitted += 1

            handled = _read_range(consumer, settings.topics.dlq, committed_starts, None, resubmit, timeout_s)
            producer.flush()
        if handled:
            consumer.commit(offsets=handled, asynchronous=False)
    finally:
        consumer.close()
    return result


def backfill(settings: Settings, attribution: Attribution, since: datetime, until: datetime | None = None,
             timeout_s: float = 10.0, late: set[str] | None = None) -> ReplayResult:
    """``late``: the events the quota stage found late when they first arrived (by default read
    from the ledger): backfill sees no quota windows, so it keeps their ``late`` flag from there."""
    result = ReplayResult()
    late = late_events(settings, since, until) if late is None else late
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers,
                         "group.id": f"costline-backfill-{uuid.uuid4().hex}", "enable.auto.commit": False,
                         **READ_TRANSACTIONAL})

    def by_time(partitions: list[TopicPartition]) -> list[TopicPartition]:
        wanted = [TopicPartition(tp.topic, tp.partition, since_ms) for tp in partitions]
        found = consumer.offsets_for_times(wanted, timeout=timeout_s)
        return [tp for tp in found if tp.offset >= 0]

    since_ms, until_ms = epoch_ms(since), epoch_ms(until) if until else None

    try:
        with UsageProducer(settings.kafka_bootstrap_servers, settings.topics.attributed) as producer:
            def reattribute(msg: Message) -> None:
                result.read += 1
                timestamp = msg.timestamp()[1]
                if timestamp < since_ms or (until_ms is not None and timestamp >= until_ms):
                    result.skipped += 1  # record timestamps are event times, so a partition is not in time order
                    return
                out = attribution.attribute_raw(msg.value())
                if isinstance(out, Rejection):
                    result.rejected[out.reason] += 1
                    return
                if out.event_id in late:
                    out = out.model_copy(update={"late": True})
                producer.send_raw(out.model_dump_json().encode(), key=out.tenant_id.encode(), timestamp_ms=timestamp)
                result.resubmitted += 1

            _read_range(consumer, settings.topics.raw, by_time, until_ms, reattribute, timeout_s)
    finally:
        consumer.close()
    return result


def late_events(settings: Settings, since: datetime, until: datetime | None) -> set[str]:
    """The ids of the ledger's late events with event times in [since, until)."""
    where = f"event_time >= {sql_time(since)}" + (f" AND event_time < {sql_time(until)}" if until else "")
    return {row[0] for row in query(settings, f"SELECT event_id FROM usage WHERE late AND {where}").rows}
