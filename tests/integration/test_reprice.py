"""Re-pricing through a running worker, which owns the embedded database."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from schemas.usage import TokenUsage, UsageEvent
from streams.messaging.producer import UsageProducer
from streams.operations.processes import ROOT, wait_for
from streams.storage.query import query


def test_new_override_reprices_stored_usage_and_keeps_the_old_figures(worker, kafka_servers):
    settings = worker.settings
    at = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    worker.start()
    with UsageProducer(kafka_servers, settings.topics.raw) as producer:
        for i in range(20):
            producer.send(UsageEvent(event_id=f"gpt-{i}", timestamp=at + timedelta(seconds=i), tenant_id="acme",
                                     provider="openai", model="gpt-4o",
                                     usage=TokenUsage(input_tokens=10_000, output_tokens=1_000)))
        for i in range(5):  # Anthropic's own usage object; a self-hosted model the catalog does not know
            producer.send({"event_id": f"claude-{i}", "timestamp": at.isoformat(), "tenant_id": "acme",
                           "provider": "anthropic", "model": "claude-sonnet-4-5",
                           "raw_usage": {"input_tokens": 100, "cache_creation_input_tokens": 2_000,
                                         "cache_read_input_tokens": 5_000, "output_tokens": 300}})
            producer.send(UsageEvent(event_id=f"llama-{i}", timestamp=at, tenant_id="acme", provider="selfhosted",
                                     model="llama-3.1-70b-instruct", usage=TokenUsage(input_tokens=100_000,
                                                                                       output_tokens=10_000)))

    def totals():
        return query(settings, "SELECT provider, count(), countIf(priced), sum(cost_usd) FROM usage "
                               "GROUP BY provider ORDER BY provider").rows

    wait_for(lambda: sum(r[1] for r in totals()) == 30, 120, "30 rows")
    # gpt-4o 10,000 × 2.50 + 1,000 × 10 = $0.035 a call; Anthropic $0.0138 a call (see test_pricing).
    assert totals() == [["anthropic", 5, 5, Decimal("0.069")], ["openai", 20, 20, Decimal("0.7")],
                        ["selfhosted", 5, 0, Decimal(0)]]

    (settings.config_dir / "prices.yaml").write_text(f"""
revision: 2
models:
  - {{name: llama on our GPUs, provider: selfhosted, model: "llama-3.1-*", effective_from: 2026-01-01,
     per_million_tokens: {{input: 0.20, output: 0.60}}}}
discounts:
  - {{name: acme deal, tenant: acme, provider: openai, percent: 20, effective_from: "{(at + timedelta(seconds=10)).isoformat()}"}}
""")
    done = subprocess.run([sys.executable, "-m", "streams.cli", "reprice", "--since", at.date().isoformat()],
                          env=worker.env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "30 events (15 changed)" in done.stdout.replace("\n", " ")
    assert "restart the worker" in done.stderr  # the worker still prices new events with revision 1

    # llama: 100,000 × 0.20 + 10,000 × 0.60 = $0.026; gpt-4o calls 10..19 at 20% off: $0.028.
    assert totals() == [["anthropic", 5, 5, Decimal("0.069")], ["openai", 20, 20, Decimal("0.63")],
                        ["selfhosted", 5, 5, Decimal("0.13")]]
    audit = query(settings, "SELECT count(), countIf(cost_usd != new_cost_usd), sum(cost_usd), sum(new_cost_usd) "
                            "FROM attribution_audit").rows
    assert audit == [[30, 15, Decimal("0.769"), Decimal("0.829")]]
