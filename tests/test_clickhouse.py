"""The ledger, migrations and the sink on the real ClickHouse engine (embedded)."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from schemas.usage import TokenUsage, UsageEvent
from streams.migrations import applied_versions, discover, migrate
from streams.pipeline import attribute
from streams.query import QueryError, run_readonly
from streams.sink import Backoff, SinkStats, dedup_token, insert_batch, land

AT = datetime(2026, 6, 1, 9, 30, tzinfo=UTC)


def records(enricher, n, tenant, start=0):
    return [
        attribute(UsageEvent(event_id=f"{tenant}-{i}", timestamp=AT + timedelta(seconds=i), tenant_id=tenant,
                             provider="openai", model="gpt-4o", usage=TokenUsage(input_tokens=1000, output_tokens=100),
                             tags={"k": "v"}, extra_field=i), enricher)
        for i in range(start, start + n)
    ]


def ledger(client, tenant):
    rows = client.query(f"SELECT count(), sum(cost_usd) FROM usage WHERE tenant_id = '{tenant}'").result_rows
    return rows[0][0], rows[0][1]


def test_migrations_are_recorded_and_idempotent(ch_client):
    assert applied_versions(ch_client) == {m.version for m in discover()}
    assert migrate(ch_client) == []


def test_batch_lands_with_exact_decimal_costs(ch_client, enricher):
    batch = records(enricher, 3, "t-exact")
    insert_batch(ch_client, batch, dedup_token(batch))
    # gpt-4o: 1000 × $2.50/M + 100 × $10/M = $0.0035 per call.
    assert ledger(ch_client, "t-exact") == (3, Decimal("0.0105"))
    row = ch_client.query("SELECT tags, extra, cost_input, cost_output FROM usage WHERE event_id = 't-exact-1'")
    assert row.result_rows == [({"k": "v"}, '{"extra_field":1}', Decimal("0.0025"), Decimal("0.001"))]


def test_retried_batch_is_deduplicated_at_insert(ch_client, enricher):
    batch = records(enricher, 5, "t-retry")
    token = dedup_token(batch)
    insert_batch(ch_client, batch, token)
    insert_batch(ch_client, batch, token)
    raw = ch_client.query("SELECT count() FROM usage_ledger WHERE tenant_id = 't-retry'").result_rows[0][0]
    assert raw == 5
    assert ledger(ch_client, "t-retry") == (5, Decimal("0.0175"))


def test_redelivered_events_count_once_in_the_deduplicated_view(ch_client, enricher):
    first = records(enricher, 4, "t-replay")
    again = records(enricher, 4, "t-replay")  # a replay: same events, new attribution time, new token
    insert_batch(ch_client, first, dedup_token(first))
    insert_batch(ch_client, again, dedup_token(again))
    assert ledger(ch_client, "t-replay") == (4, Decimal("0.014"))


def test_land_retries_a_failing_insert_with_the_same_token(ch_client, enricher):
    batch = records(enricher, 2, "t-flaky")
    tokens = []

    def flaky_insert(client, rows, token):
        tokens.append(token)
        if len(tokens) < 3:
            raise ConnectionError("ClickHouse is down")
        insert_batch(client, rows, token)

    stats = SinkStats()
    assert land(ch_client, batch, stats, backoff=Backoff(first_s=0.01), insert=flaky_insert)
    assert len(tokens) == 3 and len(set(tokens)) == 1
    assert (stats.errors, stats.landed, stats.failing_since) == (2, 2, None)
    assert ledger(ch_client, "t-flaky") == (2, Decimal("0.007"))


def test_queries_through_the_endpoint_path_are_read_only(ch_client):
    assert run_readonly(ch_client, "SELECT 1 + 1 AS two").rows == [[2]]
    with pytest.raises(QueryError, match="readonly"):
        run_readonly(ch_client, "DROP TABLE usage_ledger")
