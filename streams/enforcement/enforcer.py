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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, KafkaException, TopicPartition
from pydantic import ValidationError

from schemas.quota import QuotaAlert, QuotaState, limit_key
from streams.enforcement.estimate import Estimator
from streams.enforcement.journal import ReservationJournal
from streams.enforcement.layout import EnforcerLayout
from streams.enforcement.reservations import ReservationBook, ReservationRequest
from streams.errors import CostlineError
from streams.messaging.topics import READ_TRANSACTIONAL
from streams.settings import Settings
from streams.stages.attribution import Attribution
from streams.stages.plans import Plans

log = logging.getLogger(__name__)

Verdict = Literal["allow", "warn", "block"]


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


class Enforcer:
    """A ``DecisionBook`` kept current from Kafka by a background thread, and the reservations
    (``streams.enforcement.reservations``) that the usage it applies settles. With ``durable``,
    reservations are journaled (``streams.enforcement.journal``) and restored at start."""

    def __init__(self, settings: Settings, book: DecisionBook | None = None, durable: bool = True) -> None:
        self.settings = settings
        self.book = book or DecisionBook()
        self.journal = ReservationJournal(settings) if durable else None
        self.layout = EnforcerLayout.from_settings(settings)
        self.reservations = ReservationBook(Plans.from_file(settings.plans_file), self.book.usage_of,
                                            journal=self.journal, new_id=self.layout.reservation_id)
        self.estimator = Estimator(Attribution.from_settings(settings).pricer, settings.reserve_max_output_tokens,
                                   settings.reserve_unknown_usd)
        self.ready = threading.Event()
        self.errors = 0
        self._restored = False
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

    def reserve(self, request: ReservationRequest, now: datetime | None = None) -> dict[str, Any]:
        """Grants (journaled before it returns) or refuses a hold (``streams.enforcement.reservations``)."""
        if not self.ready.is_set():  # (reservations restored and the counted usage read)
            raise EnforcerStarting("the enforcer is starting: retry in a moment")
        now = now or datetime.now(UTC)
        return self.reservations.reserve(request, self.estimator.estimate(request, now), now)

    def _run(self) -> None:
        """Consumes until stopped; any failure (a broker away longer than the client retries, a
        journal that cannot be read) is counted and logged, and the consumer started again, with
        backoff: an enforcer never stays "starting" for good, nor stops applying usage."""
        backoff = 1.0
        while not self._stop.is_set():
            try:
                self._consume()
                return
            except Exception as exc:  # noqa: BLE001 - counted, logged, retried
                self.errors += 1
                log.error("the enforcer's consumer stopped (%s: %s); starting it again in %.0f s",
                          type(exc).__name__, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _consume(self) -> None:
        topics = self.settings.topics
        consumer = Consumer({
            "bootstrap.servers": self.settings.kafka_bootstrap_servers,
            "group.id": f"costline-enforcer-{uuid.uuid4().hex}",  # offsets are never committed
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 50,
            **READ_TRANSACTIONAL,  # the worker writes both topics in transactions
        })
        try:
            if self.journal is not None and not self._restored:
                now = datetime.now(UTC)
                mine = [record for record in self.journal.restore(consumer)
                        if self.layout.owns(record["tenant_id"])]  # (the other enforcers restore theirs)
                restored = self.reservations.restore(mine, now)
                for record in mine:  # ended while no enforcer ran: gone from the topic too
                    if datetime.fromisoformat(record["expires_at"]) <= now:
                        self.journal.kafka(record["reservation_id"], None)
                self._restored = True
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
