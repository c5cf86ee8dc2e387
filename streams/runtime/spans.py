"""The OTLP input: spans from an OpenTelemetry Collector's topic → usage events on usage.raw.

``SpanIngest`` runs on a thread of its own in workers of roles ``all`` and ``stream`` when
``COSTLINE_OTLP_TOPIC`` is set. Each turn reads up to ``BATCH`` messages, maps them
(``streams.stages.spans``) and then, in one Kafka transaction (``KafkaTransactions``, the batch
loop's, with its own transactional id), publishes the events to usage.raw, the dead letters to
usage.dlq, and the next offset of each partition it read to a compacted positions topic
(``otlp_positions_topic``). A partition assigned to the input starts at its stored position. A
transaction that fails is aborted, the rest of its read dropped, and its messages read again from
the last committed positions (not from the turn's first offsets: a commit that failed on the way
back may have been made). So no span is lost; a span may be published twice (a worker that lost its
partitions without knowing it, a restart right after a commit), and its copies collapse by their
``event_id`` as any resent event's do: the same as the batch loop's guarantee. Retriable broker
errors are retried as the batch loop's are; a turn holds at most ``TURN_BYTES`` of messages, so
that it commits well within its transaction's timeout.

Why positions of its own, as the batch loop keeps its own in its changelog, and not the group's
offsets committed in the transaction (``send_offsets_to_transaction``): after a broker restart
that call hung past its timeout, for good, in librdkafka 2.16 (confluentinc/librdkafka#5456 and
#5511; ``tests/faults``' broker restart with spans found it). The group's offsets are still
committed after each transaction, for lag monitoring only.

Why a hop through usage.raw, not spans into the batch loop directly: the quota windows are kept
per usage.raw partition, and usage.raw is keyed by tenant, so a tenant's events are all counted
in one place. The Collector keys its messages by trace id, or not at all, so a tenant's spans
arrive on every partition of its topic. Published keyed by tenant, they take the path every
producer's events take: the same validation, pricing, quota windows, dead letters and copy
checks. A span delivered twice becomes two records with one ``event_id``, collapsed downstream as
any resent event. The cost is one produce an event.

Why a thread of the worker, not a process or role of its own: nothing more to deploy or supervise,
and it is served by the worker's health, metrics and shutdown. It shares the interpreter with the
batch loop, which costs: mapping a call's span (read, mapped, checked, encoded) took 25 µs from
batched otlp_proto messages, 38 from one span a message, and 41-69 from otlp_json, against 6 µs
for the stream's attribution of the same event (``bench/otlp.py``). So a worker fed by spans spends more of its one core on the
input than on the stream; with many spans, run more processes (``--processes N``), each of which
reads a share of the spans topic's partitions. A failure it cannot recover from exits the worker
(as the batch loop's does), for its supervisor to restart both.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import fields

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from schemas.dead_letter import Rejection
from streams.messaging.topics import otlp_positions_topic, retrying
from streams.runtime.checkpoint import dead_letter
from streams.runtime.kafka import KafkaChangelog, KafkaTransactions, group_consumer
from streams.runtime.loop import EXIT_FAILED
from streams.runtime.metrics import Counters
from streams.runtime.ports import TransactionFailed, TransportError
from streams.settings import Settings
from streams.stages.spans import SpanMapping, SpanOutcome

log = logging.getLogger(__name__)

#: Messages read a turn (each one span, or a Collector's whole export batch).
BATCH = 500
#: The most message bytes a turn takes: a thousand-span export is about 0.5 MB, so a turn of a few
#: of them commits in well under a second, far from the transaction's 30 s timeout.
TURN_BYTES = 8 * 1024 * 1024
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
        self.consumer = group_consumer(settings, f"{settings.deployment}-otlp")
        # The batch loop's producer settings (the same partitioner as every usage.raw producer: a
        # tenant's events, whoever publishes them, go to one partition; room for any dead letter).
        self.transactions = KafkaTransactions(settings, suffix="-otlp")
        self.positions_topic = otlp_positions_topic(settings)
        self._positions_reader = KafkaChangelog(settings.kafka_bootstrap_servers, f"{settings.deployment}-otlp-restore")
        #: The positions of the assigned partitions: read at assignment, then each turn's, once committed.
        self._positions: dict[tuple[str, int], int] = {}
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
        self.transactions.init()
        self.consumer.subscribe([self.topic], on_assign=self._assigned)
        log.info("reading OpenTelemetry spans from %s", self.topic)
        try:
            while not self.stopping.is_set():
                messages = [m for m in self.consumer.consume(BATCH, timeout=WAIT_S) if self._usable(m)]
                for turn in _turns(messages):
                    if not self._publish(turn):
                        break  # (the rest of the read comes again, from the positions the abort went back to)
        finally:
            self.consumer.close()
            self.transactions.close()

    def _usable(self, message: Message) -> bool:
        error = message.error()
        if error is None:
            return True
        if error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            log.warning("%s does not exist yet: waiting for the Collector to create it", self.topic)
        elif error.code() != KafkaError._PARTITION_EOF:
            log.warning("OTLP consumer error: %s", error)
        return False

    def _publish(self, messages: list[Message]) -> bool:
        """One transaction: the messages' events and dead letters, and their positions; whether it
        was committed. The messages are mapped before it begins: a transaction stays open only
        while it is written."""
        t, tx = self.settings.topics, self.transactions
        outcomes = [self._outcome(m) for m in messages]
        done = Counters(otlp_messages=len(messages))  # (this turn's, added to the worker's once committed)
        try:
            tx.begin()
            for message, outcome in zip(messages, outcomes, strict=True):
                done.otlp_spans += outcome.spans
                done.otlp_skipped += outcome.skipped
                done.otlp_completed += outcome.completed
                for event in outcome.events:
                    tx.produce(t.raw, event.key, event.value, timestamp=event.timestamp_ms)
                    done.otlp_events += 1
                if outcome.rejection is not None:
                    dead_letter(tx, t.dlq, message, outcome.rejection, outcome.dead_value)
                    done.otlp_dead_lettered += 1
            nexts = _next_offsets(messages)
            for tp in nexts:
                tx.produce(self.positions_topic, f"{tp.topic}:{tp.partition}".encode(), str(tp.offset).encode())
            tx.commit()
        except TransactionFailed as exc:
            self._abort(exc, messages)
            return False
        self._positions.update({(tp.topic, tp.partition): tp.offset for tp in nexts})
        for name in _COUNTED:
            setattr(self.counters, name, getattr(self.counters, name) + getattr(done, name))
        try:  # (the group's offsets: for lag monitoring; the stored positions are what a start reads)
            self.consumer.commit(offsets=nexts, asynchronous=True)
        except KafkaException as exc:
            log.info("OTLP consumer offset commit failed: %s", exc.args[0])
        return True

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Each assigned partition starts at its stored position (the consumer group's committed
        offset, or the topic's beginning, where none is stored). A positions topic that cannot be
        read within ``KafkaChangelog``'s timeout raises: the worker exits, for its supervisor to
        restart it, rather than start from the group's offsets, which may trail far behind."""
        stored = self._stored()
        self._positions = {(tp.topic, tp.partition): stored[(tp.topic, tp.partition)]
                           for tp in partitions if (tp.topic, tp.partition) in stored}
        for tp in partitions:
            tp.offset = stored.get((tp.topic, tp.partition), tp.offset)
        consumer.assign(partitions)

    def _stored(self) -> dict[tuple[str, int], int]:
        """The positions topic's latest offset of each spans partition (a record that is not a
        position, which no Costline version writes, is logged and passed over)."""
        topic = self.positions_topic
        found = retrying(lambda: self.consumer.list_topics(topic, timeout=10)).topics.get(topic)
        if found is None or found.error is not None:
            raise TransportError(f"{topic} cannot be read: {found.error if found else 'missing'}")
        stored: dict[tuple[str, int], int] = {}
        for _, key, value in self._positions_reader.read(topic, found.partitions):
            try:
                spans_topic, _, partition = (key or b"").decode().rpartition(":")
                where = (spans_topic, int(partition))
                if value is None:
                    stored.pop(where, None)
                else:
                    stored[where] = int(value)
            except (UnicodeDecodeError, ValueError):
                log.warning("passing over a record of %s that is not a position: %r", topic, key)
        return stored

    def _outcome(self, message: Message) -> SpanOutcome:
        """The message's outcome; a bug on one message makes it a dead letter, never stops the input."""
        try:
            return self.mapping.outcome(message.value())
        except Exception as exc:  # noqa: BLE001 - as in the batch processor
            log.exception("mapping failed for %s[%s]@%s", message.topic(), message.partition(), message.offset())
            return SpanOutcome(rejection=Rejection(reason="processing_error",
                                                   message=f"{type(exc).__name__}: {exc}"[:500]))

    def _abort(self, exc: TransactionFailed, messages: list[Message]) -> None:
        """Aborts the transaction and goes back to the last committed positions of the turn's
        partitions (kept from the assignment and each commit; the turn's first offsets where there
        is none): the messages after them are read and published again."""
        log.warning("OTLP input transaction failed (%s); reading its messages again", exc)
        self.transactions.abort()
        self.counters.otlp_aborted += 1
        firsts: dict[tuple[str, int], int] = {}
        for m in messages:
            firsts.setdefault((m.topic(), m.partition()), m.offset())
        for key, first in firsts.items():
            try:
                self.consumer.seek(TopicPartition(*key, self._positions.get(key, first)))
            except KafkaException as error:  # (revoked meanwhile: its next owner starts at the stored position)
                log.info("not rewinding %s[%s]: %s", *key, error.args[0])


def _turns(messages: list[Message]) -> list[list[Message]]:
    """``messages`` in turns of at most ``TURN_BYTES`` (a larger message alone)."""
    turns: list[list[Message]] = []
    size = TURN_BYTES
    for m in messages:
        length = len(m.value() or b"")
        if size + length > TURN_BYTES:
            turns.append([])
            size = 0
        turns[-1].append(m)
        size += length
    return turns


def _next_offsets(messages: list[Message]) -> list[TopicPartition]:
    offsets: dict[tuple[str, int], int] = {}
    for m in messages:
        offsets[(m.topic(), m.partition())] = m.offset() + 1
    return [TopicPartition(topic, partition, offset) for (topic, partition), offset in offsets.items()]
