"""Reservation latency: ``POST /v1/reservations`` at a fixed rate, against ``GET /v1/decisions``
at the same rate on the same enforcer as the baseline.

    scripts/kafka start && .venv/bin/python bench/reservations.py [--rate 1000] [--seconds 10] [--clients 50]

Starts its own enforcer (isolated topics, loopback only, no worker: nothing is counted, so every
reservation is granted, journaled and later ended by its lease). ``--clients`` kept-alive
connections share the rate; each request's latency is measured from its scheduled start (so a
slow answer that delays the next request counts against the next one too: no coordinated
omission). Prints p50, p99 and
max of both, the achieved rates, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streams.messaging.topics import ensure_topics  # noqa: E402
from streams.operations.processes import ROOT, EnforcerProcess, isolated_env, remove_isolated_topics  # noqa: E402
from streams.settings import Settings  # noqa: E402


def run(url: str, rate: float, seconds: float, clients: int, make: callable) -> tuple[list[float], float]:
    """Latencies in ms of ``rate`` requests a second for ``seconds``, over ``clients`` kept-alive
    connections (as a gateway's pool would hold), in the order they were due. One asyncio thread
    drives them all: a thread per connection took a third of a core at 1,000/s, from the two
    cores the enforcer and the broker share with it."""
    return asyncio.run(_run(url, rate, seconds, clients, make))


async def _run(url: str, rate: float, seconds: float, clients: int, make: callable) -> tuple[list[float], float]:
    host, port = url.removeprefix("http://").split(":")
    total = int(rate * seconds)
    latencies: list[tuple[int, float]] = []
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.2

    async def client(first: int) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        for i in range(first, total, clients):
            due = start + i / rate
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            method, path, body = make(i)
            body = body or b""
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200 "):
                raise SystemExit(f"the enforcer answered {head.splitlines()[0].decode()}")
            latencies.append((i, (loop.time() - due) * 1000))
        writer.close()

    await asyncio.gather(*(client(c) for c in range(clients)))
    return [ms for _, ms in sorted(latencies)], total / (loop.time() - start)


def by_second(latencies: list[float], rate: float) -> str:
    """The p99 of each second of the run: whether the slow answers come in bursts, and when."""
    per = int(rate)
    return " ".join(f"{statistics.quantiles(latencies[i:i + per], n=100)[98]:.0f}"
                    for i in range(0, len(latencies) - per + 1, per))


def figures(latencies: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(latencies, n=100)
    return {"p50_ms": round(cuts[49], 2), "p99_ms": round(cuts[98], 2), "max_ms": round(max(latencies), 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--timeline", action="store_true", help="also print the p99 of each second, in ms")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="costline-bench-"))
    env = isolated_env(work / "home", Settings.from_env().kafka_bootstrap_servers, ROOT / "config")
    settings = Settings.from_env(env)
    ensure_topics(settings)
    enforcer = EnforcerProcess(env, work / "enforcer.log").start()
    try:
        def decision(i: int) -> tuple[str, str, bytes | None]:
            return "GET", f"/v1/decisions/tenant-{i % 1000}", None

        def reservations(prefix: str) -> callable:
            def reservation(i: int) -> tuple[str, str, bytes | None]:
                body = {"tenant_id": f"tenant-{i % 1000}", "provider": "openai", "model": "gpt-4o",
                        "input_tokens": 1000, "max_tokens": 200, "idempotency_key": f"{prefix}-{i}", "lease_s": 5}
                return "POST", "/v1/reservations", json.dumps(body).encode()
            return reservation

        reservation = reservations("bench")
        # Warm-up: connections, and the estimator's rates of the 1,000 tenants (read once a minute
        # per tenant; cold, a thousand readings land in the first second measured).
        run(enforcer.url, args.rate, 1, args.clients, decision)
        run(enforcer.url, args.rate, 1, args.clients, reservations("warm-up"))
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
    if args.timeline:
        print(f"reservations p99 by second (ms): {by_second(held, args.rate)}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
