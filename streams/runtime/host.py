"""Faust as the worker's host: start-up, signals and shutdown, and the web endpoints.

Faust starts none of its Kafka clients here (``HostOnly``, through its documented
``BootStrategy``): every record is read and written by the batch loop
(``streams.runtime.loop``), which runs as a service of the app. Nothing of Faust or aiokafka is
patched, and no consumer group other than the loop's exists. See docs/architecture.md for why
Faust stays the host and no more.

Endpoints (``COSTLINE_WEB_HOST``, loopback by default; each needs the bearer token
``COSTLINE_WEB_TOKEN`` when one is set, as it must be off loopback):

- ``GET /v1/health``: ``ok`` (200) once the loop consumes and ClickHouse takes its writes;
  ``starting`` or ``degraded`` (503) otherwise; the counters.
- ``GET /metrics``: Prometheus text.
- ``POST /v1/query``, ``POST /v1/reprice`` (the worker that has the database open): read-only SQL
  and re-pricing, for the commands that cannot open an embedded database the worker holds.
- ``POST /v1/faults/clickhouse`` (``COSTLINE_FAULT_INJECTION=1`` only): a ClickHouse outage.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust
import mode
from clickhouse_connect.driver.client import Client
from faust.app.base import BootStrategy
from pydantic import ValidationError

from streams.errors import CostlineError
from streams.httpjson import bearer_ok
from streams.operations.invoice import issue
from streams.operations.reprice import RepriceRefused, RepriceResult, RepriceWindow, reprice
from streams.runtime.checkpoint import Checkpoint
from streams.runtime.loop import LoopThread
from streams.runtime.metrics import Counters, render
from streams.runtime.spans import SpanIngest
from streams.settings import Settings
from streams.stages.attribution import Attribution
from streams.stages.plans import Plans
from streams.storage.clickhouse import redact
from streams.storage.faults import ClickHouseFaults
from streams.storage.query import QueryError, connect_readonly, run_readonly
from streams.storage.sink import ClickHouseSink, SinkFailed


class Guarded(faust.web.View):
    """A view that answers only requests carrying the worker's bearer token (``COSTLINE_WEB_TOKEN``;
    every request, when none is set: the worker then listens on loopback only, which the settings
    enforce). A body that is not a JSON object gets 400 with a one-line reason, never a traceback."""

    token: str | None = None

    async def dispatch(self, request: faust.web.Request) -> faust.web.Response:
        if not bearer_ok(request.headers.get("Authorization"), self.token):
            return self.json({"error": "missing or wrong bearer token (COSTLINE_WEB_TOKEN)"}, status=401)
        return await super().dispatch(request)

    async def body(self, request: faust.web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
            raise BadRequest("the body is not JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("send a JSON object")
        return body


class BadRequest(Exception):
    """A request body that cannot be served; its message is the 400 answer's one line."""


class HostOnly(BootStrategy):
    """Faust's web server and the app's services; no Kafka producer, consumer, conductor or tables."""

    enable_kafka = False


class Host(faust.App):
    BootStrategy = HostOnly


def create_app(settings: Settings, loop: LoopThread, checkpoint: Checkpoint, counters: Counters,
               attribution: Attribution, sink: ClickHouseSink | None, faults: ClickHouseFaults | None,
               spans: SpanIngest | None = None) -> faust.App:
    """``spans``: the OTLP input, run beside the batch loop when the worker has one."""
    app_id = f"{settings.app_id}-{settings.role}"
    datadir = settings.home / "worker" / f"{app_id}-{settings.web_port}"  # Faust wants one; nothing is kept there
    datadir.mkdir(parents=True, exist_ok=True)
    Guarded.token = settings.web_token
    app = Host(
        app_id,
        broker=[f"kafka://{host.strip()}" for host in settings.kafka_bootstrap_servers.split(",")],
        datadir=str(datadir),
        web_enabled=True,
        web_bind=settings.web_host,
        web_host=settings.web_host,
        web_port=settings.web_port,
        web_in_thread=False,
    )

    @app.service
    class BatchLoopService(mode.Service):
        """Runs the batch loop's thread for as long as the worker runs."""

        async def on_start(self) -> None:
            loop.start()
            if spans is not None:
                spans.start()

        async def on_stop(self) -> None:
            if spans is not None:  # (its turn in progress commits: what it published is read by the loop or its successor)
                await asyncio.get_running_loop().run_in_executor(None, spans.stop)
            # Lets the batch in flight land and commit (or the process exits 75 when it cannot).
            if sink is not None:
                sink.stopping.set()  # a failing write stops retrying; one in progress finishes
            await asyncio.get_running_loop().run_in_executor(None, loop.stop)

    _add_health(app, settings, checkpoint, counters, attribution, sink)
    if sink is not None:
        _add_database(app, settings, sink, faults)
    return app


def _add_health(app: faust.App, settings: Settings, checkpoint: Checkpoint, counters: Counters,
                attribution: Attribution, sink: ClickHouseSink | None) -> None:
    @app.page("/v1/health")
    class Health(Guarded):
        async def get(self, request: faust.web.Request) -> faust.web.Response:
            if not checkpoint.ready.is_set():
                status = "starting"  # not consuming yet: partitions not assigned, or their state not restored
            else:
                status = "degraded" if sink is not None and sink.failing else "ok"
            body = {"status": status, "role": settings.role, "pricing_version": attribution.pricer.version,
                    # Only the worker that has the database open says which: queries are routed by it.
                    "clickhouse_url": redact(settings.clickhouse_url) if sink is not None else None,
                    **counters.health()}
            return self.json(body, status=200 if status == "ok" else 503)

    @app.page("/metrics")
    class Metrics(Guarded):
        async def get(self, request: faust.web.Request) -> faust.web.Response:
            return self.text(render(counters, dict(checkpoint.highwaters)), content_type="text/plain; version=0.0.4")


def _add_database(app: faust.App, settings: Settings, sink: ClickHouseSink, faults: ClickHouseFaults | None) -> None:
    """The endpoints of the worker that has the database open: queries, re-pricing, fault injection."""
    #: The one thread that uses the reader client.
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse-reader")
    #: Re-pricing runs on a thread and a read-only client of its own: a run can take minutes, and
    #: queries (``costline query``, backfill's look-up of late events) must not wait for it.
    repricer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse-reprice")
    reprice_reader: list[Client] = []

    def reprice_on_its_thread(window: RepriceWindow, attribution: Attribution, plans: Plans) -> RepriceResult:
        if not reprice_reader:
            reprice_reader.append(connect_readonly(settings.clickhouse_url, settings))
        return reprice(sink, attribution, window.since, window.until, window.tenant, reader=reprice_reader[0],
                       plans=plans)

    def issue_on_its_thread(plans: Plans, tenant: str, period: str) -> dict[str, Any]:
        if not reprice_reader:
            reprice_reader.append(connect_readonly(settings.clickhouse_url, settings))
        return issue(sink, plans, tenant, period, reader=reprice_reader[0])

    @app.page("/v1/invoices")
    class Invoices(Guarded):
        """Rates a tenant's month from the ledger and records it (``costline invoice --record``)."""

        async def post(self, request: faust.web.Request) -> faust.web.Response:
            try:
                body = await self.body(request)
                tenant, period = body["tenant"], body["period"]
                if not isinstance(tenant, str) or not isinstance(period, str):
                    raise TypeError
                plans = Plans.from_file(settings.plans_file)
            except (BadRequest, KeyError, TypeError):
                return self.json({"error": 'send a JSON object {"tenant": "acme", "period": "2026-11"}'}, status=400)
            except CostlineError as exc:
                return self.json({"error": str(exc).splitlines()[0]}, status=400)
            try:
                result = await asyncio.get_running_loop().run_in_executor(repricer, issue_on_its_thread, plans, tenant,
                                                                            period)
            except (CostlineError, SinkFailed, QueryError) as exc:
                return self.json({"error": str(exc).splitlines()[0]}, status=400)
            return self.json(result)

    @app.page("/v1/faults/clickhouse")
    class Faults(Guarded):
        async def post(self, request: faust.web.Request) -> faust.web.Response:
            if faults is None:
                return self.json({"error": "fault injection is off (COSTLINE_FAULT_INJECTION=1)"}, status=404)
            try:
                seconds = float((await self.body(request))["fail_for_s"])
            except (BadRequest, ValueError, KeyError, TypeError):
                return self.json({"error": 'send a JSON object {"fail_for_s": 30}'}, status=400)
            faults.fail_for(seconds)
            return self.json({"failing_for_s": seconds})

    @app.page("/v1/query")
    class Query(Guarded):
        async def post(self, request: faust.web.Request) -> faust.web.Response:
            try:
                sql = (await self.body(request))["sql"]
            except (BadRequest, KeyError):
                sql = None
            if not isinstance(sql, str):
                return self.json({"error": 'send a JSON object {"sql": "SELECT ..."}'}, status=400)
            try:
                result = await asyncio.get_running_loop().run_in_executor(reader, run_readonly, sink.reader, sql)
            except QueryError as exc:
                return self.json({"error": str(exc)}, status=400)
            return self.json(result.to_json())

    @app.page("/v1/reprice")
    class Reprice(Guarded):
        """Re-prices stored usage with the configuration on disk now (see ``costline reprice``)."""

        async def post(self, request: faust.web.Request) -> faust.web.Response:
            try:
                window = RepriceWindow.model_validate(await self.body(request))
                fresh = Attribution.from_settings(settings)
                plans = Plans.from_file(settings.plans_file)  # as the files say now, like the prices
            except ValidationError as exc:
                error = exc.errors()[0]
                return self.json({"error": f"{'.'.join(map(str, error['loc'])) or 'body'}: {error['msg']}"}, status=400)
            except (BadRequest, CostlineError) as exc:
                return self.json({"error": str(exc).splitlines()[0]}, status=400)
            try:
                result = await asyncio.get_running_loop().run_in_executor(repricer, reprice_on_its_thread, window, fresh,
                                                                            plans)
            except (RepriceRefused, SinkFailed) as exc:
                return self.json({"error": str(exc)}, status=400)
            return self.json(result.to_json())
