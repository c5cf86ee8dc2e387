"""``costline report``'s page, opened in a real headless browser (Debian's chromium): every chart
drew marks, and the totals in the page are ClickHouse's. A screenshot is kept in
``.costline/artifacts/report.png``."""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from schemas.quota import QuotaAlert
from schemas.usage import TokenUsage, UsageEvent
from streams.operations.processes import ROOT
from streams.operations.whatif import candidates_of, compare, ledger_months
from streams.reports.usage import report
from streams.stages.plans import Plans
from streams.stages.revenue import RevenueMeter
from streams.storage.query import connect_readonly, run_readonly
from streams.storage.tables import ALERTS, LEDGER

START = datetime(2025, 3, 1, tzinfo=UTC)
END = datetime(2025, 3, 4, tzinfo=UTC)
PLANS = Plans.model_validate({"default_plan": "p", "plans": {"p": {"rate_card": {"charges": [
    {"id": "tokens", "metric": "tokens", "per": 1_000_000, "price": "unit", "unit_amount": 1}]}}}})


def browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("chromium is not installed: scripts/setup installs it (Debian, as root: apt-get install chromium)")
    return found


def open_page(page: Path, *options: str) -> str:
    """The page's DOM once its scripts ran (``--dump-dom``), or what chromium printed."""
    result = subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                             "--virtual-time-budget=20000", *options, page.as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture
def ledger(ch_client, attribution):
    """Three tenants over three days of March 2025: gpt-4o calls rated below their cost (a loss),
    gpt-4o-mini calls above it; two quota alerts."""
    meter, periods, rows = RevenueMeter(PLANS), {}, []
    for day in range(3):
        for tenant, model, calls in (("report-heavy", "gpt-4o", 6), ("report-light", "gpt-4o-mini", 4),
                                     ("report-mixed", "gpt-4o" if day else "gpt-4o-mini", 3)):
            for i in range(calls):
                row = attribution.attribute(UsageEvent(
                    event_id=f"{tenant}-{day}-{i}", timestamp=START + timedelta(days=day, hours=i),
                    tenant_id=tenant, provider="openai", model=model, service="support" if i % 2 else "search",
                    feature="answer", usage=TokenUsage(input_tokens=20_000 + 1_000 * i, output_tokens=800)))
                rated = meter.rate(row, periods, START + timedelta(days=day, hours=i))
                rows.append(row.model_copy(update={"revenue_usd": rated.revenue, "billing_period": rated.period}))
    LEDGER.insert(ch_client, rows, LEDGER.dedup_token(rows))
    alerts = [QuotaAlert(alert_id=f"report-alert-{n}", tenant_id="report-heavy", limit_id="daily-spend",
                         metric="cost_usd", scope="tenant", scope_value="*", window_start=START + timedelta(days=n),
                         window_end=START + timedelta(days=n + 1), threshold_percent=Decimal(pct), level=level,
                         usage=Decimal("0.9"), limit=Decimal(1), crossed_at=START + timedelta(days=n, hours=5),
                         event_id=f"report-heavy-{n}-5")
              for n, pct, level in ((0, 80, "warning"), (1, 100, "soft_cap"))]
    ALERTS.insert(ch_client, alerts, ALERTS.dedup_token(alerts))
    reader = connect_readonly(f"chdb://{ch_client.path}")
    return lambda sql: run_readonly(reader, sql).rows


def test_the_report_draws_every_chart_and_its_totals_are_clickhouses(ledger, tmp_path):
    candidates = candidates_of(Plans.from_file(ROOT / "config" / "candidates.yaml"), "config/candidates.yaml")
    outcomes = compare(PLANS, candidates, ledger_months(PLANS, START, END, ledger))
    page = tmp_path / "report.html"
    page.write_text(report(ledger, START, END, whatif=outcomes))
    assert "<script src=" not in page.read_text()          # self-contained: nothing to fetch
    dom = open_page(page, "--dump-dom")
    # Every chart drew marks: bars (a path per bar) or points and lines, as many as its data has.
    expected = {"over-time": 3 * 3 * 6, "tenants-over-time": 3 * 18, "tenants-by-cost": 3 * 3, "tenants-negative-margin": 1, "by-model": 2 * 3,
                "by-business-path": 2 * 3, "alerts": 2, "whatif": 4 * 3}
    for chart, marks in expected.items():
        drawn = _section(dom, chart)
        assert "main-svg" in drawn, f"{chart} drew nothing"
        shapes = len(re.findall(r'<g class="point"><path d="M[^"]+"', drawn)) + len(
            re.findall(r'<path class="point"[^>]*d="M[^"]+"', drawn))
        assert shapes >= marks, f"{chart}: {shapes} marks drawn, {marks} expected"
    # The totals in the page are the ledger's, to the micro-dollar.
    [[calls, cost, revenue]] = ledger("SELECT count(), sum(cost_usd), sum(ifNull(revenue_usd, 0)) FROM usage "
                                      "WHERE event_time >= '2025-03-01 00:00:00' AND event_time < '2025-03-04 00:00:00'")
    shown = {name: re.search(rf'id="total-{name}">([^<]+)<', dom).group(1) for name in ("calls", "cost", "revenue",
                                                                                      "margin")}
    micro = Decimal("0.000001")
    assert shown == {"calls": f"{calls:,}", "cost": str(cost.quantize(micro)), "revenue": str(revenue.quantize(micro)),
                     "margin": str((revenue - cost).quantize(micro))}
    assert calls == 39 and revenue < cost   # (gpt-4o at $1/M tokens is sold below its cost)
    assert re.search(r'<td>report-heavy</td><td>18</td>', dom)  # the loss-making tenant is listed
    artifacts = ROOT / ".costline" / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    open_page(page, f"--screenshot={artifacts / 'report.png'}", "--window-size=1200,4200")
    assert (artifacts / "report.png").stat().st_size > 50_000


def _section(dom: str, chart: str) -> str:
    """The DOM of one chart: from its div to the next figure."""
    start = dom.index(f'id="{chart}"')
    end = dom.find("<figure", start)
    return dom[start:end if end > 0 else len(dom)]


def test_a_hostile_label_cannot_end_the_pages_script():
    from streams.reports.page import Chart, Section, render

    evil = "</script><script>document.title='owned'</script>"
    page = render("t", "s", [], [Section("x", [Chart("c", "c", "bar", [evil], [("cost", [Decimal(1)])], "")])])
    assert evil not in page and page.count("</script>") == 2   # plotly.js's own, then the page's
