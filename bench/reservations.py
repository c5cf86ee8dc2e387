"""Reservation latency: ``POST /v1/reservations`` at a fixed rate, against ``GET /v1/decisions``
at the same rate on the same enforcer as the baseline.

    scripts/kafka start && .venv/bin/python bench/reservations.py [--rate 1000] [--seconds 10] [--clients 50]

Starts its own enforcer (isolated topics, loopback only, no worker: nothing is counted, so every
reservation is granted, journaled and later ended by its lease). ``--clients`` threads share the
rate, each on one kept-alive connection; each request's latency is measured from its scheduled start (so a slow answer that delays
the next request counts against the next one too: no coordinated omission). Prints p50, p99 and
max of both, the achieved rates, then one JSON line.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streams.messaging.topics import ensure_topics  # noqa: E402
from streams.operations.processes import ROOT, EnforcerProcess, isolated_env, remove_isolated_topics  # noqa: E402
from streams.settings import Settings  # noqa: E402


def run(url: str, rate: float, seconds: float, clients: int, make: callable) -> tuple[list[float], float]:
    """Latencies in ms of ``rate`` requests a second for ``seconds``, from ``clients`` threads, each
    on one kept-alive connection (as a gateway's client would be)."""
    latencies: list[float] = []
    lock = threading.Lock()
    total = int(rate * seconds)
    start = time.perf_counter() + 0.2
    host, port = url.removeprefix("http://").split(":")

    def client(first: int) -> None:
        mine = []
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        for i in range(first, total, clients):
            due = start + i / rate
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            method, path, body = make(i)
            connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
            connection.getresponse().read()
            mine.append((time.perf_counter() - due) * 1000)
        connection.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, total / (time.perf_counter() - start)


def figures(latencies: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(latencies, n=100)
    return {"p50_ms": round(cuts[49], 2), "p99_ms": round(cuts[98], 2), "max_ms": round(max(latencies), 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=50)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="costline-bench-"))
    env = isolated_env(work / "home", Settings.from_env().kafka_bootstrap_servers, ROOT / "config")
    settings = Settings.from_env(env)
    ensure_topics(settings)
    enforcer = EnforcerProcess(env, work / "enforcer.log").start()
    try:
        def decision(i: int) -> tuple[str, str, bytes | None]:
            return "GET", f"/v1/decisions/tenant-{i % 1000}", None

        def reservation(i: int) -> tuple[str, str, bytes | None]:
            body = {"tenant_id": f"tenant-{i % 1000}", "provider": "openai", "model": "gpt-4o",
                    "input_tokens": 1000, "max_tokens": 200, "idempotency_key": f"bench-{i}", "lease_s": 5}
            return "POST", "/v1/reservations", json.dumps(body).encode()

        run(enforcer.url, args.rate, 1, args.clients, decision)  # warm-up
        base, base_rate = run(enforcer.url, args.rate, args.seconds, args.clients, decision)
        held, held_rate = run(enforcer.url, args.rate, args.seconds, args.clients, reservation)
    finally:
        enforcer.stop()
        remove_isolated_topics(settings)
    out = {"bench": "reservations", "rate": args.rate, "seconds": args.seconds, "clients": args.clients,
           "decisions": {**figures(base), "achieved_rate": round(base_rate)},
           "reservations": {**figures(held), "achieved_rate": round(held_rate)}}
    for name in ("decisions", "reservations"):
        f = out[name]
        print(f"{name:<13} p50 {f['p50_ms']:>7.2f} ms   p99 {f['p99_ms']:>7.2f} ms   max {f['max_ms']:>8.2f} ms   "
              f"{f['achieved_rate']:>6,}/s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
