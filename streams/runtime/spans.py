"""The OTLP input: spans from an OpenTelemetry Collector's topic → usage events on usage.raw.

``SpanIngest`` runs on a thread of its own in workers of roles ``all`` and ``stream`` when
``COSTLINE_OTLP_TOPIC`` is set. Each turn reads up to ``BATCH`` messages, maps them
(``streams.stages.spans``), and in one Kafka transaction publishes the events to usage.raw, the
messages that cannot be used to usage.dlq with their reasons, and the messages' offsets for its
consumer group (``send_offsets_to_transaction``). So a message is published exactly once, or, if
the transaction is aborted, read again from the committed offsets and published then.

Why a hop through usage.raw, not spans into the batch loop directly: the quota windows are kept
per usage.raw partition, and usage.raw is keyed by tenant, so a tenant's events are all counted
in one place. The Collector keys its messages by trace id, or not at all, so a tenant's spans
arrive on every partition of its topic. Published keyed by tenant, they take the path every
producer's events take: the same validation, pricing, quota windows, dead letters and copy
checks. A span delivered twice becomes two records with one ``event_id``, collapsed downstream as
any resent event. The cost is one produce an event.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import fields

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from schemas.dead_letter import Rejection, dead_letter_headers
from streams.messaging.topics import REFETCH_PROMPTLY
from streams.runtime.kafka import SESSION_TIMEOUT_MS, instance_id
from streams.runtime.loop import EXIT_FAILED
from streams.runtime.metrics import Counters
from streams.settings import Settings
from streams.stages.spans import SpanMapping, SpanOutcome

log = logging.getLogger(__name__)

#: Messages read a turn (each one span, or a Collector's whole export batch).
BATCH = 500
#: The longest wait for messages in a turn: a span reaches usage.raw within about this much, plus
#: its transaction's commit.
WAIT_S = 0.1


#: The counters of the OTLP input (``Counters.otlp_*``): a turn's are added to the worker's once committed.
_COUNTED = [f.name for f in fields(Counters) if f.name.startswith("otlp_")]


class SpanIngest:
    """Reads ``settings.otlp_topic`` in the consumer group ``<deployment>-otlp``; see the module docstring."""

    def __init__(self, settings: Settings, mapping: SpanMapping, counters: Counters) -> None:
        self.settings, self.mapping, self.counters = settings, mapping, counters
        self.topic = settings.otlp_topic
        self.stopping = threading.Event()
        self.consumer = Consumer({
            "bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": f"{settings.deployment}-otlp",
            "enable.auto.commit": False, "auto.offset.reset": "earliest", "isolation.level": "read_committed",
            "session.timeout.ms": SESSION_TIMEOUT_MS, "heartbeat.interval.ms": SESSION_TIMEOUT_MS // 4,
            **REFETCH_PROMPTLY, "log_level": 3, "logger": logging.getLogger("librdkafka"),
        })
        # The same partitioner as every usage.raw producer (``UsageProducer``): a tenant's events,
        # whoever publishes them, go to one partition.
        self.config = {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "transactional.id": f"{instance_id(settings)}-otlp", "transaction.timeout.ms": 30_000,
            "linger.ms": 5, "compression.type": "lz4", "partitioner": "murmur2_random",
            "log_level": 3, "logger": logging.getLogger("librdkafka"),
        }
        self.producer = Producer(self.config)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="costline-otlp", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _main(self) -> None:
        try:
            self.run()
        except Exception:  # noqa: BLE001 - a worker that stopped reading spans must not look healthy
            log.exception("the OTLP input failed; exiting so that a supervisor restarts the worker")
            os._exit(EXIT_FAILED)

    def run(self) -> None:
        """Until ``stopping`` is set."""
        self.producer.init_transactions(30)
        self.consumer.subscribe([self.topic])
        log.info("reading OpenTelemetry spans from %s", self.topic)
        try:
            while not self.stopping.is_set():
                messages = [m for m in self.consumer.consume(BATCH, timeout=WAIT_S) if self._usable(m)]
                if messages:
                    self._publish(messages)
        finally:
            self.consumer.close()
            self.producer.flush(10)

    def _usable(self, message: Message) -> bool:
        error = message.error()
        if error is None:
            return True
        if error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            log.warning("%s does not exist yet: waiting for the Collector to create it", self.topic)
        elif error.code() != KafkaError._PARTITION_EOF:
            log.warning("OTLP consumer error: %s", error)
        return False

    def _publish(self, messages: list[Message]) -> None:
        """One transaction: the messages' events and dead letters, and their offsets."""
        t, produce = self.settings.topics, self.producer.produce
        done = Counters(otlp_messages=len(messages))  # (this turn's, added to the worker's once committed)
        try:
            self.producer.begin_transaction()
            for message in messages:
                outcome = self._outcome(message)
                done.otlp_spans += outcome.spans
                done.otlp_skipped += outcome.skipped
                for event in outcome.events:
                    _retrying(self.producer, lambda e=event: produce(
                        t.raw, e.model_dump_json(exclude_defaults=True).encode(), e.kafka_key(),
                        timestamp=e.timestamp_ms()))
                    done.otlp_events += 1
                if outcome.rejection is not None:
                    log.info("dead-lettered %s[%s]@%s: %s: %s", message.topic(), message.partition(),
                             message.offset(), outcome.rejection.reason, outcome.rejection.message)
                    _retrying(self.producer, lambda m=message, r=outcome.rejection: produce(
                        t.dlq, m.value() or b"", m.key(), timestamp=m.timestamp()[1],
                        headers=dead_letter_headers(r, m.topic(), m.partition(), m.offset())))
                    done.otlp_dead_lettered += 1
            self.producer.send_offsets_to_transaction(self._next_offsets(messages),
                                                      self.consumer.consumer_group_metadata(), 30)
            self.producer.commit_transaction(30)
        except KafkaException as exc:
            self._abort(exc, messages)
            return
        for name in _COUNTED:
            setattr(self.counters, name, getattr(self.counters, name) + getattr(done, name))

    def _outcome(self, message: Message) -> SpanOutcome:
        """The message's outcome; a bug on one message makes it a dead letter, never stops the input."""
        try:
            return self.mapping.outcome(message.value())
        except Exception as exc:  # noqa: BLE001 - as in the batch processor
            log.exception("mapping failed for %s[%s]@%s", message.topic(), message.partition(), message.offset())
            return SpanOutcome(rejection=Rejection(reason="processing_error",
                                                   message=f"{type(exc).__name__}: {exc}"[:500]))

    @staticmethod
    def _next_offsets(messages: list[Message]) -> list[TopicPartition]:
        offsets: dict[tuple[str, int], int] = {}
        for m in messages:
            offsets[(m.topic(), m.partition())] = m.offset() + 1
        return [TopicPartition(topic, partition, offset) for (topic, partition), offset in offsets.items()]

    def _abort(self, exc: KafkaException, messages: list[Message]) -> None:
        """Drops the transaction and goes back to its messages' first offsets (where the group's
        committed offsets are: each turn commits its own): they are read and published again. A
        producer that cannot abort (in a fatal state after a broker's restart) is replaced."""
        log.warning("OTLP input transaction failed (%s); reading its messages again", exc.args[0])
        try:
            self.producer.abort_transaction(30)
        except KafkaException:
            self.producer = Producer(self.config)
            self.producer.init_transactions(30)
        firsts: dict[tuple[str, int], int] = {}
        for m in messages:
            firsts.setdefault((m.topic(), m.partition()), m.offset())
        for (topic, partition), offset in firsts.items():
            try:
                self.consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as seek_error:  # (revoked meanwhile: its next owner starts at the committed offset)
                log.info("not rewinding %s[%s]: %s", topic, partition, seek_error.args[0])


def _retrying(producer: Producer, produce: Callable[[], None]) -> None:
    """``produce``, waiting for room in the producer's queue when it is full."""
    while True:
        try:
            produce()
            return
        except BufferError:
            producer.poll(0.05)
