"""Two deployments on one broker, told apart by their topic prefix alone (the same app id)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal

from schemas.quota import QuotaState
from schemas.usage import TokenUsage, UsageEvent
from streams.messaging.producer import UsageProducer
from streams.messaging.topics import ensure_topics
from streams.operations.processes import ROOT, WorkerProcess, isolated_env, remove_isolated_topics, wait_for
from streams.storage.query import query
from tests.integration.conftest import read_topic

COST = Decimal("0.0035")  # gpt-4o: 1,000 × $2.50/M + 100 × $10/M


def test_two_deployments_with_different_prefixes_share_a_broker_without_seeing_each_other(kafka_servers, tmp_path):
    tag = uuid.uuid4().hex[:8]
    sent = {"a": 200, "b": 1_000}
    workers: dict[str, WorkerProcess] = {}

    def ledger(name: str) -> list:
        return query(workers[name].settings, f"SELECT count(), sum(cost_usd), uniqExact(tenant_id), "
                                             f"countIf(NOT startsWith(tenant_id, '{name}-')) FROM usage").rows[0]

    try:
        at = datetime.now(UTC)
        # One after the other: the second starts on a backlog once the first has committed positions.
        for name, count in sent.items():
            env = isolated_env(tmp_path / name, kafka_servers, ROOT / "config",
                               COSTLINE_TOPIC_PREFIX=f"run-{tag}-{name}.", COSTLINE_APP_ID=f"costline-{tag}")
            worker = workers[name] = WorkerProcess(env, tmp_path / f"{name}.log")
            ensure_topics(worker.settings)
            with UsageProducer(kafka_servers, worker.settings.topics.raw) as producer:  # a backlog first
                for i in range(count):
                    producer.send(UsageEvent(event_id=f"{name}-{i}", timestamp=at, tenant_id=f"{name}-{i % 8}",
                                             provider="openai", model="gpt-4o",
                                             usage=TokenUsage(input_tokens=1_000, output_tokens=100)))
            worker.start()
            wait_for(lambda name=name, count=count: ledger(name)[0] >= count, 60, f"{count} rows in {name}")

        for name, count in sent.items():
            assert ledger(name) == [count, COST * count, 8, 0]
            states = read_topic(kafka_servers, workers[name].settings.topics.state, 8, 10)
            usage: dict[str, Decimal] = {}
            for state in map(QuotaState.model_validate_json, (m.value() for m in states if m.value())):
                if state.metric == "cost_usd" and state.scope == "tenant":
                    usage[state.tenant_id] = max(usage.get(state.tenant_id, Decimal(0)), state.usage)
            assert usage == {f"{name}-{t}": COST * (count // 8) for t in range(8)}, f"deployment {name}'s quota windows"
            assert workers[name].health()["events_in"] == count
    finally:
        for worker in workers.values():
            worker.stop()
            remove_isolated_topics(worker.settings)
