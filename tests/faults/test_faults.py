"""Faults on the real broker: every case must end with lost=0 and duplicated=0 against exact
expected totals, in the ledger and in the quota windows."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
import urllib.request
from collections import Counter
from typing import get_args

import pytest

from schemas.dead_letter import DeadLetter, Reason
from streams.httpjson import get_json
from streams.messaging.producer import UsageProducer
from streams.messaging.topics import ensure_topics
from streams.operations.processes import ROOT, WorkerProcess, isolated_env, remove_isolated_topics, wait_for
from streams.storage.query import query
from tests.faults.conftest import FULL, REPORT, Pipeline, event
from tests.faults.poison import HUGE_EVERY, hostile_records
from tests.integration.conftest import read_topic


def assert_exact(figures: dict, pipeline: Pipeline, sent: int) -> None:
    assert (figures["lost"], figures["duplicated"]) == (0, 0), figures
    assert figures["cost"] == figures["expected_cost"]
    assert figures["revenue"] == figures["expected_revenue"] > 0, "each event rated once, in order of its tiers"
    assert figures["quota"] == pipeline.expected_quota(sent), "quota windows count every event exactly once"


def test_kill_9_of_the_worker_at_random_points(pipeline: Pipeline):
    # The load runs until the last restart has processed events, however long the restarts take
    # on a slow machine; ``cap`` only bounds it.
    kills, cap, rate = (8, 60_000, 150) if FULL else (3, 30_000, 100)
    worker = pipeline.worker().start()
    load = pipeline.load(cap, rate).start()
    rng = random.Random(5)
    recovered = []
    for _ in range(kills):
        time.sleep(rng.uniform(1.0, 3.0))
        assert worker.stop(signal.SIGKILL) == -signal.SIGKILL
        killed = time.monotonic()
        worker.start()  # returns once /v1/health says ok: consuming
        # Recovered: the new process has processed events sent after the kill (the load goes on).
        wait_for(lambda: (worker.health() or {}).get("events_in", 0) > 0, 120,
                 "the restarted worker to process events", interval_s=0.05)
        recovered.append(time.monotonic() - killed)
    load.stop()
    assert load.sent < cap, "the load hit its cap: the kills did not happen while it ran"
    assert_exact(pipeline.reconcile(load.sent), pipeline, load.sent)
    REPORT[-1] += f" recovered_in_s={max(recovered):.1f} (each kill: {', '.join(f'{s:.1f}' for s in recovered)})"


def test_broker_restart_mid_stream(pipeline: Pipeline):
    if not (ROOT / ".costline" / "kafka" / "kafka.pid").exists():
        pytest.skip("needs the local broker of scripts/kafka, which this case restarts")
    total, rate = (6_000, 300) if FULL else (1_800, 300)
    pipeline.worker().start()
    load = pipeline.load(total, rate).start()
    time.sleep(2)
    subprocess.run([str(ROOT / "scripts" / "kafka"), "stop"], check=True, capture_output=True)
    time.sleep(3 if FULL else 1)
    subprocess.run([str(ROOT / "scripts" / "kafka"), "start"], check=True, capture_output=True)
    load.wait()
    assert_exact(pipeline.reconcile(load.sent), pipeline, load.sent)


def test_spans_through_a_broker_restart_land_exactly_once(pipeline: Pipeline):
    """The OTLP input's transactions aborted and retried across a broker restart (its producer and
    consumer reconnect, and a turn whose commit failed is read again from the committed offsets)."""
    if not (ROOT / ".costline" / "kafka" / "kafka.pid").exists():
        pytest.skip("needs the local broker of scripts/kafka, which this case restarts")
    total, rate = (3_000, 300) if FULL else (1_200, 300)
    pipeline.env["COSTLINE_OTLP_TOPIC"] = pipeline.settings.topic_prefix + "otlp_spans"
    ensure_topics(pipeline.settings)
    worker = pipeline.worker().start()
    load = pipeline.load(total, rate, spans=True).start()
    time.sleep(2)
    subprocess.run([str(ROOT / "scripts" / "kafka"), "stop"], check=True, capture_output=True)
    time.sleep(1)
    subprocess.run([str(ROOT / "scripts" / "kafka"), "start"], check=True, capture_output=True)
    load.wait()
    assert_exact(pipeline.reconcile(load.sent), pipeline, load.sent)
    assert worker.running, worker.log_tail()
    otlp = worker.health()["otlp"]
    assert (otlp["spans"], otlp["events"], otlp["dead_lettered"]) == (total, total, 0)
    REPORT[-1] += f" otlp_aborted={otlp['aborted']}"


def test_clickhouse_writes_failing(pipeline: Pipeline):
    outage_s, total, rate = (30, 9_000, 250) if FULL else (8, 3_000, 250)
    worker = pipeline.worker().start()
    load = pipeline.load(total, rate).start()
    time.sleep(2)
    request = urllib.request.Request(f"{worker.settings.web_url}/v1/faults/clickhouse", method="POST",
                                     data=json.dumps({"fail_for_s": outage_s}).encode())
    urllib.request.urlopen(request, timeout=5).close()
    degraded = wait_for(lambda: (h := worker.health()) and h["status"] == "degraded" and h, 30,
                        "the worker to report degraded health")
    assert degraded["sinks"]["usage_ledger"]["errors"] >= 1
    assert "injected ClickHouse outage" in degraded["sinks"]["usage_ledger"]["last_error"]
    metrics = urllib.request.urlopen(f"{worker.settings.web_url}/metrics", timeout=5).read().decode()
    assert 'costline_clickhouse_errors_total{table="usage_ledger"}' in metrics
    load.wait()
    wait_for(lambda: (worker.health() or {}).get("status") == "ok", outage_s + 60, "the sink to recover")
    assert_exact(pipeline.reconcile(load.sent), pipeline, load.sent)


def test_every_event_produced_twice(pipeline: Pipeline):
    total, rate = (8_000, 400) if FULL else (2_000, 400)
    worker = pipeline.worker().start()
    load = pipeline.load(total, rate, twice=True).start()
    load.wait()
    assert load.copies == total
    figures = pipeline.reconcile(load.sent)
    assert_exact(figures, pipeline, load.sent)
    wait_for(lambda: (worker.health() or {}).get("duplicates") == total, 60, "every copy to be recognised")


def test_two_workers_share_the_partitions_with_rebalances_mid_stream(pipeline: Pipeline):
    total, rate = (8_000, 300) if FULL else (2_400, 300)
    pipeline.worker("sink", "sink").start()
    first = pipeline.worker("stream", "stream-1").start()
    load = pipeline.load(total, rate).start()
    time.sleep(2)
    second = pipeline.worker("stream", "stream-2").start()       # partitions move to the newcomer
    wait_for(lambda: (second.health() or {}).get("events_in", 0) > 0, 60, "the second worker to take partitions")
    time.sleep(1.5)
    assert first.stop() == 0                                       # and back when the first leaves
    load.wait()
    assert_exact(pipeline.reconcile(load.sent), pipeline, load.sent)
    health = get_json(f"{second.settings.web_url}/v1/health")
    assert health["events_in"] > 0


def test_a_worker_started_on_topics_it_creates_itself_is_ready_every_time(kafka_servers, tmp_path):
    """Partitions of a topic created a moment ago have no leader yet, and a start that reads them
    then must wait, not fail."""
    starts = 10 if FULL else 4
    ready_in = []
    for i in range(starts):
        env = isolated_env(tmp_path / f"home-{i}", kafka_servers, ROOT / "config")
        worker = WorkerProcess(env, tmp_path / f"worker-{i}.log")
        started = time.monotonic()
        try:
            worker.start(timeout_s=60)  # the worker creates its topics
            ready_in.append(time.monotonic() - started)
        finally:
            worker.stop()
            remove_isolated_topics(worker.settings)
    REPORT.append(f"fresh-topic-starts: {len(ready_in)} of {starts} ready, in {min(ready_in):.1f}-{max(ready_in):.1f} s")


def test_a_poison_campaign_is_dead_lettered_whole_while_valid_events_land_exactly_once(pipeline: Pipeline):
    """Hostile records of every malformed shape, interleaved with valid events of known cost."""
    hostile_total, per_valid = (30_000, 5) if FULL else (10_000, 5)
    worker = pipeline.worker().start()
    settings = pipeline.settings
    shapes: Counter[str] = Counter()
    valid = 0
    with UsageProducer(pipeline.servers, settings.topics.raw, config={"message.max.bytes": 8_000_000}) as producer:
        for i, (shape, value) in enumerate(hostile_records(hostile_total)):
            producer.send_raw(value, key=f"hostile-{i % 7}".encode())  # (send_raw sends bytes as they are)
            shapes[shape] += 1
            if i % per_valid == 0:
                producer.send(event(pipeline.name, valid))
                valid += 1
    dead = read_topic(pipeline.servers, settings.topics.dlq, hostile_total, 120)
    reasons = Counter(DeadLetter.from_record(m.key(), m.value() or b"", m.headers()).reason for m in dead)
    figures = pipeline.reconcile(valid)
    REPORT.append(f"poison-campaign: hostile={hostile_total} dead_lettered={len(dead)} valid={valid} "
                  f"landed={figures['landed']} ({', '.join(f'{r}={n}' for r, n in sorted(reasons.items()))})")
    assert len(dead) == hostile_total and {m.key()[:8] for m in dead} == {b"hostile-"}
    assert set(reasons) <= set(get_args(Reason)) and reasons["payload_too_large"] == hostile_total // HUGE_EVERY
    assert_exact(figures, pipeline, valid)
    assert worker.running and worker.health()["dead_lettered"] == hostile_total
    assert query(settings, "SELECT count() FROM usage WHERE startsWith(event_id, 'hostile')").rows == [[0]]
