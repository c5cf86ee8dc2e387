"""The OTLP input end to end: OpenTelemetry spans on a Collector's topic, a real broker, a real worker
and real ClickHouse. The same calls sent as usage events land as the same ledger rows."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta

from confluent_kafka import Producer

from schemas.dead_letter import DeadLetter
from schemas.usage import TokenUsage, UsageEvent
from streams.messaging.producer import UsageProducer
from streams.messaging.topics import ensure_topics
from streams.operations.processes import ROOT, WorkerProcess, isolated_env, remove_isolated_topics, wait_for
from streams.stages.spans import read_message
from streams.storage.query import query
from tests.integration.conftest import read_topic
from tests.otlp import Spans, messages

#: (provider attribute, request model, response model, the span's GenAI usage attributes, the usage a
#: producer would report for that call, and the price catalog's provider)
CALLS = [
    ("openai", "gpt-4o", "gpt-4o-2024-08-06",
     {"input_tokens": 1200, "output_tokens": 340, "cache_read.input_tokens": 200, "reasoning.output_tokens": 300},
     TokenUsage(input_tokens=1200, cache_read_tokens=200, output_tokens=340, reasoning_tokens=300), "openai"),
    ("anthropic", "claude-sonnet-4-5", "claude-sonnet-4-5",
     {"input_tokens": 1700, "output_tokens": 40, "cache_read.input_tokens": 300, "cache_creation.input_tokens": 500},
     TokenUsage(input_tokens=1700, cache_read_tokens=300, cache_write_tokens=500, output_tokens=40), "anthropic"),
    ("gemini", "gemini-2.5-flash", "gemini-2.5-flash",
     {"input_tokens": 1000, "output_tokens": 300, "cache_read.input_tokens": 200, "reasoning.output_tokens": 100},
     TokenUsage(input_tokens=1000, cache_read_tokens=200, output_tokens=300, reasoning_tokens=100), "google"),
]
#: Ledger columns compared between a span's row and its direct twin's.
COLUMNS = ("tenant_id", "user_id", "provider", "model", "matched_model", "service", "feature", "step", "business_path",
           "status", "latency_ms", "input_tokens", "cache_read_tokens", "cache_write_tokens", "output_tokens",
           "reasoning_tokens", "cost_input", "cost_cache_read", "cost_cache_write", "cost_output", "cost_usd", "priced")


def test_spans_land_as_their_calls_events_once_and_bad_messages_are_dead_lettered(kafka_servers, tmp_path):
    config_dir = tmp_path / "config"
    shutil.copytree(ROOT / "config", config_dir)
    env = isolated_env(tmp_path / "home", kafka_servers, config_dir, COSTLINE_PARTITIONS="4")
    env["COSTLINE_OTLP_TOPIC"] = env["COSTLINE_TOPIC_PREFIX"] + "otlp_spans"
    worker = WorkerProcess(env, tmp_path / "worker.log")
    settings = worker.settings
    ensure_topics(settings)
    try:
        _run(worker, kafka_servers)
    finally:
        worker.stop()
        remove_isolated_topics(settings)


def _run(worker: WorkerProcess, kafka_servers: str) -> None:
    settings = worker.settings
    start = datetime.now(UTC) - timedelta(minutes=30)
    # 30 calls of 3 tenants, in both encodings and both layouts, each span a child of its request's span; and
    # the same calls as their producers would send them (under other event ids)
    tenants = [Spans({"service.name": "support-bot", "tenant.id": f"tenant-{n}"}) for n in range(3)]
    twins = []
    for i in range(30):
        provider, model, answered, usage, counts, catalog = CALLS[i % 3]
        ended = start.replace(microsecond=0) + timedelta(seconds=i, milliseconds=1250)
        at = int((start + timedelta(seconds=i)).timestamp()) * 10**9
        twins.append(UsageEvent(event_id=f"direct-{i}", timestamp=ended, tenant_id=f"tenant-{i % 3}",
                                user_id=f"user-{i}", provider=catalog, model=answered, usage=counts,
                                service="support-bot", feature=f"call-{i:02d}", step=f"chat {model}",
                                status="error" if i == 7 else "ok", latency_ms=1250))
        with tenants[i % 3].parent("POST /answer"):
            tenants[i % 3].call("instrumentation", f"chat {model}", {
                "gen_ai.operation.name": "chat", "gen_ai.provider.name": provider, "gen_ai.request.model": model,
                "gen_ai.response.model": answered, "costline.feature": f"call-{i:02d}", "enduser.id": f"user-{i}",
                **{f"gen_ai.usage.{name}": count for name, count in usage.items()}},
                start_ns=at, end_ns=at + 1_250_000_000, error=i == 7)
    finished = [s for spans in tenants for s in spans.finished()]
    sent = [*messages(finished[:20], "otlp_proto", "batch"), *messages(finished[20:40], "otlp_json", "span"),
            *messages(finished[40:50], "otlp_proto", "span"), *messages(finished[50:], "otlp_json", "batch")]
    redelivered = messages(finished[:20], "otlp_proto", "batch")  # a Collector's retry of its first export
    no_tenant = Spans({"service.name": "batch-job"})
    no_tenant.call("instrumentation", "chat gpt-4o", {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
        "gen_ai.usage.input_tokens": 10, "gen_ai.usage.output_tokens": 1}, start_ns=at, end_ns=at + 10**9)
    bad = [b"\x00\x01 not a span", *messages(no_tenant.finished(), "otlp_json", "batch")]

    worker.start()
    producer = Producer({"bootstrap.servers": kafka_servers, "enable.idempotence": True, "acks": "all"})
    for value in [*sent, *bad, *redelivered]:
        producer.produce(settings.otlp_topic, value)
    assert producer.flush(30) == 0
    with UsageProducer(kafka_servers, settings.topics.raw) as direct:
        for twin in twins:
            direct.send(twin)

    def rows(prefix: str) -> list[list[object]]:
        return query(settings, f"SELECT {', '.join(COLUMNS)} FROM usage WHERE startsWith(event_id, '{prefix}') "
                               "ORDER BY feature").rows

    wait_for(lambda: query(settings, "SELECT count() FROM usage_ledger").rows[0][0] >= 60, 180, "60 ledger rows")
    wait_for(lambda: (worker.health() or {}).get("otlp", {}).get("messages") == len(sent) + len(bad) + len(redelivered),
             60, "every span message to be read")
    wait_for(lambda: (worker.health() or {}).get("duplicates") == 10, 60, "the redelivered export's calls to be recognised")
    from_spans, from_events = rows("otel-"), rows("direct-")
    assert len(from_spans) == 30 and from_spans == from_events
    assert query(settings, "SELECT count() FROM usage_ledger WHERE startsWith(event_id, 'otel-')").rows[0][0] == 30
    by_provider = Counter(row[COLUMNS.index("provider")] for row in from_spans)
    assert by_provider == {"openai": 10, "anthropic": 10, "google": 10}
    assert sum(row[COLUMNS.index("status")] == "error" for row in from_spans) == 1
    # Per-trace attribution: each call's row names its trace and its request's span as parent.
    traces = query(settings, "SELECT count(DISTINCT trace_id), countIf(parent_span_id != '') FROM usage "
                             "WHERE startsWith(event_id, 'otel-')").rows[0]
    assert traces == [30, 30]

    dead = [DeadLetter.from_record(m.key(), m.value(), m.headers())
            for m in read_topic(kafka_servers, settings.topics.dlq, 2, 30)]
    assert sorted((d.reason, d.source_topic) for d in dead) == [("invalid_otlp", settings.otlp_topic),
                                                                ("invalid_span", settings.otlp_topic)]
    not_otlp, unusable = sorted(dead, key=lambda d: d.reason)
    assert not_otlp.value == bad[0], "a message that is not OTLP is kept as it arrived"
    # a message's unusable span is kept alone, in a TracesData of its own
    assert read_message(unusable.value) == read_message(bad[1])
    assert "no tenant" in unusable.message
    health = worker.health()
    assert health["otlp"] == {"messages": len(sent) + len(bad) + len(redelivered), "spans": 2 * 30 + 20 + 1,
                              "events": 30 + 10, "skipped": 30 + 10, "completed": 0, "dead_lettered": 2,
                              "aborted": 0}

    # Re-submitted from a shell that does not know the spans topic: it goes back there by its header
    # (and, still without a tenant, to the dead-letter topic again); nothing else is published.
    shell = {k: v for k, v in worker.env.items() if k != "COSTLINE_OTLP_TOPIC"}
    done = subprocess.run([sys.executable, "-m", "streams.cli", "replay", "--from-dlq", "--reason", "invalid_span"],
                          env=shell, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: (worker.health() or {}).get("otlp", {}).get("dead_lettered") == 3, 60,
             "the re-submitted span to be dead-lettered again")
    assert query(settings, "SELECT count() FROM usage_ledger").rows[0][0] == 60
    assert worker.running, worker.log_tail()
