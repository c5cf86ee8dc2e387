"""A realistic synthetic workload: a few heavy tenants and a long tail, a mix of providers and
models, multi-call user actions (retrieval → generation → refinement) sharing a trace id.

Deterministic for a given seed, so a run can be reproduced exactly.
"""

from __future__ import annotations

import itertools
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from schemas.usage import TokenUsage, UsageEvent

# (provider, model, weight)
MODELS = [
    ("openai", "gpt-4o-mini", 30),
    ("openai", "gpt-4o", 12),
    ("openai", "o3-mini", 5),
    ("anthropic", "claude-sonnet-4-5", 12),
    ("anthropic", "claude-3-5-haiku-latest", 10),
    ("google", "gemini-2.5-flash", 15),
    ("google", "gemini-2.5-pro", 4),
    ("mistral", "mistral-large-latest", 6),
    ("deepseek", "deepseek-chat", 6),
]

# (service, route, feature, the steps of one user action)
ACTIONS = [
    ("support-bot", "/v1/chat", "answer", ["retrieval", "generation", "refinement"]),
    ("support-bot", "/v1/chat", "triage", ["generation"]),
    ("search", "/v1/search", "summarize", ["retrieval", "generation"]),
    ("code-assistant", "/v1/complete", "completion", ["generation"]),
    ("docs", "/v1/docs/draft", "draft", ["generation", "refinement"]),
]


@dataclass(frozen=True)
class Workload:
    events: int
    tenants: int = 20
    seed: int = 7
    run_id: str = ""
    start: datetime | None = None

    def generate(self) -> Iterator[UsageEvent]:
        rng = random.Random(self.seed)
        run_id = self.run_id or uuid.UUID(int=rng.getrandbits(128)).hex[:12]
        tenants = [f"tenant-{i:04d}" for i in range(1, self.tenants + 1)]
        # Zipf-like popularity: the first tenants send most of the traffic.
        tenant_weights = list(itertools.accumulate(1 / (rank ** 1.1) for rank in range(1, self.tenants + 1)))
        models, model_weights = [(p, m) for p, m, _ in MODELS], [w for _, _, w in MODELS]
        clock = self.start or datetime.now(UTC) - timedelta(seconds=self.events // 50 + 1)
        produced = 0
        while produced < self.events:
            tenant = rng.choices(tenants, cum_weights=tenant_weights)[0]  # O(log n) per draw
            user = f"{tenant}-user-{rng.randint(1, 50):02d}"
            service, route, feature, steps = rng.choice(ACTIONS)
            provider, model = rng.choices(models, model_weights)[0]
            trace_id = uuid.UUID(int=rng.getrandbits(128)).hex
            parent = None
            for step in steps:
                if produced >= self.events:
                    return
                clock += timedelta(milliseconds=rng.randint(1, 40))
                span = uuid.UUID(int=rng.getrandbits(128)).hex[:16]
                yield UsageEvent(
                    event_id=f"{run_id}-{produced:08d}",
                    timestamp=clock,
                    tenant_id=tenant,
                    user_id=user,
                    provider=provider,
                    model=model,
                    usage=_usage(rng, step),
                    service=service,
                    route=route,
                    feature=feature,
                    step=step,
                    trace_id=trace_id,
                    span_id=span,
                    parent_span_id=parent,
                    status="ok" if rng.random() > 0.01 else "error",
                    latency_ms=rng.randint(80, 9000),
                )
                parent = span
                produced += 1


def _usage(rng: random.Random, step: str) -> TokenUsage:
    prompt = int(rng.lognormvariate(7.5 if step == "retrieval" else 7.0, 0.8)) + 20
    cache_read = int(prompt * rng.choice([0, 0, 0.5, 0.8])) if prompt > 1024 else 0
    cache_write = int((prompt - cache_read) * 0.3) if rng.random() < 0.1 else 0
    output = int(rng.lognormvariate(5.5 if step == "generation" else 4.0, 0.7)) + 1
    reasoning = int(output * rng.random() * 0.5) if rng.random() < 0.2 else 0
    return TokenUsage(
        input_tokens=prompt,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        output_tokens=output,
        reasoning_tokens=reasoning,
    )
