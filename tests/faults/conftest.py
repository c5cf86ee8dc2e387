"""The fault suite's harness: an isolated pipeline, a steady load of events with known costs,
and a reconciliation of what was sent with what the ledger and the quota windows hold.

Each case prints ``sent=N landed=N lost=N duplicated=N`` (collected and shown at the end of the
run). ``COSTLINE_FAULTS_FULL=1`` (``scripts/faults``) runs the long version of every case.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from schemas.quota import QuotaState
from schemas.usage import TokenUsage, UsageEvent
from streams.messaging.producer import UsageProducer
from streams.messaging.topics import ensure_topics
from streams.operations.processes import ROOT, WorkerProcess, free_port, isolated_env, remove_isolated_topics, wait_for
from streams.settings import Settings
from streams.stages.plans import Plans
from streams.stages.rating import usage_amount
from streams.stages.spans import Span, traces_of
from streams.storage.query import query
from tests.integration.conftest import read_topic

FULL = os.environ.get("COSTLINE_FAULTS_FULL") == "1"
TENANTS = 5
PLANS = """
dedup_seconds: 3600
default_plan: metered
plans:
  metered:
    limits:
      - {id: daily-spend, metric: cost_usd, window: day, limit: 1000000, thresholds: [100]}
    rate_card:
      charges:
        - {id: tokens, metric: tokens, per: 1000000, price: graduated, free_units: 100000,
           tiers: [{up_to: 1, unit_amount: "2.0"}, {up_to: 2, unit_amount: "1.5"}, {unit_amount: "1.0"}]}
        - {id: cost-plus, metric: cost_usd, price: unit, unit_amount: "1.25", discount_percent: "3.3"}
"""
REPORT: list[str] = []


def pytest_terminal_summary(terminalreporter: object) -> None:
    if REPORT:
        terminalreporter.write_sep("=", "fault suite reconciliation")  # type: ignore[attr-defined]
        for line in REPORT:
            terminalreporter.write_line(line)  # type: ignore[attr-defined]


def cost_of(i: int) -> Decimal:
    """gpt-4o at $2.50 per million input tokens and $10 per million output tokens."""
    tokens_in, tokens_out = 1_000 + (i * 37) % 20_000, 10 + (i * 11) % 900
    return (Decimal(tokens_in) * Decimal("2.5") + Decimal(tokens_out) * 10) / 1_000_000


def span_record(event: UsageEvent, i: int) -> tuple[bytes | None, bytes]:
    """``event`` as the OTLP input takes it: a Collector's message of one span (``otlp_proto``), keyed by
    trace id (``partition_traces_by_id``), with ids made from ``i`` so that a resent span is the same span."""
    trace_id, span_id = (i + 1).to_bytes(16, "big"), (i + 1).to_bytes(8, "big")
    end = int(event.timestamp.timestamp()) * 10**9 + event.timestamp.microsecond * 1000
    attributes = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": event.provider,
                  "gen_ai.request.model": event.model, "gen_ai.usage.input_tokens": event.usage.input_tokens,
                  "gen_ai.usage.output_tokens": event.usage.output_tokens}
    span = Span(trace_id.hex(), span_id.hex(), "", f"chat {event.model}", end - 10**8, end, 0, attributes,
                {"tenant.id": event.tenant_id}, "")
    return trace_id.hex().encode(), traces_of([span])  # (the input's own TracesData writer, as for its dead letters)


def event(run: str, i: int) -> UsageEvent:
    return UsageEvent(
        event_id=f"{run}-{i:06d}", timestamp=datetime.now(UTC), tenant_id=f"{run}-t{i % TENANTS}",
        provider="openai", model="gpt-4o",
        usage=TokenUsage(input_tokens=1_000 + (i * 37) % 20_000, output_tokens=10 + (i * 11) % 900))


@dataclass
class Load:
    """Sends ``total`` events at ``rate`` per second from a background thread (twice each when
    ``twice``: the copy follows ``copy_lag`` events later, as a producer retrying much later would).
    ``stop()`` ends it early: a case whose faults take an unknown time runs the load until they are
    over instead of guessing a total long enough for a slow machine."""

    servers: str
    topic: str
    run: str
    total: int
    rate: float
    twice: bool = False
    #: Each event sent as this record (key, value) instead of its JSON (``span_record``: as spans).
    as_record: Callable[[UsageEvent, int], tuple[bytes | None, bytes]] | None = None
    copy_lag: int = 200
    sent: int = 0
    copies: int = 0
    errors: list[BaseException] = field(default_factory=list)
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Load:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            started = time.monotonic()
            with UsageProducer(self.servers, self.topic, config={"message.timeout.ms": 300_000}) as producer:
                for i in range(self.total):
                    if self._stop.is_set():
                        break
                    if self.as_record is None:
                        producer.send(event(self.run, i))
                    else:
                        key, value = self.as_record(event(self.run, i), i)
                        producer.send_raw(value, key=key)
                    self.sent += 1
                    if self.twice and i >= self.copy_lag:
                        producer.send(event(self.run, i - self.copy_lag))
                        self.copies += 1
                    ahead = (i + 1) / self.rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
                if self.twice:
                    for i in range(max(self.sent - self.copy_lag, 0), self.sent):
                        producer.send(event(self.run, i))
                        self.copies += 1
                # As patient as message.timeout.ms: a restarted broker can take longer than the
                # default 30 s to take records again.
                producer.flush(timeout_s=300)
        except BaseException as exc:  # noqa: BLE001 - surfaced by wait()
            self.errors.append(exc)

    def stop(self) -> None:
        self._stop.set()
        self.wait()

    def wait(self, timeout_s: float = 600) -> None:
        assert self._thread is not None
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the load did not finish"
        assert self.errors == [], f"the producer failed: {self.errors[0]!r}"

    @property
    def finished(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()


@dataclass
class Pipeline:
    name: str
    tmp: Path
    servers: str
    env: dict[str, str]
    workers: list[WorkerProcess] = field(default_factory=list)

    @property
    def where(self) -> str:
        """The run's rows of the ledger: its events' ids begin with its name, and so do its tenants'
        (events that came as spans have ids of their own)."""
        return f"startsWith(tenant_id, '{self.name}-')"

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env)

    def worker(self, role: str = "all", name: str = "worker") -> WorkerProcess:
        env = {**self.env, "COSTLINE_ROLE": role}
        if role == "stream":  # every process needs a port of its own; queries go to the sink's
            env["COSTLINE_WEB_PORT"] = str(free_port())
        worker = WorkerProcess(env, self.tmp / f"{name}.log")
        self.workers.append(worker)
        return worker

    def load(self, total: int, rate: float, twice: bool = False, spans: bool = False) -> Load:
        """``spans``: the events sent as spans to the OTLP input's topic (``COSTLINE_OTLP_TOPIC``)."""
        if spans:
            return Load(self.servers, self.settings.otlp_topic, self.name, total, rate, as_record=span_record)
        return Load(self.servers, self.settings.topics.raw, self.name, total, rate, twice)

    def reconcile(self, sent: int, timeout_s: float = 300) -> dict[str, object]:
        """Waits until the ledger holds every sent event (or the time is up), then compares."""
        settings = self.settings
        prefix = self.where

        def landed() -> int:
            try:
                return query(settings, f"SELECT uniqExact(event_id) FROM usage WHERE {prefix}").rows[0][0]
            except Exception:  # noqa: BLE001 - the sink may be restarting
                return -1

        try:
            wait_for(lambda: landed() >= sent, timeout_s, f"{sent} events in the ledger", interval_s=0.5)
        except Exception:  # noqa: BLE001 - the figures below say what is missing
            pass
        distinct, rows, total = query(settings, f"SELECT uniqExact(event_id), count(), sum(cost_usd) FROM usage "
                                                f"WHERE {prefix}").rows[0]
        expected = sum((cost_of(i) for i in range(sent)), Decimal(0))
        revenue, expected_revenue = self.revenue()
        figures = {"sent": sent, "landed": distinct, "lost": sent - distinct, "duplicated": rows - distinct,
                   "cost": total, "expected_cost": expected, "quota": self.quota_usage(sent),
                   "revenue": revenue, "expected_revenue": expected_revenue}
        REPORT.append(f"{self.name}: sent={sent} landed={distinct} lost={sent - distinct} "
                      f"duplicated={rows - distinct} cost={total} expected={expected} "
                      f"revenue={revenue} expected={expected_revenue} "
                      f"quota_windows={'exact' if figures['quota'] == self.expected_quota(sent) else 'MISMATCH'}")
        return figures

    def revenue(self) -> tuple[Decimal, Decimal]:
        """The ledger's revenue, and the rating of each tenant's period totals (by the periods the
        stream rated the events in: a run across midnight on the 1st has two), which the events'
        revenue must add up to exactly."""
        card = Plans.model_validate(yaml.safe_load(PLANS)).plans["metered"].rate_card
        rows = query(self.settings, "SELECT tenant_id, billing_period, sum(input_tokens + output_tokens), "
                                    "sum(cost_usd), sum(revenue_usd), countIf(revenue_usd IS NULL) FROM usage "
                                    f"WHERE {self.where} GROUP BY tenant_id, billing_period").rows
        assert all(unrated == 0 for *_, unrated in rows), "every event is rated in the stream"
        streamed = sum((Decimal(row[4]) for row in rows), Decimal(0))
        rated = sum((usage_amount(card, {"tokens": Decimal(tokens), "cost-plus": Decimal(cost)}).quantize(Decimal("1e-12"))
                     for _, _, tokens, cost, *_ in rows), Decimal(0))
        return streamed, rated

    def expected_quota(self, sent: int) -> dict[str, Decimal]:
        totals: dict[str, Decimal] = {}
        for i in range(sent):
            tenant = f"{self.name}-t{i % TENANTS}"
            totals[tenant] = totals.get(tenant, Decimal(0)) + cost_of(i)
        return totals

    def quota_usage(self, sent: int, timeout_s: float = 60) -> dict[str, Decimal]:
        """The latest published usage of each tenant's daily window, once it reaches the expected
        total (or the time is up)."""
        expected = self.expected_quota(sent)
        latest: dict[str, Decimal] = {}

        def read() -> bool:
            records = read_topic(self.servers, self.settings.topics.state, 1, 5)
            latest.clear()
            for m in sorted(records, key=lambda m: (m.partition(), m.offset())):
                if m.value() is None:
                    continue  # a window past its grace period
                state = QuotaState.model_validate_json(m.value())
                latest[state.tenant_id] = max(latest.get(state.tenant_id, Decimal(0)), state.usage)
            return latest == expected

        try:
            wait_for(read, timeout_s, "the quota windows to reach the sent totals", interval_s=1)
        except Exception:  # noqa: BLE001 - the caller compares
            pass
        return dict(latest)

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()


@pytest.fixture
def pipeline(kafka_servers: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Pipeline]:
    config_dir = tmp_path / "config"
    shutil.copytree(ROOT / "config", config_dir)
    (config_dir / "plans.yaml").write_text(PLANS)
    name = request.node.name.removeprefix("test_").replace("_", "-")[:40]
    env = isolated_env(tmp_path / "home", kafka_servers, config_dir, COSTLINE_PARTITIONS="4",
                       COSTLINE_FAULT_INJECTION="1", COSTLINE_SINK_WITHIN_S="0.5")
    ensure_topics(Settings.from_env(env))
    run = Pipeline(name, tmp_path, kafka_servers, env)
    yield run
    run.close()
    remove_isolated_topics(Settings.from_env(env))
