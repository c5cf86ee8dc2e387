"""Crossing-to-decision latency: how long after a hard-cap-crossing event is produced the
enforcer's answer for that tenant turns to ``block``.

    scripts/kafka start && .venv/bin/python bench/quota_latency.py [--trials 30]

Starts its own worker and enforcer (isolated topics, loopback only). Each trial uses a fresh
tenant: it sends events up to just below the hard cap, waits until the enforcer has seen them,
then sends the crossing event and polls ``GET /v1/decisions/{tenant}`` every 2 ms. The clock
starts when the producer hands the crossing event to Kafka (``produce()``), and stops at the
first ``block``. Prints the distribution, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas.usage import TokenUsage, UsageEvent  # noqa: E402
from streams.messaging.producer import UsageProducer  # noqa: E402
from streams.messaging.topics import ensure_topics  # noqa: E402
from streams.operations.processes import (  # noqa: E402
    ROOT,
    EnforcerProcess,
    WorkerProcess,
    get_json,
    isolated_env,
    remove_isolated_topics,
    wait_for,
)
from streams.settings import Settings  # noqa: E402

PLANS = """
default_plan: capped
plans:
  capped:
    limits:
      - {id: daily-spend, metric: cost_usd, window: day, limit: 0.10, thresholds: [50], hard_cap: 100}
"""
# gpt-4o: 10,000 input tokens at $2.50/M = $0.025 a call; the 4th call reaches the $0.10 cap.
CALL = TokenUsage(input_tokens=10_000)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=30)
    args = parser.parse_args()
    servers = Settings.from_env().kafka_bootstrap_servers
    work = Path(tempfile.mkdtemp(prefix="costline-bench-"))
    config = work / "config"
    shutil.copytree(ROOT / "config", config)
    (config / "plans.yaml").write_text(PLANS)
    env = isolated_env(work / "home", servers, config)
    worker, enforcer = WorkerProcess(env, work / "worker.log"), EnforcerProcess(env, work / "enforcer.log")
    ensure_topics(worker.settings)
    latencies = []
    try:
        worker.start()
        enforcer.start()
        with UsageProducer(servers, worker.settings.topics.raw, config={"linger.ms": 0}) as producer:
            for trial in range(args.trials):
                tenant = f"bench-{trial}"

                def decision(tenant: str = tenant) -> dict:
                    return get_json(f"{enforcer.url}/v1/decisions/{tenant}") or {}

                def event(i: int, tenant: str = tenant) -> UsageEvent:
                    return UsageEvent(event_id=f"{tenant}-{i}", timestamp=datetime.now(UTC), tenant_id=tenant,
                                      provider="openai", model="gpt-4o", usage=CALL)

                for i in range(3):
                    producer.send(event(i))
                producer.flush()
                wait_for(lambda: decision().get("decision") == "warn", 30, f"{tenant} at 75%", interval_s=0.01)
                started = time.perf_counter()
                producer.send(event(3))
                wait_for(lambda: decision().get("decision") == "block", 30, f"{tenant} blocked", interval_s=0.002)
                latencies.append((time.perf_counter() - started) * 1000)
    finally:
        enforcer.stop()
        worker.stop()
        remove_isolated_topics(worker.settings)
        shutil.rmtree(work, ignore_errors=True)

    latencies.sort()
    p50 = statistics.median(latencies)
    p95 = latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))]
    print(f"trials               {len(latencies):>8}")
    print(f"min ms               {latencies[0]:>8.1f}")
    print(f"p50 ms               {p50:>8.1f}")
    print(f"p95 ms               {p95:>8.1f}")
    print(f"max ms               {latencies[-1]:>8.1f}")
    print(json.dumps({"bench": "quota_latency", "trials": len(latencies), "min_ms": round(latencies[0], 1),
                      "p50_ms": round(p50, 1), "p95_ms": round(p95, 1), "max_ms": round(latencies[-1], 1)}))


if __name__ == "__main__":
    main()
