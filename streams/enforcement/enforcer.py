"""The quota enforcer: the latest quota picture, and an allow / warn / block decision per tenant.

``DecisionBook`` is the pure logic. ``Enforcer`` feeds a book from Kafka in a background thread:
``quota.state`` from the beginning (compacted: the current usage of every window, so a new
enforcer starts from the full picture) and ``quota.alerts`` from the end (a threshold crossing
reaches the book without waiting for the next state flush). A gateway can embed an ``Enforcer``
and call ``decide()`` in-process, or ask ``costline enforcer`` over HTTP (``EnforcerClient``).

A limit counts toward a decision while its window is open on the wall clock. Tenant-wide limits
always count; a per-user, per-model or per-business-path limit counts when the question names
that user, model or path.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, KafkaException, Producer, TopicPartition
from pydantic import ValidationError

from schemas.quota import QuotaAlert, QuotaState, limit_key
from streams.enforcement.estimate import Estimator
from streams.enforcement.layout import EnforcerLayout
from streams.enforcement.reservations import ReservationBook, ReservationRequest
from streams.errors import CostlineError
from streams.messaging.topics import READ_TRANSACTIONAL
from streams.settings import Settings
from streams.stages.attribution import Attribution
from streams.stages.plans import Plans

log = logging.getLogger(__name__)

Verdict = Literal["allow", "warn", "block"]
#: How long a grant waits for its journal record to be acknowledged before it is refused.
JOURNAL_TIMEOUT_S = 5.0


class EnforcerStarting(CostlineError):
    """Reservations are not taken until the enforcer has restored them and read the counted usage."""
_RANK: dict[str, int] = {"ok": 0, "warning": 1, "soft_cap": 2, "hard_cap": 3}
_VERDICT: dict[str, Verdict] = {"ok": "allow", "warning": "warn", "soft_cap": "warn", "hard_cap": "block"}


@dataclass
class Decision:
    tenant_id: str
    decision: Verdict
    limits: list[dict[str, Any]] = field(default_factory=list)
    as_of: datetime = field(default_factory=lambda: datetime.now(UTC))

    def to_json(self) -> dict[str, Any]:
        return {"tenant_id": self.tenant_id, "decision": self.decision, "limits": self.limits,
                "as_of": self.as_of.isoformat()}


class DecisionBook:
    """The latest state of each tenant × limit × scope window. Thread-safe.

    A limit's decision comes from its window that is open now on the wall clock, not from its
    newest window: an event stamped ahead of time (a producer's skewed clock) opens a window in
    the future, which must not hide the current window's hard cap. Windows that have ended are
    dropped as decisions are made."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: limit key → window start → state.
        self._windows: dict[str, dict[datetime, QuotaState]] = {}
        self._by_tenant: dict[str, set[str]] = {}
        self._seen_alerts: set[str] = set()
        self.applied = 0

    def apply_state(self, state: QuotaState) -> None:
        with self._lock:
            self._merge(state)

    def apply_alert(self, alert: QuotaAlert) -> None:
        """An alert raises its window's status at once; a re-delivered alert (same id) changes nothing."""
        with self._lock:
            if alert.alert_id in self._seen_alerts:
                return
            self._seen_alerts.add(alert.alert_id)
            current = self._windows.get(limit_key(alert.tenant_id, alert.limit_id, alert.scope_value), {}).get(
                alert.window_start)
            usage = max(alert.usage, current.usage) if current is not None else alert.usage
            self._merge(QuotaState(
                tenant_id=alert.tenant_id, limit_id=alert.limit_id, metric=alert.metric, scope=alert.scope,
                scope_value=alert.scope_value, window_start=alert.window_start, window_end=alert.window_end,
                usage=usage, limit=alert.limit, remaining=max(alert.limit - usage, Decimal(0)), status=alert.level,
                as_of=alert.crossed_at))

    def _merge(self, state: QuotaState) -> None:
        """Within a window keeps the higher usage and status (both only grow)."""
        self.applied += 1
        windows = self._windows.setdefault(state.limit_key, {})
        current = windows.get(state.window_start)
        if current is not None:
            if state.usage < current.usage:
                return
            if _RANK[current.status] > _RANK[state.status]:
                state = state.model_copy(update={"status": current.status})
        windows[state.window_start] = state
        self._by_tenant.setdefault(state.tenant_id, set()).add(state.limit_key)

    def usage_of(self, key: str, window_start: datetime) -> Decimal:
        """The stream's counted usage of one window (0 before its first state)."""
        with self._lock:
            state = self._windows.get(key, {}).get(window_start)
        return state.usage if state is not None else Decimal(0)

    def decide(self, tenant: str, *, user: str | None = None, model: str | None = None,
               business_path: str | None = None, now: datetime | None = None) -> Decision:
        now = now or datetime.now(UTC)
        asked = {"tenant": "*", "user": user, "model": model, "business_path": business_path}
        states = []
        with self._lock:
            for key in self._by_tenant.get(tenant, ()):
                windows = self._windows[key]
                for start in [start for start, state in windows.items() if state.window_end <= now]:
                    del windows[start]  # ended: no decision reads it again
                states.extend(state for start, state in windows.items() if start <= now)
        worst = "ok"
        limits = []
        for state in sorted(states, key=lambda s: (s.limit_id, s.scope_value)):
            if asked.get(state.scope) != state.scope_value:
                continue
            if _RANK[state.status] > _RANK[worst]:
                worst = state.status
            limits.append(json.loads(state.model_dump_json()))
        return Decision(tenant_id=tenant, decision=_VERDICT[worst], limits=limits, as_of=now)


class JournalFailed(CostlineError):
    """A reservation could not be made durable: it is not granted."""

    @classmethod
    def timed_out(cls, topic: str) -> JournalFailed:
        return cls(f"the reservation could not be written to {topic}: no answer from Kafka "
                   f"in {JOURNAL_TIMEOUT_S:.0f} s; retry it")


class KafkaJournal:
    """The reservations' journal on the compacted ``quota.reservations`` topic: a grant is written
    (``acks=all``) and its delivery awaited before it is answered; a hold gone (settled, released,
    expired) gets a tombstone, sent without waiting (lost, the hold comes back after a restart and
    ends with its lease: budget held longer, never spent twice)."""

    def __init__(self, settings: Settings) -> None:
        self.topic = settings.topics.reservations
        # linger.ms 0: measured at 1,000 writes a second, 0 gave p50 0.41 / p99 7.4 ms, 1 gave
        # 1.8 / 41 ms and 5 gave 5.4 / 18 ms (records still share requests while others are in
        # flight). The idempotent producer keeps a record and the tombstone after it in order.
        self.producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers, "acks": "all",
                                  "enable.idempotence": True, "linger.ms": 0})
        #: Writes sent and not yet reported on.
        self.in_flight = 0
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self.start_polling()

    def start_polling(self) -> None:
        """Serves the delivery reports on a thread of its own (for callers that wait on a write)."""
        if self._poller is None:
            self._stop.clear()
            self._poller = threading.Thread(target=self._poll, name="reservation-journal", daemon=True)
            self._poller.start()

    def stop_polling(self) -> None:
        """Leaves the delivery reports to the caller, who then calls ``producer.poll`` (the
        enforcer's event loop does, and answers each grant in the report's callback)."""
        if self._poller is not None:
            self._stop.set()
            self._poller.join(5)
            self._poller = None

    def write(self, reservation_id: str, record: dict[str, Any]) -> Future[None]:
        """Sends a grant's record; the future ends when the broker has it (or raises ``JournalFailed``)."""
        written: Future[None] = Future()
        topic = self.topic

        def report(error: KafkaError | None, _: object) -> None:
            self.in_flight -= 1
            try:
                if error is None:
                    written.set_result(None)
                else:
                    written.set_exception(JournalFailed(f"the reservation could not be written to {topic}: "
                                                        f"{error.str()}; retry it"))
            except InvalidStateError:  # (cancelled: its caller stopped waiting and released the hold)
                pass

        try:
            self.producer.produce(topic, key=reservation_id.encode(), value=json.dumps(record).encode(),
                                  on_delivery=report)
            self.in_flight += 1
        except (BufferError, KafkaException) as exc:
            written.set_exception(JournalFailed(f"the reservation could not be written to {topic}: {exc}; retry it"))
        return written

    def __call__(self, reservation_id: str, record: dict[str, Any] | None) -> None:
        if record is None:
            self.producer.produce(self.topic, key=reservation_id.encode(), value=None)
            return
        try:
            self.write(reservation_id, record).result(JOURNAL_TIMEOUT_S)
        except FutureTimeout:
            raise JournalFailed.timed_out(self.topic) from None

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.05)

    def close(self) -> None:
        self.stop_polling()
        self.producer.flush(5)


def read_journal(consumer: Consumer, topic: str, timeout_s: float = 30) -> list[dict[str, Any]]:
    """The live records of the journal: the latest of each reservation id, tombstones applied."""
    metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
    if metadata is None or metadata.error is not None:
        return []
    ends = {}
    for partition in metadata.partitions:
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
        if high > 0:
            ends[partition] = high
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
    live: dict[bytes, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while ends and time.monotonic() < deadline:
        msg = consumer.poll(0.1)
        if msg is None or msg.error() is not None:
            continue
        if msg.value() is None:
            live.pop(msg.key(), None)
        else:
            live[msg.key()] = json.loads(msg.value())
        if msg.offset() + 1 >= ends.get(msg.partition(), 0):
            ends.pop(msg.partition(), None)
    consumer.unassign()
    if ends:
        raise KafkaException(f"could not read {topic} to its end in {timeout_s:.0f} s")
    return list(live.values())


class Enforcer:
    """A ``DecisionBook`` kept current from Kafka by a background thread, and the reservations
    (``streams.enforcement.reservations``) that the usage it applies settles. With ``durable``,
    reservations are journaled to ``quota.reservations`` and restored from it at start."""

    def __init__(self, settings: Settings, book: DecisionBook | None = None, durable: bool = True) -> None:
        self.settings = settings
        self.book = book or DecisionBook()
        self.journal = KafkaJournal(settings) if durable else None
        self.layout = EnforcerLayout.from_settings(settings)
        self.reservations = ReservationBook(Plans.from_file(settings.plans_file), self.book.usage_of,
                                            journal=self.journal, new_id=self.layout.reservation_id)
        #: Grants whose journal write is in flight: a retry of one waits for the same write.
        self._pending: dict[str, Future[None]] = {}
        self.estimator = Estimator(Attribution.from_settings(settings).pricer, settings.reserve_max_output_tokens,
                                   settings.reserve_unknown_usd)
        self.ready = threading.Event()
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="quota-enforcer", daemon=True)

    def start(self) -> Enforcer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        if self.journal is not None:
            self.journal.close()

    def __enter__(self) -> Enforcer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def decide(self, tenant: str, **scope: str | None) -> Decision:
        return self.book.decide(tenant, **scope)

    @property
    def journal_topic(self) -> str:
        return self.settings.topics.reservations

    def reserve(self, request: ReservationRequest, now: datetime | None = None) -> dict[str, Any]:
        """``admit``, waiting for the journal: for a gateway that embeds the enforcer."""
        answer, durable = self.admit(request, now)
        if durable is not None:
            try:
                durable.result(JOURNAL_TIMEOUT_S)
            except FutureTimeout:
                durable.cancel()
                raise JournalFailed.timed_out(self.journal_topic) from None
        return answer

    def admit(self, request: ReservationRequest, now: datetime | None = None) -> tuple[dict[str, Any],
                                                                                       Future[None] | None]:
        """The answer to a reservation request, and, for a grant, the future of its journal write,
        which must end before the answer is given (None when there is nothing to wait for). A
        write that fails or is cancelled releases its hold."""
        if not self.ready.is_set():  # (reservations restored and the counted usage read)
            raise EnforcerStarting("the enforcer is starting: retry in a moment")
        now = now or datetime.now(UTC)
        answer, hold = self.reservations.grant(request, self.estimator.estimate(request, now), now)
        if hold is None or self.journal is None:
            return answer, self._pending.get(answer.get("reservation_id", ""))
        reservation_id = hold.reservation_id
        durable = self._pending[reservation_id] = self.journal.write(reservation_id, hold.to_record())

        def written(future: Future[None]) -> None:
            self._pending.pop(reservation_id, None)
            if future.cancelled() or future.exception() is not None:
                self.reservations.release(reservation_id)

        durable.add_done_callback(written)
        return answer, durable

    def _run(self) -> None:
        topics = self.settings.topics
        consumer = Consumer({
            "bootstrap.servers": self.settings.kafka_bootstrap_servers,
            "group.id": f"costline-enforcer-{uuid.uuid4().hex}",  # offsets are never committed
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 50,
            **READ_TRANSACTIONAL,  # the worker writes both topics in transactions
        })
        try:
            if self.journal is not None:
                mine = [record for record in read_journal(consumer, topics.reservations)
                        if self.layout.owns(record["tenant_id"])]  # (the other enforcers restore theirs)
                restored = self.reservations.restore(mine, datetime.now(UTC))
                log.info("reservations restored: %d live", restored)
            metadata = consumer.list_topics(timeout=10)
            deadline = time.monotonic() + 10  # a topic created a moment ago can be missing from metadata
            while not {topics.state, topics.alerts} <= set(metadata.topics) and time.monotonic() < deadline:
                time.sleep(0.2)
                metadata = consumer.list_topics(timeout=10)
            assignment, behind = [], {}
            for topic, start in ((topics.state, OFFSET_BEGINNING), (topics.alerts, OFFSET_END)):
                if topic not in metadata.topics:
                    raise KafkaException(f"topic {topic} does not exist: start a worker first")
                for partition in metadata.topics[topic].partitions:
                    assignment.append(TopicPartition(topic, partition, start))
                    if topic == topics.state:
                        _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
                        if high > 0:
                            behind[partition] = high
            consumer.assign(assignment)
            if not behind:
                self.ready.set()
            expired_at = time.monotonic()
            while not self._stop.is_set():
                if time.monotonic() - expired_at >= 1.0:  # leases end on time even without requests
                    expired_at = time.monotonic()
                    if self.reservations.expire(datetime.now(UTC)):
                        log.info("reservations expired unsettled: %d so far", self.reservations.counters.expired)
                msg = consumer.poll(0.1)
                if msg is None:
                    continue
                if msg.error() is None:
                    self._apply(msg.topic(), msg.value())
                elif msg.error().code() != KafkaError._PARTITION_EOF:
                    continue
                if not self.ready.is_set() and msg.topic() == topics.state:
                    if msg.error() is not None or msg.offset() + 1 >= behind.get(msg.partition(), 0):
                        behind.pop(msg.partition(), None)
                    if not behind:
                        self.ready.set()
        except KafkaException as exc:
            self.errors += 1
            log.error("the enforcer's consumer stopped: %s", exc)
        finally:
            consumer.close()

    def _apply(self, topic: str, value: bytes | None) -> None:
        if value is None:
            return
        try:
            if topic == self.settings.topics.state:
                state = QuotaState.model_validate_json(value)
                self.book.apply_state(state)
                self.reservations.settle(state)  # after its usage is applied: never counted nowhere
            else:
                self.book.apply_alert(QuotaAlert.model_validate_json(value))
        except ValidationError as exc:
            self.errors += 1
            log.warning("ignored a malformed record on %s: %s", topic, exc.errors()[0]["msg"])
