"""What the middleware adds to a call: the same call through the raw SDK and through its metered
adapter, in pairs, against a local fake provider.

    scripts/kafka start && .venv/bin/python bench/middleware.py [--calls 500] [--scenarios chat,responses-stream]

Starts its own enforcer (a ``costline enforcer`` child: isolated topics, loopback only, no
worker, so nothing is counted and every reservation is granted, journaled to Kafka before it is
answered, and later ended by its lease), a fake provider on loopback
(``tests/middleware/fake_providers.py``: the chat completions, Responses and Anthropic messages
wire formats) and a real ``UsageProducer``. Each scenario runs ``--calls`` pairs, a raw call and a
metered one, in alternating order (so that drift and warm caches favour neither), after
``--warmup`` pairs that are not counted. A metered call is timed from the adapter's ``create``
to its return (a stream: to its last item read), so it includes the reservation (an HTTP round
trip to the enforcer, which awaits Kafka's acknowledgement of its journal) and handing the usage
event to the producer, not its delivery, which the producer does in the background.

Prints, per scenario, p50 and p99 of the raw and the metered calls and of the difference of
each pair, and the ratio of the medians; then a bare reservation's round trip
(``EnforcerClient.reserve`` alone, ``--calls`` times), most of what is added; then how many usage
events Kafka acknowledged, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anthropic  # noqa: E402
import openai  # noqa: E402

from streams.enforcement.client import EnforcerClient  # noqa: E402
from streams.messaging.producer import UsageProducer  # noqa: E402
from streams.messaging.topics import ensure_topics  # noqa: E402
from streams.middleware.anthropic_sdk import MeteredMessages  # noqa: E402
from streams.middleware.meter import Meter  # noqa: E402
from streams.middleware.openai_sdk import MeteredChat, MeteredResponses  # noqa: E402
from streams.operations.processes import ROOT, EnforcerProcess, isolated_env, remove_isolated_topics  # noqa: E402
from streams.settings import Settings  # noqa: E402
from tests.middleware.fake_providers import FakeAnthropic, FakeOpenAI  # noqa: E402

# A cap no run reaches: holds are never settled here (no worker), only ended by their lease.
PLANS = """
default_plan: bench
plans:
  bench:
    limits:
      - {id: daily-spend, metric: cost_usd, window: day, limit: 1000000, thresholds: [100], hard_cap: 100}
"""
MESSAGES = [{"role": "user", "content": "Say hello."}]
SCENARIOS = ["chat", "chat-stream", "responses", "responses-stream", "messages", "messages-stream"]


def calls(scenario: str, openai_url: str, anthropic_url: str, meter: Meter) -> tuple[Callable[[], Any], ...]:
    """The raw call and the metered call of a scenario (the same arguments; a stream read to its end)."""
    api, _, stream = scenario.partition("-")
    if api == "messages":
        client: Any = anthropic.Anthropic(base_url=anthropic_url, api_key="bench", max_retries=0)
        raw, metered = client.messages.create, MeteredMessages(client, meter, tenant="bench").create
        kwargs: dict[str, Any] = {"model": "claude-sonnet-4-20250514", "max_tokens": 50, "messages": MESSAGES}
    else:
        client = openai.OpenAI(base_url=openai_url, api_key="bench", max_retries=0)
        if api == "chat":
            raw, metered = client.chat.completions.create, MeteredChat(client, meter, tenant="bench").create
            kwargs = {"model": "gpt-4o", "max_completion_tokens": 50, "messages": MESSAGES}
            # The raw stream asks for the usage chunk too, as the adapter does: the same bytes on the wire.
            kwargs.update({"stream_options": {"include_usage": True}} if stream else {})
        else:
            raw, metered = client.responses.create, MeteredResponses(client, meter, tenant="bench").create
            kwargs = {"model": "gpt-4o", "max_output_tokens": 50, "input": MESSAGES}
    if stream:
        return (lambda: sum(1 for _ in raw(**kwargs, stream=True)),
                lambda: sum(1 for _ in metered(**kwargs, stream=True)))
    return lambda: raw(**kwargs), lambda: metered(**kwargs)


def timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1000


def paired(raw: Callable[[], Any], metered: Callable[[], Any], pairs: int) -> tuple[list[float], list[float]]:
    """Latencies in ms of ``pairs`` raw and metered calls, the order flipped every pair."""
    raws, metereds = [], []
    for i in range(pairs):
        if i % 2:
            metereds.append(timed(metered))
            raws.append(timed(raw))
        else:
            raws.append(timed(raw))
            metereds.append(timed(metered))
    return raws, metereds


def figures(latencies: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(latencies, n=100)
    return {"p50_ms": round(cuts[49], 3), "p99_ms": round(cuts[98], 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=500, help="measured pairs per scenario")
    parser.add_argument("--warmup", type=int, default=50, help="pairs per scenario run first and not counted")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"of {', '.join(SCENARIOS)}")
    args = parser.parse_args()
    scenarios = args.scenarios.split(",")
    if unknown := set(scenarios) - set(SCENARIOS):
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    work = Path(tempfile.mkdtemp(prefix="costline-bench-"))
    shutil.copytree(ROOT / "config", work / "config")
    (work / "config" / "plans.yaml").write_text(PLANS)
    env = isolated_env(work / "home", Settings.from_env().kafka_bootstrap_servers, work / "config")
    settings = Settings.from_env(env)
    ensure_topics(settings)
    enforcer = EnforcerProcess(env, work / "enforcer.log").start()
    producer = UsageProducer(settings.kafka_bootstrap_servers, settings.topics.raw)
    meter = Meter(EnforcerClient(enforcer.url, timeout_s=10), producer, service="bench")
    out: dict[str, Any] = {"bench": "middleware", "calls": args.calls, "warmup": args.warmup, "scenarios": {}}
    try:
        with FakeOpenAI() as fake_openai, FakeAnthropic() as fake_anthropic:
            for scenario in scenarios:
                raw, metered = calls(scenario, fake_openai.url, fake_anthropic.url.removesuffix("/v1"), meter)
                paired(raw, metered, args.warmup)
                raws, metereds = paired(raw, metered, args.calls)
                added = [m - r for r, m in zip(raws, metereds)]
                f = {"raw": figures(raws), "metered": figures(metereds), "added": figures(added)}
                f["ratio_p50"] = round(f["metered"]["p50_ms"] / f["raw"]["p50_ms"], 2)
                out["scenarios"][scenario] = f
                print(f"{scenario:<17} raw p50 {f['raw']['p50_ms']:>6.2f} p99 {f['raw']['p99_ms']:>6.2f}   "
                      f"metered p50 {f['metered']['p50_ms']:>6.2f} p99 {f['metered']['p99_ms']:>6.2f}   "
                      f"added p50 {f['added']['p50_ms']:>6.2f} p99 {f['added']['p99_ms']:>6.2f} ms   "
                      f"x{f['ratio_p50']:.2f}", flush=True)
        reserve = figures([timed(lambda i=i: meter.enforcer.reserve("bench", "openai", "gpt-4o", f"bare-{i}",
                                                                       input_tokens=50, max_tokens=50))
                           for i in range(args.calls)])
        out["reservation"] = reserve
        print(f"{'reservation alone':<17} p50 {reserve['p50_ms']:>6.2f} p99 {reserve['p99_ms']:>6.2f} ms")
        producer.flush()
        out["published"] = producer.delivered
        print(f"usage events acknowledged by Kafka: {producer.delivered:,} "
              f"(expected {(args.calls + args.warmup) * len(scenarios):,})")
    finally:
        producer.close()
        enforcer.stop()
        remove_isolated_topics(settings)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
