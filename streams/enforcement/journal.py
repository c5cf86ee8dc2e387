"""Where an enforcer's reservations are kept, so that a restarted enforcer holds them again.

Two copies, written in this order for every grant and every hold gone (settled, released, expired):

1. **A local append-only file** (``<COSTLINE_HOME>/enforcer/reservations-<host>-<port>.jsonl``),
   written before the grant is answered. A ``write`` lands in the kernel's page cache in a few
   microseconds and survives the death of the process (``kill -9``, an out-of-memory kill, a
   crash): this is what makes a grant durable. It does not survive the loss of the machine
   (power, disk): nothing here is fsynced per grant.
2. **The compacted ``quota.reservations`` topic**, sent without waiting (``acks=all``, idempotent,
   so a grant and the tombstone after it stay in order). It is the copy that outlives the
   machine, and the one another enforcer restores from when the layout gives it the tenants.

Why not wait for Kafka before answering, as this journal first did: on the two cores the
enforcer shares with the broker, the acknowledgement took 1 ms at the median but 11-25 ms at the
99th percentile, and the grant waited for it; the target is 10 ms for the whole answer. What the
change costs: if the machine itself is lost, the grants of its last moments that Kafka had not
yet acknowledged (a few milliseconds' worth; ``journal_lag`` in the health answer) are not held
by the enforcer that takes over, and the calls they admitted may pass the cap by their
estimates. A process restart on the same machine loses nothing.

Restoring (``restore``) merges the two: the topic's live records, then the file's, where the file
is ahead. A tombstone lost on the way (file or topic) brings a hold back until its lease ends:
budget held longer, never spent twice. The file is rewritten with only its live holds when it
has grown to four times their number (and at start).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from streams.settings import Settings

log = logging.getLogger(__name__)

Record = dict[str, Any]


class FileJournal:
    """The local copy: one JSON line per change, ``[id, record]`` or ``[id, null]`` once gone."""

    #: The file is rewritten once it holds this many lines and four times as many as live holds.
    COMPACT_AFTER = 100_000

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        #: The line of each live hold (bytes: kept out of the garbage collector's walks).
        self._live: dict[str, bytes] = {}
        self._lines = 0
        self._fd = -1

    def load(self, now: datetime | None = None) -> tuple[dict[str, Record], set[str]]:
        """The file's live records and the ids it says are gone; rewrites it with only the live
        ones whose lease has not ended by ``now`` (the others are gone as well)."""
        live: dict[str, Record] = {}
        gone: set[str] = set()
        if self.path.exists():
            with self.path.open("rb") as lines:
                for line in lines:
                    try:
                        reservation_id, record = json.loads(line)
                    except ValueError:  # a line cut short by the machine's loss: the ones before it stand
                        continue
                    if record is None:
                        live.pop(reservation_id, None)
                        gone.add(reservation_id)
                    else:
                        live[reservation_id] = record
                        gone.discard(reservation_id)
        now = now or datetime.now(UTC)
        for reservation_id in [rid for rid, record in live.items() if _ended(record, now)]:
            del live[reservation_id]
            gone.add(reservation_id)
        with self._lock:
            self._live = {rid: _line(rid, record) for rid, record in live.items()}
            self._rewrite()
        return live, gone

    def __call__(self, reservation_id: str, record: Record | None) -> None:
        self.write([(reservation_id, record)])

    def write(self, changes: list[tuple[str, Record | None]]) -> None:
        """Appends the changes in one write."""
        lines = [_line(reservation_id, record) for reservation_id, record in changes]
        with self._lock:
            if self._fd < 0:
                self._open()
            os.write(self._fd, b"".join(lines))
            self._lines += len(lines)
            for (reservation_id, record), line in zip(changes, lines, strict=True):
                if record is None:
                    self._live.pop(reservation_id, None)
                else:
                    self._live[reservation_id] = line
            if self._lines >= self.COMPACT_AFTER and self._lines >= 4 * len(self._live):
                try:
                    self._rewrite()
                except OSError as exc:  # (a full disk: appends may still fit; tried again later)
                    self._lines = 0
                    log.warning("the reservation journal could not be rewritten: %s", exc)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def _rewrite(self) -> None:
        """The live lines to a new file, made durable, then put in the old one's place (a crash
        in between leaves the old file whole)."""
        started = time.perf_counter()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = self.path.with_suffix(".rewrite")
        with fresh.open("wb") as out:
            out.write(b"".join(self._live.values()))
            out.flush()
            os.fsync(out.fileno())
        os.replace(fresh, self.path)
        if self._fd >= 0:
            os.close(self._fd)
        self._open()
        self._lines = len(self._live)
        log.info("reservation journal rewritten: %d live holds in %.1f ms", self._lines,
                 (time.perf_counter() - started) * 1000)


class KafkaJournal:
    """The replicated copy on the compacted ``quota.reservations`` topic, sent without waiting;
    its delivery reports are served by a thread of its own."""

    def __init__(self, settings: Settings) -> None:
        self.topic = settings.topics.reservations
        self.producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers, "acks": "all",
                                  "enable.idempotence": True, "linger.ms": 1})
        #: Records sent and not yet acknowledged (what the machine's loss would cost), and the
        #: ones the broker refused (the file still has them).
        self.lag = 0
        self.failed = 0
        self._counting = threading.Lock()  # (sent from the loop and the consumer threads, reported on a third)
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="reservation-journal", daemon=True)
        self._poller.start()

    def __call__(self, reservation_id: str, record: Record | None) -> None:
        value = None if record is None else json.dumps(record).encode()
        try:
            self.producer.produce(self.topic, key=reservation_id.encode(), value=value, on_delivery=self._report)
            with self._counting:
                self.lag += 1
        except (BufferError, KafkaException) as exc:  # the file has it; a restart on this machine restores it
            with self._counting:
                self.failed += 1
            log.warning("a reservation record was not sent to %s: %s", self.topic, exc)

    def _report(self, error: KafkaError | None, _: object) -> None:
        with self._counting:
            self.lag -= 1
            self.failed += error is not None
        if error is not None:
            log.warning("%s refused a reservation record: %s", self.topic, error.str())

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.05)

    def close(self) -> None:
        self._stop.set()
        self._poller.join(5)
        self.producer.flush(5)


class ReservationJournal:
    """Both copies, the file first (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        instance = settings.enforcer_url.removeprefix("http://").removeprefix("https://").replace(":", "-")
        self.file = FileJournal(settings.home / "enforcer" / f"reservations-{instance.strip('/')}.jsonl")
        self.kafka = KafkaJournal(settings)

    def __call__(self, reservation_id: str, record: Record | None) -> None:
        self.file(reservation_id, record)
        self.kafka(reservation_id, record)

    def ended(self, reservation_ids: list[str]) -> None:
        """Holds whose lease ended: gone from the file (in one write), not tombstoned on the topic.
        A restore drops an ended hold by its expiry anyway, and the topic deletes records past the
        longest lease; a second's expiries (a thousand tombstones at 1,000 reservations a second)
        sent one by one took 30-50 ms from the thread that answers requests."""
        self.file.write([(reservation_id, None) for reservation_id in reservation_ids])

    def restore(self, consumer: Consumer) -> list[Record]:
        """The live records: the topic's, with the file's changes over them."""
        live = read_topic(consumer, self.kafka.topic)
        mine, gone = self.file.load()
        for reservation_id in gone:
            live.pop(reservation_id, None)
        live.update(mine)
        return list(live.values())

    def close(self) -> None:
        self.kafka.close()
        self.file.close()


def read_topic(consumer: Consumer, topic: str, timeout_s: float = 30) -> dict[str, Record]:
    """The live records of the journal topic by id: the latest of each, tombstones applied."""
    metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
    if metadata is None or metadata.error is not None:
        return {}
    ends = {}
    for partition in metadata.partitions:
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
        if high > 0:
            ends[partition] = high
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
    live: dict[str, Record] = {}
    deadline = time.monotonic() + timeout_s
    while ends and time.monotonic() < deadline:
        msg = consumer.poll(0.1)
        if msg is None or msg.error() is not None:
            continue
        key = msg.key().decode()
        if msg.value() is None:
            live.pop(key, None)
        else:
            try:
                live[key] = json.loads(msg.value())
            except ValueError:  # (not ours, or cut short: the rest of the journal still restores)
                log.warning("skipped a malformed record of %s at offset %d", topic, msg.offset())
        if msg.offset() + 1 >= ends.get(msg.partition(), 0):
            ends.pop(msg.partition(), None)
    consumer.unassign()
    if ends:
        raise KafkaException(f"could not read {topic} to its end in {timeout_s:.0f} s")
    return live


def _ended(record: Record, now: datetime) -> bool:
    try:
        return datetime.fromisoformat(record["expires_at"]) <= now
    except (KeyError, TypeError, ValueError):
        return False  # (kept: a hold the enforcer will judge itself)


def _line(reservation_id: str, record: Record | None) -> bytes:
    return (json.dumps([reservation_id, record], separators=(",", ":")) + "\n").encode()
