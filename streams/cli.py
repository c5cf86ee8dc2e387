"""The ``costline`` command line."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from streams.errors import CostlineError
from streams.settings import Settings

if TYPE_CHECKING:
    from streams.storage.sink import ClickHouseSink

cli = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Costline: real-time cost attribution for AI products.")
console = Console()
err = Console(stderr=True)
ROOT = Path(__file__).resolve().parent.parent


class CommandFailed(CostlineError):
    """A command could not do its job for a reason its message explains."""


def _settings() -> Settings:
    return Settings.from_env()


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=False)


@cli.command()
def worker(
    processes: Annotated[int, typer.Option("--processes", min=0, help="run this many stream workers and one sink "
                                           "on this host, one core each (0: one worker does it all)")] = 0,
) -> None:
    """Run the stream worker (validate, price, tag, land in ClickHouse) until Ctrl-C or SIGTERM."""
    settings = _settings()
    if processes:
        from streams.runtime.supervisor import Supervisor

        raise typer.Exit(Supervisor(settings, processes).run())
    from streams.runtime.worker import run_worker

    run_worker(settings)


@cli.command()
def enforcer() -> None:
    """Serve allow / warn / block decisions per tenant from quota.state and quota.alerts, until Ctrl-C."""
    from streams.enforcement.enforcer import Enforcer
    from streams.enforcement.server import EnforcerServer
    from streams.messaging.topics import check_reachable

    settings = _settings()
    check_reachable(settings)
    running = Enforcer(settings).start()
    server = EnforcerServer(running, settings.enforcer_host, settings.enforcer_port, settings.enforcer_token)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    layout = running.layout
    err.print(f"enforcer serving on http://{settings.enforcer_host}:{settings.enforcer_port}/v1/decisions/{{tenant}}"
              + (" (bearer token required)" if settings.enforcer_token else "")
              + (f"; reservations of the tenants of peer {layout.me + 1} of {len(layout.peers)}"
                 if len(layout.peers) > 1 else ""))
    # Everything made so far (modules, the price catalog, the plans) lives as long as the process:
    # frozen, the collector no longer walks it. A full collection walked it every few seconds
    # under load, and each walk (45-60 ms) was an answer that late for every reservation waiting.
    gc.collect()
    gc.freeze()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        raise CostlineError(f"the enforcer cannot listen on {settings.enforcer_host}:{settings.enforcer_port}: "
                            f"{exc.strerror}; set COSTLINE_ENFORCER_PORT to a free port") from None
    finally:
        running.stop()


@cli.command("migrate")
def migrate_cmd() -> None:
    """Apply pending ClickHouse migrations from sql/, in order."""
    from streams.storage.clickhouse import connect
    from streams.storage.migrations import migrate

    settings = _settings()
    client = connect(settings.clickhouse_url)
    applied = migrate(client)
    for m in applied:
        console.print(f"applied {m.version:04d}_{m.name}")
    console.print(f"database is at migration {max((m.version for m in applied), default=None) or 'latest'}"
                  if applied else "nothing to apply: the database is up to date")


@cli.command()
def query(sql: Annotated[str, typer.Argument(help="a read-only SQL statement")],
          fmt: Annotated[str, typer.Option("--format", help="table or jsonl")] = "table") -> None:
    """Run a read-only SQL query (through the worker when it owns the embedded database)."""
    from streams.storage.query import query as run

    result = run(_settings(), sql)
    if fmt == "jsonl":
        for row in result.to_json()["rows"]:
            print(json.dumps(dict(zip(result.columns, row))))
        return
    table = Table(*result.columns)
    for row in result.to_json()["rows"]:
        table.add_row(*(str(v) for v in row))
    console.print(table)


@cli.command()
def produce(
    path: Annotated[Path | None, typer.Argument(help="a file of UsageEvent JSON lines; stdin when omitted")] = None,
) -> None:
    """Publish UsageEvent JSON lines to usage.raw. Invalid lines are reported and skipped."""
    from pydantic import ValidationError

    from streams.messaging.producer import UsageProducer
    from streams.messaging.topics import ensure_topics

    settings = _settings()
    ensure_topics(settings)
    source = path.open("rb") if path else sys.stdin.buffer
    sent = invalid = 0
    with UsageProducer(settings.kafka_bootstrap_servers, settings.topics.raw) as producer:
        for number, line in enumerate(source, start=1):
            if not line.strip():
                continue
            try:
                producer.send(line.strip())
                sent += 1
            except ValidationError as exc:
                invalid += 1
                e = exc.errors()[0]
                err.print(f"line {number}: {'.'.join(map(str, e['loc'])) or 'event'}: {e['msg']}")
    err.print(f"sent {sent} events to {settings.topics.raw}" + (f", {invalid} invalid lines skipped" if invalid else ""))
    if invalid:
        raise typer.Exit(1)


@cli.command()
def simulate(
    events: Annotated[int, typer.Option("--events", "-n", min=1)] = 1000,
    tenants: Annotated[int, typer.Option("--tenants", "-k", min=1)] = 20,
    rate: Annotated[float, typer.Option("--rate", "-r", help="events per second; 0 = as fast as possible")] = 0,
    seed: Annotated[int, typer.Option()] = 7,
    run_id: Annotated[str, typer.Option(help="prefix of the event ids (random when empty)")] = "",
) -> None:
    """Publish a realistic simulated workload to usage.raw."""
    from streams.messaging.topics import ensure_topics

    settings = _settings()
    ensure_topics(settings)
    _simulate(settings, events, tenants, rate, seed, run_id)


def _simulate(settings: Settings, events: int, tenants: int, rate: float, seed: int, run_id: str) -> None:
    from streams.messaging.producer import UsageProducer
    from streams.operations.simulate import Workload

    started = time.monotonic()
    with UsageProducer(settings.kafka_bootstrap_servers, settings.topics.raw) as producer, _progress() as bar:
        task = bar.add_task(f"producing to {settings.topics.raw}", total=events)
        for i, event in enumerate(Workload(events, tenants, seed, run_id).generate(), start=1):
            producer.send(event)
            if rate > 0:
                ahead = i / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
            if i % 100 == 0 or i == events:
                bar.update(task, completed=i)
    elapsed = time.monotonic() - started
    err.print(f"sent {events} events in {elapsed:.1f}s ({events / elapsed:,.0f}/s)")


@cli.command()
def price() -> None:
    """Offline: UsageEvent JSON lines on stdin → one attributed JSON line per input on stdout."""
    from schemas.dead_letter import Rejection
    from streams.stages.attribution import Attribution

    attribution = Attribution.from_settings(_settings())
    out = sys.stdout
    for line in sys.stdin.buffer:
        if not line.strip():
            continue
        result = attribution.attribute_raw(line.strip())
        if isinstance(result, Rejection):
            out.write(json.dumps({"event_id": _event_id_of(line), "error": f"{result.reason}: {result.message}"}))
        else:
            out.write(result.model_dump_json())
        out.write("\n")
        out.flush()


@cli.command()
def reprice(
    since: Annotated[str, typer.Option(help="event time from (inclusive): 2026-06-01 or 2026-06-01T12:00:00Z")],
    until: Annotated[str | None, typer.Option(help="event time until (exclusive)")] = None,
    tenant: Annotated[str | None, typer.Option(help="only this tenant")] = None,
) -> None:
    """Re-price stored usage with the current prices.yaml, path rules and rate cards (plans.yaml); old figures stay
    in attribution_audit."""
    from pydantic import ValidationError

    from streams.operations.reprice import RepriceWindow
    from streams.operations.reprice import reprice as run_reprice
    from streams.stages.attribution import Attribution
    from streams.stages.plans import Plans
    from streams.storage.clickhouse import is_embedded
    from streams.storage.query import owning_worker

    settings = _settings()
    try:
        window = RepriceWindow(since=_instant(since), until=_instant(until) if until else None, tenant=tenant)
    except ValidationError as exc:
        raise CommandFailed(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
    attribution = Attribution.from_settings(settings)  # validates the files before anything runs
    plans = Plans.from_file(settings.plans_file)
    health = owning_worker(settings) if is_embedded(settings.clickhouse_url) else None
    if health and health.get("pricing_version") != attribution.pricer.version:
        err.print(f"note: the running worker prices new events with {health.get('pricing_version')}, "
                  f"the files say {attribution.pricer.version}: restart the worker to price new events alike")
    result = _write_on_database(settings, "/v1/reprice", window.model_dump(mode="json"), lambda sink: run_reprice(
        sink, attribution, window.since, window.until, window.tenant, plans=plans).to_json())
    console.print(f"re-priced {result['events']:,} events ({result['changed']:,} changed) with "
                  f"{result['pricing_version']}: cost {result['old_cost_usd']} → {result['new_cost_usd']} USD, "
                  f"revenue {result['old_revenue_usd']} → {result['new_revenue_usd']} USD (run {result['reprice_id']})")


def _write_on_database(settings: Settings, path: str, payload: dict[str, Any],
                       run: Callable[[ClickHouseSink], dict[str, Any]]) -> dict[str, Any]:
    """Runs a write: through the worker that has the embedded database open (the engine lets one
    process open it: POST ``payload`` to its ``path``), or else on a writer of its own."""
    from streams.storage.clickhouse import connect, is_embedded
    from streams.storage.migrations import migrate
    from streams.storage.query import connect_readonly, owning_worker, post_to_worker
    from streams.storage.sink import ClickHouseSink

    if is_embedded(settings.clickhouse_url) and owning_worker(settings):
        return post_to_worker(settings, path, payload)
    writer = connect(settings.clickhouse_url)
    migrate(writer)
    sink = ClickHouseSink(writer, connect_readonly(settings.clickhouse_url, settings))
    try:
        return run(sink)
    finally:
        sink.close()


@cli.command()
def replay(
    from_dlq: Annotated[bool, typer.Option("--from-dlq", help="re-submit the dead letters not replayed yet")] = False,
    reason: Annotated[str | None, typer.Option(help="only dead letters with this reason")] = None,
) -> None:
    """Re-submit dead letters to usage.raw after a fix (each once; still-invalid ones return to the DLQ)."""
    from streams.operations.replay import replay_dead_letters

    if not from_dlq:
        raise CommandFailed("say what to replay: costline replay --from-dlq [--reason invalid_event]")
    result = replay_dead_letters(_settings(), reason=reason)
    console.print(f"read {result.read:,} dead letters, re-submitted {result.resubmitted:,}"
                  + (f", left {result.skipped:,} with other reasons" if result.skipped else ""))


@cli.command()
def backfill(
    since: Annotated[str, typer.Option(help="event time from (inclusive)")],
    until: Annotated[str | None, typer.Option(help="event time until (exclusive)")] = None,
) -> None:
    """Re-attribute the usage.raw records of a time range into the ledger (quota windows are left as counted)."""
    from streams.operations.replay import backfill as run_backfill
    from streams.stages.attribution import Attribution

    settings = _settings()
    result = run_backfill(settings, Attribution.from_settings(settings), _instant(since),
                          _instant(until) if until else None)
    rejected = sum(result.rejected.values())
    console.print(f"read {result.read:,} records, re-attributed {result.resubmitted:,}"
                  + (f", {rejected:,} invalid ({dict(result.rejected)}; they are in usage.dlq)" if rejected else ""))
    if result.resubmitted:
        console.print("Their revenue is rated again by `costline reprice --since <the first day of their billing "
                      "month>` once the worker has landed them (backfilled rows carry no revenue_usd).")


@cli.command()
def invoice(
    tenant: Annotated[str, typer.Option(help="the tenant to bill")],
    period: Annotated[str, typer.Option(help="the calendar month, in the tenant's time zone: 2026-11")],
    fmt: Annotated[str, typer.Option("--format", help="table or json")] = "table",
    record: Annotated[bool, typer.Option("--record", help="also store it in ClickHouse (invoices, invoice_lines)")] = False,
) -> None:
    """A tenant's invoice for one month, rated from the ledger with its plan's rate card (plans.yaml)."""
    from streams.operations.invoice import invoice as make_invoice
    from streams.operations.invoice import issue
    from streams.stages.plans import Plans
    from streams.storage.query import query as run_query

    settings = _settings()
    plans = Plans.from_file(settings.plans_file)
    if record:
        bill = _write_on_database(settings, "/v1/invoices", {"tenant": tenant, "period": period},
                                  lambda sink: issue(sink, plans, tenant, period))
    else:
        bill = make_invoice(plans, tenant, period, lambda sql: run_query(settings, sql).rows).to_json()
    if fmt == "json":
        print(json.dumps(bill, indent=2))
        return
    table = Table("line", "quantity", "unit price", "amount (USD)",
                  title=f"Invoice of {tenant} for {period} ({bill['period_start'][:10]} to {bill['period_end'][:10]})")
    for line in bill["lines"]:
        table.add_row(line["description"], format(Decimal(line["quantity"]).normalize(), "f"),
                      line["unit_amount"] or "", line["amount"])
    table.add_section()
    table.add_row("total", "", "", bill["total"])
    console.print(table)
    reconciled = bill["reconciliation"]
    console.print(f"provider cost {bill['cost_usd']} USD, margin {bill['margin_usd']} USD")
    console.print(f"usage rated in the stream: {reconciled['streamed_revenue_usd']} USD; from the month's totals: "
                  f"{reconciled['rated_usage_usd']} USD (difference {reconciled['difference_usd']}: volume true-ups, "
                  f"and {reconciled['unrated_calls']} calls not rated in the stream)")
    if record:
        console.print(f"recorded as invoice {bill['invoice_id']} (see the latest_invoices view)")


@cli.command()
def whatif(
    plans: Annotated[Path, typer.Option("--plans", help="candidate plans, in the plans.yaml format")] = None,  # type: ignore[assignment]
    since: Annotated[str, typer.Option(help="from this date or time (UTC without a zone), e.g. 2026-11-01")] = "",
    until: Annotated[str, typer.Option(help="up to this date or time, excluded")] = "",
    tenants: Annotated[str, typer.Option(help="only these tenants, comma-separated")] = "",
    fmt: Annotated[str, typer.Option("--format", help="table or json")] = "table",
    html: Annotated[Path | None, typer.Option("--html", help="also write the comparison as a page of charts")] = None,
) -> None:
    """Replay the ledger's usage through candidate plans: revenue, cost and margin of each, against the current plans."""
    from streams.operations.whatif import CURRENT

    settings = _settings()
    start, end = _window(plans is not None, since, until, "--plans FILE, --since and --until, e.g. costline whatif "
                         "--plans config/candidates.yaml --since 2026-11-01 --until 2026-12-01")
    if fmt not in ("table", "json"):
        raise CommandFailed(f"--format {fmt!r} is not one of table, json")
    chosen = [t.strip() for t in tenants.split(",") if t.strip()]
    outcomes, months = _plan_outcomes(settings, plans, start, end, chosen)
    if html is not None:
        from streams.reports.page import Section, render
        from streams.reports.usage import whatif_items

        html.write_text(render("Costline: which plan makes money", f"the ledger's usage from {start.isoformat()} "
                               f"to {end.isoformat()}, {len({t for t, _ in months})} tenants", [],
                               [Section("The plans compared", whatif_items(outcomes))]))
    if fmt == "json":
        print(json.dumps({"since": start.isoformat(), "until": end.isoformat(),
                          "plans": [outcome.to_json() for outcome in outcomes]}, indent=2))
    else:
        _print_whatif(outcomes, start, end, CURRENT)
    if html is not None:
        err.print(f"wrote {html}")


def _print_whatif(outcomes: list[Any], start: datetime, end: datetime, current: str) -> None:
    table = Table(title=f"The plans on the ledger's usage, {start:%Y-%m-%d} to {end:%Y-%m-%d} (USD; "
                        "--format json for every digit)")
    table.add_column("plan", no_wrap=True)
    for name in ("revenue", "cost", "margin", "margin %", "ARPU/month", "discount", "overage", "at a loss"):
        table.add_column(name, justify="right", no_wrap=True)
    cents = Decimal("0.01")
    for outcome in outcomes:
        f = outcome.to_json()
        table.add_row(outcome.plan, f["revenue_usd"], f"{outcome.cost.quantize(cents)}", f"{outcome.margin.quantize(cents)}",
                      _percent(f["margin_percent"]), f["arpu_usd"] or "—", _percent(f["effective_discount_percent"]),
                      _percent(f["overage_share_percent"]), str(f["negative_margin_tenants"]))
    console.print(table)
    for outcome in outcomes[1:]:
        more = ", ".join(f"{t} +{d:.2f}" for t, d in outcome.pays_more) or "nobody"
        less = ", ".join(f"{t} {d:.2f}" for t, d in outcome.pays_less) or "nobody"
        console.print(f"{outcome.plan}: pays most more than on the {current} plans: {more}; pays most less: {less}")
    console.print("Churn is not modelled: a replay cannot observe it.")


def _percent(value: str | None) -> str:
    return "—" if value is None else f"{value}%"


@cli.command()
def report(
    html: Annotated[Path, typer.Option("--html", help="the page to write")] = None,  # type: ignore[assignment]
    since: Annotated[str, typer.Option(help="from this date or time (UTC without a zone)")] = "",
    until: Annotated[str, typer.Option(help="up to this date or time, excluded")] = "",
    tenant: Annotated[str, typer.Option(help="only this tenant")] = "",
    plans: Annotated[Path | None, typer.Option("--plans", help="also compare these candidate plans")] = None,
) -> None:
    """A self-contained HTML page of charts: cost, revenue and margin over time, per tenant, model and path; alerts."""
    from streams.reports.usage import report as make_report
    from streams.storage.query import query as run_query

    settings = _settings()
    start, end = _window(html is not None, since, until, "--html FILE, --since and --until, e.g. costline report "
                         "--html report.html --since 2026-11-01 --until 2026-12-01")
    outcomes = None if plans is None else _plan_outcomes(settings, plans, start, end, [tenant] if tenant else [])[0]
    html.write_text(make_report(lambda sql: run_query(settings, sql).rows, start, end, tenant or None, outcomes))
    err.print(f"wrote {html} ({html.stat().st_size / 1e6:.1f} MB, opens without a network)")


def _plan_outcomes(settings: Settings, candidates_file: Path, start: datetime, end: datetime, tenants: list[str],
                   only: str = "") -> tuple[list[Any], dict[tuple[str, str], Any]]:
    """The current plans' outcome and each candidate's on the ledger's usage (``whatif.compare``),
    and the tenant-months they were rated on."""
    from streams.operations.whatif import candidates_of, compare, ledger_months
    from streams.stages.plans import Plans
    from streams.storage.query import query as run_query

    if not candidates_file.is_file():
        raise CommandFailed(f"{candidates_file} is not a file: give the candidate plans' YAML "
                            "(see config/candidates.yaml)")
    current = Plans.from_file(settings.plans_file)
    candidates = candidates_of(Plans.from_file(candidates_file), str(candidates_file))
    months = ledger_months(current, start, end, lambda sql: run_query(settings, sql).rows, tenants or None, only)
    return compare(current, candidates, months), months


def _window(given: bool, since: str, until: str, needed: str) -> tuple[datetime, datetime]:
    """``--since`` and ``--until`` as times; a one-line error naming what is ``needed`` when they, or
    the command's other required option (``given`` false), are missing."""
    if not given or not since or not until:
        raise CommandFailed(f"give {needed}")
    return _instant(since), _instant(until)


def _instant(text: str) -> datetime:
    """A date (UTC midnight) or an ISO 8601 time; without a zone, UTC."""
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CommandFailed(f"{text!r} is not a date or time: use 2026-06-01 or 2026-06-01T12:00:00Z") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _event_id_of(line: bytes) -> str | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    event_id = value.get("event_id") if isinstance(value, dict) else None
    return event_id if isinstance(event_id, str) else None


# --- demo -------------------------------------------------------------------------------------------


@cli.command()
def demo(
    events: Annotated[int, typer.Option("--events", "-n", min=1)] = 5000,
    tenants: Annotated[int, typer.Option("--tenants", "-k", min=1)] = 12,
    timeout: Annotated[float, typer.Option(help="seconds to wait for every event to land")] = 180,
) -> None:
    """Start local Kafka if needed, run a worker, send a simulated workload and print costs from ClickHouse."""
    from streams.messaging.topics import KafkaUnavailable, check_reachable, ensure_topics
    from streams.operations.processes import WorkerProcess, wait_for
    from streams.storage.query import query as run_query
    from streams.storage.query import worker_owns_database

    settings = _settings()
    try:
        check_reachable(settings, timeout_s=2)
    except KafkaUnavailable:
        if settings.kafka_bootstrap_servers not in ("127.0.0.1:9092", "localhost:9092"):
            raise
        err.print("No Kafka broker answered; starting the local one (scripts/kafka start)...")
        subprocess.run([str(ROOT / "scripts" / "kafka"), "start"], check=True)
    ensure_topics(settings)

    worker = None
    if not worker_owns_database(settings):
        err.print("Starting a worker (costline worker)...")
        worker = WorkerProcess(os.environ, settings.home / "demo-worker.log").start()
    try:
        run_id = f"demo-{int(time.time())}"
        _simulate(settings, events, tenants, 0, int(time.time()), run_id)
        where = f"startsWith(event_id, '{run_id}-')"

        with _progress() as bar:
            task = bar.add_task("landing in ClickHouse", total=events)

            def all_landed() -> bool:
                n = int(run_query(settings, f"SELECT count() FROM usage WHERE {where}").rows[0][0])
                bar.update(task, completed=n)
                return n >= events

            wait_for(all_landed, timeout, "every event to land in ClickHouse", alive=worker, interval_s=0.25)
        _print_summary(settings, where)
        _print_demo_whatif(settings, where)
    finally:
        if worker is not None:
            worker.stop(timeout_s=30)


def _print_summary(settings: Settings, where: str) -> None:
    from streams.storage.query import query as run_query

    result = run_query(settings, f"""
        SELECT tenant_id, count() AS calls, sum(input_tokens) AS input_tokens,
               sum(output_tokens) AS output_tokens, countIf(NOT priced) AS unpriced, sum(cost_usd) AS cost_usd
        FROM usage WHERE {where} GROUP BY tenant_id ORDER BY cost_usd DESC""")
    table = Table("tenant", "calls", "input tokens", "output tokens", "unpriced", "cost (USD)",
                  title="Cost per tenant, read back from ClickHouse")
    total = Decimal(0)
    for tenant, calls, tin, tout, unpriced, cost in result.rows:
        total += cost
        table.add_row(tenant, f"{calls:,}", f"{tin:,}", f"{tout:,}", str(unpriced), f"{cost:.6f}")
    table.add_section()
    table.add_row("total", f"{sum(r[1] for r in result.rows):,}", "", "", "", f"{total:.6f}")
    console.print(table)
    paths = run_query(settings, f"""
        SELECT business_path, step, count() AS calls, sum(cost_usd) AS cost_usd
        FROM usage WHERE {where} GROUP BY business_path, step ORDER BY cost_usd DESC""")
    by_path = Table("business path", "step", "calls", "cost (USD)", title="Cost per business path and step")
    for path, step, calls, cost in paths.rows:
        by_path.add_row(path, step, f"{calls:,}", f"{cost:.6f}")
    console.print(by_path)
    _print_margins(settings, [row[0] for row in result.rows])
    alerts = run_query(settings, """
        SELECT tenant_id, limit_id, threshold_percent, level, usage, limit_value, crossed_at
        FROM quota_alert_history WHERE window_end > now64(3) ORDER BY tenant_id, limit_id, threshold_percent""")
    table = Table("tenant", "limit", "threshold", "level", "usage / limit", "crossed at",
                  title="Quota alerts in open windows (config/plans.yaml)")
    for tenant, limit_id, threshold, level, usage, limit, crossed_at in alerts.rows:
        table.add_row(tenant, limit_id, f"{threshold:.0f}%", level, f"{usage:.2f} / {limit:.2f}",
                      str(crossed_at)[11:19])
    console.print(table if alerts.rows else "No quota alerts in open windows.")


def _print_demo_whatif(settings: Settings, where: str) -> None:
    """The founding article's table, on the demo's own calls: the plans in force against a flat
    subscription, pay-per-call and usage-based pricing (config/candidates.yaml)."""
    from streams.operations.whatif import CURRENT

    candidates_file = settings.config_dir / "candidates.yaml"
    if not candidates_file.is_file():
        return
    now = datetime.now(UTC)
    start, end = now - timedelta(days=40), now + timedelta(days=1)
    _print_whatif(_plan_outcomes(settings, candidates_file, start, end, [], only=where)[0], start, end, CURRENT)
    console.print(f"The same for any window: costline whatif --plans {candidates_file} --since … --until … "
                  "[--html page.html]; charts: costline report --html report.html --since … --until …")


def _print_margins(settings: Settings, tenants: list[str]) -> None:
    """This month's invoice of each tenant, rated from the ledger (config/plans.yaml), beside its cost."""
    from streams.operations.invoice import InvoiceRefused, invoice
    from streams.stages.plans import Plans
    from streams.storage.query import query as run_query

    plans = Plans.from_file(settings.plans_file)
    table = Table("tenant", "usage revenue, streamed (USD)", "invoice total (USD)", "provider cost (USD)",
                  "margin (USD)", "margin %",
                  title=f"This month so far: revenue, cost and margin per tenant ({datetime.now(UTC):%Y-%m})")
    for tenant in tenants:
        zone = plans.plan_of(tenant)[1]
        try:
            bill = invoice(plans, tenant, f"{datetime.now(zone):%Y-%m}", lambda sql: run_query(settings, sql).rows)
        except InvoiceRefused:
            continue  # no rate card on the tenant's plan
        percent = f"{bill.margin_usd / bill.total * 100:.1f}%" if bill.total else ""
        table.add_row(tenant, f"{bill.streamed_usd:.6f}", f"{bill.total:.2f}", f"{bill.cost_usd:.6f}",
                      f"{bill.margin_usd:.6f}", percent)
    if table.rows:
        console.print(table)


# --- entry point ------------------------------------------------------------------------------------


def _user_errors() -> tuple[type[BaseException], ...]:
    from confluent_kafka import KafkaException

    return (CostlineError, KafkaException)


def main(argv: Iterable[str] | None = None) -> None:
    try:
        cli(args=list(argv) if argv is not None else None, standalone_mode=True)
    except _user_errors() as exc:
        err.print(f"costline: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
