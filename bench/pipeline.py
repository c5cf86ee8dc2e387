"""End-to-end throughput of one worker, against the ceiling of a minimal loop on the same machine.

    scripts/kafka start && .venv/bin/python bench/pipeline.py [--events 100000] [--tenants 1000]

1. Costline: a fresh worker (role ``all``, embedded ClickHouse, isolated topics) on a backlog
   of N simulated events already in ``usage.raw``; the clock runs from the worker's first
   processed event... more simply, from its start until all N rows are in the ledger, minus its
   start-up time (measured until its health endpoint answers).
2. The ceiling: a confluent-kafka consumer reads the same N records, parses the JSON and inserts
   them column-oriented into an embedded ClickHouse table, in batches of the worker's size.

Prints the figures, then one JSON object on the last line. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from confluent_kafka import Consumer, Producer, TopicPartition  # noqa: E402

from streams.processes import ROOT, WorkerProcess, isolated_env, wait_for  # noqa: E402
from streams.query import query  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.simulate import Workload  # noqa: E402
from streams.topics import ensure_topics  # noqa: E402


def proc_stats(pid: int) -> tuple[float, float]:
    """(peak RSS in MB, CPU seconds) of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    peak_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return peak_kb / 1024, (int(fields[11]) + int(fields[12])) / ticks


def fill(servers: str, topic: str, events: int, tenants: int) -> None:
    producer = Producer({"bootstrap.servers": servers, "enable.idempotence": True, "acks": "all",
                         "partitioner": "murmur2_random", "linger.ms": 20, "compression.type": "lz4"})
    for event in Workload(events, tenants=tenants, seed=11, start=datetime.now(UTC)).generate():
        while True:
            try:
                producer.produce(topic, key=event.kafka_key(), value=event.model_dump_json(exclude_none=True).encode(),
                                 timestamp=event.timestamp_ms())
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    assert producer.flush(60) == 0


def ceiling(servers: str, topic: str, events: int, batch: int, path: Path) -> float:
    import clickhouse_connect

    client = clickhouse_connect.get_client(interface="chdb", path=str(path))
    client.command("CREATE TABLE t (event_id String, tenant_id String, model String, input UInt64, output UInt64, "
                   "ts DateTime64(3, 'UTC')) ENGINE = MergeTree ORDER BY (tenant_id, event_id)")
    consumer = Consumer({"bootstrap.servers": servers, "group.id": f"ceiling-{time.time_ns()}",
                         "enable.auto.commit": False})
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    names = ["event_id", "tenant_id", "model", "input", "output", "ts"]
    types = ["String", "String", "String", "UInt64", "UInt64", "DateTime64(3, 'UTC')"]
    done = 0
    started = time.perf_counter()
    while done < events:
        rows: list[list[object]] = [[] for _ in names]
        for msg in consumer.consume(batch, timeout=1.0):
            if msg.error():
                continue
            e = json.loads(msg.value())
            for column, value in zip(rows, (e["event_id"], e["tenant_id"], e["model"], e["usage"]["input_tokens"],
                                            e["usage"]["output_tokens"], datetime.fromisoformat(e["timestamp"]))):
                column.append(value)
        if rows[0]:
            client.insert("t", rows, column_names=names, column_type_names=types, column_oriented=True)
            done += len(rows[0])
    elapsed = time.perf_counter() - started
    consumer.close()
    client.close()
    return events / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--tenants", type=int, default=1_000)
    parser.add_argument("--plans", type=Path, help="a plans.yaml to use instead of config/plans.yaml")
    args = parser.parse_args()
    servers = Settings.from_env().kafka_bootstrap_servers
    work = Path(tempfile.mkdtemp(prefix="costline-bench-"))
    config = work / "config"
    shutil.copytree(ROOT / "config", config)
    if args.plans:
        shutil.copy(args.plans, config / "plans.yaml")
    env = isolated_env(work / "home", servers, config)
    worker = WorkerProcess(env, work / "worker.log")
    settings = worker.settings
    ensure_topics(settings)
    try:
        fill(servers, settings.topics.raw, args.events, args.tenants)
        started = time.perf_counter()
        worker.start()
        ready = time.perf_counter() - started

        def landed() -> bool:
            return query(settings, "SELECT count() FROM usage_ledger").rows[0][0] >= args.events

        wait_for(landed, 1800, f"{args.events} rows", alive=worker, interval_s=0.5)
        elapsed = time.perf_counter() - started - ready
        rss_mb, cpu_s = proc_stats(worker.process.pid)
        eps = args.events / elapsed
        worker.stop()
        ceiling_eps = ceiling(servers, settings.topics.raw, args.events, settings.sink_batch, work / "ceiling")
    finally:
        worker.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"events                  {args.events:>12,}")
    print(f"worker start-up s       {ready:>12.1f}")
    print(f"costline events/s       {eps:>12,.0f}")
    print(f"ceiling events/s        {ceiling_eps:>12,.0f}")
    print(f"ratio                   {eps / ceiling_eps:>12.3f}")
    print(f"worker peak RSS MB      {rss_mb:>12.0f}")
    print(f"CPU s per 100k events   {cpu_s * 100_000 / args.events:>12.1f}")
    print(json.dumps({"events": args.events, "eps": round(eps), "ceiling_eps": round(ceiling_eps),
                      "ratio": round(eps / ceiling_eps, 3), "rss_mb": round(rss_mb),
                      "cpu_s_per_100k": round(cpu_s * 100_000 / args.events, 1)}))


if __name__ == "__main__":
    main()
