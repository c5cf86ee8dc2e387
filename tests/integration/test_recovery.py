"""DLQ replay and backfill through a running worker: both leave the totals exact."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from schemas.usage import TokenUsage, UsageEvent
from streams.messaging.producer import UsageProducer
from streams.operations.processes import wait_for
from streams.storage.query import query
from tests.integration.conftest import costline, read_topic


def test_replay_and_backfill_leave_totals_exact(worker, kafka_servers):
    settings = worker.settings
    at = datetime.now(UTC) - timedelta(minutes=10)
    worker.start()
    with UsageProducer(kafka_servers, settings.topics.raw) as producer:
        for i in range(5):  # gpt-4o: 1,000 × $2.50/M + 100 × $10/M = $0.0035 each
            producer.send(UsageEvent(event_id=f"r-{i}", timestamp=at, tenant_id="acme", provider="openai",
                                     model="gpt-4o", usage=TokenUsage(input_tokens=1_000, output_tokens=100)))
        for i in range(3):
            producer.send_raw(json.dumps({"event_id": f"bad-{i}", "tenant_id": "acme"}).encode(), key=b"acme",
                              timestamp_ms=int(at.timestamp() * 1000))

    def totals():
        return query(settings, "SELECT count(), sum(cost_usd), (SELECT count() FROM usage_ledger) FROM usage").rows[0]

    wait_for(lambda: totals()[0] == 5, 60, "5 rows")
    assert len(read_topic(kafka_servers, settings.topics.dlq, 3, 30)) == 3

    assert costline(worker, "replay", "--from-dlq") == "read 3 dead letters, re-submitted 3"
    assert len(read_topic(kafka_servers, settings.topics.dlq, 6, 30)) == 6      # still invalid: back, with reasons
    assert costline(worker, "replay", "--from-dlq") == "read 3 dead letters, re-submitted 3"  # only the new ones
    assert costline(worker, "replay", "--from-dlq", "--reason", "invalid_json") == "read 3 dead letters, " \
        "re-submitted 0, left 3 with other reasons"

    out = costline(worker, "backfill", "--since", (at - timedelta(seconds=1)).isoformat())
    assert out.startswith("read ") and "re-attributed 5," in out and "'invalid_event'" in out
    wait_for(lambda: totals()[2] >= 10, 60, "the backfilled rows to land")
    assert totals()[:2] == [5, Decimal("0.0175")]  # each event once in the deduplicated ledger, exact sum
