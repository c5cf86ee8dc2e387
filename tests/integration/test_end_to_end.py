"""10,000 valid and 100 malformed events through a real broker, a real worker and real ClickHouse."""

from __future__ import annotations

import json
import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from confluent_kafka.admin import NewTopic

from schemas.dead_letter import DeadLetter
from schemas.usage import TokenUsage, UsageEvent
from streams.messaging.producer import UsageProducer
from streams.messaging.topics import admin
from streams.operations.processes import wait_for
from streams.storage.query import query
from tests.integration.conftest import read_topic

# Published prices in USD per million tokens: (input, cache read, cache write, output).
PUBLISHED = {
    ("openai", "gpt-4o"): (Decimal("2.50"), Decimal("1.25"), Decimal("2.50"), Decimal("10.00")),
    ("anthropic", "claude-3-5-haiku-latest"): (Decimal("0.80"), Decimal("0.08"), Decimal("1.00"), Decimal("4.00")),
    ("google", "gemini-2.5-flash"): (Decimal("0.30"), Decimal("0.03"), Decimal("0.30"), Decimal("2.50")),
}
VALID = 10_000


def expected_cost(provider: str, model: str, u: TokenUsage) -> Decimal:
    p_in, p_read, p_write, p_out = PUBLISHED[(provider, model)]
    uncached = u.input_tokens - u.cache_read_tokens - u.cache_write_tokens
    return (uncached * p_in + u.cache_read_tokens * p_read + u.cache_write_tokens * p_write
            + u.output_tokens * p_out) / Decimal(1_000_000)


def make_events(rng: random.Random) -> list[UsageEvent]:
    start = datetime.now(UTC) - timedelta(hours=1)
    events = []
    for i in range(VALID):
        provider, model = rng.choice(list(PUBLISHED))
        prompt = rng.randint(1, 50_000)
        cache_read = rng.randint(0, prompt // 2)
        cache_write = rng.randint(0, (prompt - cache_read) // 4) if provider == "anthropic" else 0
        output = rng.randint(1, 4_000)
        events.append(UsageEvent(
            event_id=f"evt-{i:05d}", timestamp=start + timedelta(milliseconds=i * 7), tenant_id=f"tenant-{i % 37}",
            user_id=f"user-{i % 101}", provider=provider, model=model,
            usage=TokenUsage(input_tokens=prompt, cache_read_tokens=cache_read, cache_write_tokens=cache_write,
                             output_tokens=output, reasoning_tokens=rng.randint(0, output)),
            service="support-bot", feature="answer", step=rng.choice(["retrieval", "generation", "refinement"]),
            trace_id=f"trace-{i // 3}"))
    return events


def malformed(i: int) -> bytes:
    good = {"event_id": f"bad-{i}", "timestamp": datetime.now(UTC).isoformat(), "tenant_id": "tenant-bad",
            "provider": "openai", "model": "gpt-4o", "usage": {"input_tokens": 10, "output_tokens": 1}}
    kind = i % 4
    if kind == 0:
        return b'{"event_id": "bad-' + str(i).encode() + b'", "tenant_id": '  # truncated JSON
    if kind == 1:
        del good["tenant_id"]
    elif kind == 2:
        good["usage"]["output_tokens"] = -3
    else:
        good["usage"]["input_tokens"] = "ten"
    return json.dumps(good).encode()


def test_valid_events_land_exactly_once_and_malformed_ones_are_dead_lettered(worker, kafka_servers):
    settings = worker.settings
    events = make_events(random.Random(20261127))
    expected_total = sum((expected_cost(e.provider, e.model, e.usage) for e in events), Decimal(0))

    bad = [malformed(i) for i in range(100)]

    worker.start()
    with UsageProducer(kafka_servers, settings.topics.raw) as producer:
        for i, event in enumerate(events):
            producer.send(event)
            if i % 100 == 0:
                producer.send_raw(bad[i // 100], key=b"tenant-bad")
    assert producer.delivered == VALID + 100

    def landed() -> int:
        return query(settings, "SELECT count() FROM usage").rows[0][0]

    wait_for(lambda: landed() == VALID, 180, f"{VALID} rows in ClickHouse")
    count, total, unpriced, raw_rows = query(
        settings, "SELECT count(), sum(cost_usd), countIf(NOT priced), "
                  "(SELECT count() FROM usage_ledger) FROM usage").rows[0]
    assert (count, unpriced) == (VALID, 0)
    assert raw_rows == VALID, "no duplicate reached the ledger"
    assert total == expected_total

    dead = [DeadLetter.from_record(m.key(), m.value(), m.headers()) for m in
            read_topic(kafka_servers, settings.topics.dlq, 100, 60)]
    assert len(dead) == 100
    assert Counter(d.reason for d in dead) == {"invalid_json": 25, "invalid_event": 75}
    assert all(d.message and d.source_topic == settings.topics.raw and d.source_offset >= 0 for d in dead)
    assert sorted(d.value for d in dead) == sorted(bad), "original bytes kept"
    messages = Counter(d.message.split(":")[0] for d in dead if d.reason == "invalid_event")
    assert messages == {"tenant_id": 25, "usage.output_tokens": 25, "usage.input_tokens": 25}

    health = worker.health()
    assert (health["events_in"], health["attributed"], health["dead_lettered"]) == (VALID + 100, VALID, 100)
    assert health["sinks"]["usage_ledger"]["landed"] == VALID


def test_per_tenant_sums_match_and_unknown_models_are_kept_unpriced(worker, kafka_servers):
    settings = worker.settings
    at = datetime.now(UTC) - timedelta(minutes=5)
    usage = TokenUsage(input_tokens=2_000, cache_read_tokens=1_000, output_tokens=300)
    worker.start()
    with UsageProducer(kafka_servers, settings.topics.raw) as producer:
        for i in range(30):
            producer.send(UsageEvent(event_id=f"k-{i}", timestamp=at, tenant_id=f"t{i % 3}", provider="openai",
                                     model="gpt-4o" if i % 10 else "gpt-unreleased", usage=usage))
    wait_for(lambda: query(settings, "SELECT count() FROM usage").rows[0][0] == 30, 120, "30 rows")
    rows = query(settings, "SELECT tenant_id, count(), countIf(NOT priced), sum(cost_usd) FROM usage "
                           "GROUP BY tenant_id ORDER BY tenant_id").rows
    # gpt-4o: 1,000 × 2.50 + 1,000 × 1.25 + 300 × 10 per million = $0.00675 a call; 9 priced calls a tenant.
    assert rows == [[f"t{n}", 10, 1, Decimal("0.06075")] for n in range(3)]


def test_poison_records_are_dead_lettered_and_the_worker_keeps_going(worker, kafka_servers):
    now = datetime.now(UTC)
    good = {"event_id": "ok-1", "timestamp": now.isoformat(), "tenant_id": "t", "provider": "openai",
            "model": "gpt-4o", "usage": {"input_tokens": 1000, "output_tokens": 100}}
    poison = {
        "invalid_utf8": b'{"event_id": "\xff\xfe"}',
        "payload_too_large": b'{"pad": "' + b"x" * (5 * 1024 * 1024) + b'"}',
        "invalid_json": b"[" * 100_000 + b"]" * 100_000,
        "invalid_event": json.dumps({**good, "usage": {"input_tokens": "lots"}}).encode(),
        "unsupported_schema_version": json.dumps({**good, "schema_version": 7}).encode(),
        "timestamp_out_of_range": json.dumps({**good, "timestamp": "2099-01-01T00:00:00Z"}).encode(),
    }
    absurd = json.dumps({**good, "usage": {"input_tokens": 10**15}}).encode()
    worker.start()
    with UsageProducer(kafka_servers, worker.settings.topics.raw, config={"message.max.bytes": 8_000_000}) as p:
        for value in [*poison.values(), absurd]:
            p.send_raw(value, key=b"t")
        p.send(good)
    wait_for(lambda: query(worker.settings, "SELECT count() FROM usage").rows[0][0] == 1, 60, "the good event")
    dead = [DeadLetter.from_record(m.key(), m.value(), m.headers())
            for m in read_topic(kafka_servers, worker.settings.topics.dlq, 7, 60)]
    assert sorted(d.reason for d in dead) == sorted([*poison, "invalid_event"])
    by_reason = {d.reason: d for d in dead if d.value != absurd}
    assert {reason: by_reason[reason].value for reason in poison} == poison, "each kept whole, as sent"
    assert by_reason["payload_too_large"].message == "5242891 bytes exceeds the 1048576-byte limit"
    assert worker.health()["dead_lettered"] == 7 and worker.running


def test_events_hours_ahead_reach_the_worker_and_a_day_ahead_are_dead_lettered_never_refused(worker, kafka_servers):
    """A broker refuses records timestamped over an hour ahead by default, and the records batched
    with one: the topics accept any event time, and the worker decides (24 h ahead at most)."""
    settings = worker.settings
    client = admin(settings)  # usage.raw as created by hand, with the broker's defaults ...
    client.delete_topics([settings.topics.raw], operation_timeout=15)[settings.topics.raw].result(15)
    wait_for(lambda: settings.topics.raw not in client.list_topics(timeout=10).topics, 30, "usage.raw to go")
    client.create_topics([NewTopic(settings.topics.raw, 4)], operation_timeout=15)[settings.topics.raw].result(15)
    worker.start()  # ... which the worker lets take any event time
    now = datetime.now(UTC)
    with UsageProducer(kafka_servers, settings.topics.raw) as producer:  # one batch: flushed together
        for event_id, ahead in (("now", timedelta(0)), ("plus-2h", timedelta(hours=2)), ("plus-25h", timedelta(hours=25))):
            producer.send(UsageEvent(event_id=event_id, timestamp=now + ahead, tenant_id="acme", provider="openai",
                                     model="gpt-4o", usage=TokenUsage(input_tokens=1_000)))
    wait_for(lambda: query(settings, "SELECT count() FROM usage").rows[0][0] == 2, 60, "the two valid events")
    assert query(settings, "SELECT groupArray(event_id) FROM (SELECT event_id FROM usage ORDER BY event_id)").rows == \
        [[["now", "plus-2h"]]]
    [dead] = read_topic(kafka_servers, settings.topics.dlq, 1, 30)
    assert DeadLetter.from_record(dead.key(), dead.value(), dead.headers()).reason == "timestamp_out_of_range"
