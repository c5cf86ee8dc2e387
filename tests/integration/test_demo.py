"""The demo as a user runs it, on the shipped configuration: every event lands, and each tenant's
invoice agrees with the revenue the stream wrote to the ledger, to the last of its 12 places."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal

from streams.operations.processes import ROOT, isolated_env, remove_isolated_topics
from streams.settings import Settings


def cli(env: dict[str, str], *args: str, timeout_s: float = 240) -> str:
    done = subprocess.run([sys.executable, "-m", "streams.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_demo_prints_margins_and_every_invoice_reconciles_with_the_ledger(kafka_servers, tmp_path):
    env = isolated_env(tmp_path / "home", kafka_servers, ROOT / "config", COSTLINE_PARTITIONS="2")
    try:
        out = cli(env, "demo", "-n", "1500", "-k", "4")
        assert "revenue, cost and margin per tenant" in out
        # The three-plan comparison of the founding article, on the demo's own calls.
        plans_table = out[out.index("The plans on the ledger's usage"):]
        assert all(name in plans_table for name in ("current", "flat-subscription", "pay-per-call", "usage-based"))
        whatif = json.loads(cli(env, "whatif", "--plans", str(ROOT / "config" / "candidates.yaml"),
                                "--since", "2020-01-01", "--until", "2100-01-01", "--format", "json"))
        flat = next(p for p in whatif["plans"] if p["plan"] == "flat-subscription")
        assert Decimal(flat["revenue_usd"]) == 20 * flat["tenant_months"] and flat["tenant_months"] >= 4
        page = tmp_path / "report.html"
        cli(env, "report", "--html", str(page), "--since", "2020-01-01", "--until", "2100-01-01",
            "--plans", str(ROOT / "config" / "candidates.yaml"))
        assert "id='total-calls'>1,500<" in page.read_text() and "id='whatif-table'" in page.read_text()
        ledger = [json.loads(line) for line in cli(
            env, "query", "--format", "jsonl",
            "SELECT tenant_id, billing_period, toString(sum(revenue_usd)) AS revenue, "
            "countIf(revenue_usd IS NULL) AS unrated, count() AS calls FROM usage "
            "GROUP BY tenant_id, billing_period ORDER BY tenant_id, billing_period").splitlines()]
        assert len({row["tenant_id"] for row in ledger}) == 4 and sum(row["calls"] for row in ledger) == 1500
        assert all(row["unrated"] == 0 and row["billing_period"] for row in ledger), "the stream rated every call"
        assert any(Decimal(row["revenue"]) > 0 for row in ledger)
        for row in ledger:
            bill = json.loads(cli(env, "invoice", "--tenant", row["tenant_id"], "--period", row["billing_period"],
                                  "--format", "json"))
            reconciled = bill["reconciliation"]
            assert Decimal(reconciled["streamed_revenue_usd"]) == Decimal(row["revenue"]), row
            assert reconciled["rated_usage_usd"] == reconciled["streamed_revenue_usd"], (row, reconciled)
            assert (reconciled["difference_usd"], reconciled["unrated_calls"]) == ("0.000000000000", 0)
            assert Decimal(bill["total"]) == sum(Decimal(line["amount"]) for line in bill["lines"])
        # Recorded (on a writer of the command's own: the demo's worker has stopped), then read back.
        first = ledger[0]
        recorded = json.loads(cli(env, "invoice", "--tenant", first["tenant_id"], "--period", first["billing_period"],
                                  "--record", "--format", "json"))
        [stored] = [json.loads(line) for line in cli(
            env, "query", "--format", "jsonl", "SELECT invoice_id, toString(total) AS total, "
            "toString(streamed_revenue_usd) AS streamed FROM latest_invoices").splitlines()]
        assert (stored["invoice_id"], Decimal(stored["total"]), Decimal(stored["streamed"])) == (
            recorded["invoice_id"], Decimal(recorded["total"]), Decimal(first["revenue"]))
    finally:
        remove_isolated_topics(Settings.from_env(env))
