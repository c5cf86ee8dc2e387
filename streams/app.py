"""The Faust worker: hosts the batch engine, the sink agents and the HTTP endpoints.

    usage.raw ──engine (streams.engine)──▶ ClickHouse usage_ledger, quota_alerts       role all
        │         └─ one Kafka transaction per batch: usage.dlq, quota.alerts, quota.state,
        │            the quota changelog and the batch's offsets
        └─ role stream: the same engine, publishing usage.attributed instead of writing ClickHouse;
           role sink: Faust agents land usage.attributed and quota.alerts in ClickHouse.

Values are raw bytes on every topic: decoding happens inside the agents, because a Faust
codec that raises makes Faust acknowledge and silently drop the message. Agents run with
concurrency 1 (higher values can commit offsets past in-flight events); the worker scales
with partitions and more worker processes in the same consumer group.
"""

from __future__ import annotations

import streams.faust_patches  # noqa: F401 - must precede every import of faust

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import faust
import mode
from clickhouse_connect.driver.client import Client
from pydantic import ValidationError

from schemas.attributed import AttributedUsage
from schemas.dead_letter import Rejection, dead_letter_headers
from schemas.quota import QuotaAlert
from streams.faults import ClickHouseFaults
from streams.metrics import Counters, render
from streams.engine import EXIT_UNLANDED, BatchEngine
from streams.pipeline import Enricher
from streams.plans import Plans
from streams.query import QueryError, run_readonly
from streams.reprice import RepriceRefused, RepriceWindow, reprice
from streams.settings import Settings
from streams.sink import ALERTS, LEDGER, Encoded, Sink, SinkStats, TableSpec, land
from streams.topics import MAX_RECORD_BYTES

log = logging.getLogger(__name__)


def _raw_topic(app: faust.App, name: str, partitions: int) -> faust.TopicT:
    return app.topic(
        name,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=partitions,
    )


@dataclass
class _Shared:
    """What the stream and sink halves of a worker share."""

    settings: Settings
    counters: Counters
    dlq: faust.TopicT

    async def dead_letter(self, message: Any, rejection: Rejection) -> None:
        self.counters.dead_lettered += 1
        log.info("dead-lettered %s[%s]@%s: %s: %s", message.topic, message.partition, message.offset,
                 rejection.reason, rejection.message)
        await self.dlq.send(
            key=message.key,
            value=message.value if message.value is not None else b"",
            timestamp=message.timestamp,
            headers=dead_letter_headers(rejection, message.topic, message.partition, message.offset),
        )


def faust_group(settings: Settings) -> str:
    """The Faust app id, which is also its consumer group. The engine's group is the plain app
    id; the Faust app that hosts it has its own, so that the two never join the same group."""
    return f"{settings.app_id}-sink" if settings.role == "sink" else f"{settings.app_id}-host"


def faust_topics(settings: Settings) -> list[str]:
    """The topics the Faust agents of ``settings.role`` consume (the engine consumes usage.raw)."""
    t = settings.topics
    return {"stream": [], "sink": [t.attributed, t.alerts], "all": [t.attributed]}[settings.role]


def create_app(settings: Settings, enricher: Enricher, plans: Plans, sink: Sink | None) -> faust.App:
    """The worker app for ``settings.role``: ``all`` (the batch engine, writing ClickHouse),
    ``stream`` (the engine, publishing usage.attributed) or ``sink`` (ClickHouse agents)."""
    if settings.role in ("all", "sink") and sink is None:
        raise ValueError(f"a worker of role {settings.role} needs ClickHouse clients")
    app_id = faust_group(settings)
    # Table stores (RocksDB) are locked by their process: two workers on one host need two folders.
    datadir = settings.home / "worker" / f"{app_id}-{settings.web_port}"
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        app_id,
        broker=[f"kafka://{host.strip()}" for host in settings.kafka_bootstrap_servers.split(",")],
        datadir=str(datadir),
        topic_partitions=settings.partitions,
        topic_allow_declare=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_max_request_size=MAX_RECORD_BYTES + 65_536,  # dead-letters an oversized record whole
        web_enabled=True,
        web_bind=settings.web_host,
        web_host=settings.web_host,
        web_port=settings.web_port,
        web_in_thread=False,
        store="rocksdb://",
    )
    shared = _Shared(settings, Counters(), _raw_topic(app, settings.topics.dlq, settings.partitions))
    faults = ClickHouseFaults() if settings.fault_injection else None
    engine = None
    if settings.role in ("all", "stream"):
        engine = BatchEngine(settings, enricher, plans, shared.counters, sink,
                             insert_wrapper=faults.wrap if faults else None)
        _add_engine(app, engine)
    if sink is not None:
        _add_queries(app, settings, sink, faults)
        # Role all lands what ``costline backfill`` publishes to usage.attributed; its engine
        # lands the alerts itself.
        _add_sink(app, shared, sink, faults, alerts=settings.role == "sink")
    else:
        app.producer_only = True  # no Faust consumer: the engine consumes usage.raw itself
    _add_health(app, shared, enricher, engine, sink is not None, set(faust_topics(settings)))
    return app


def _add_engine(app: faust.App, engine: BatchEngine) -> None:
    @app.service
    class Engine(mode.Service):
        """Runs the batch engine's thread for as long as the worker runs."""

        async def on_start(self) -> None:
            engine.start()

        async def on_stop(self) -> None:
            # Lets the batch in flight land and commit (or the process exits 75 when it cannot).
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)


def _add_sink(app: faust.App, shared: _Shared, sink: Sink, faults: ClickHouseFaults | None, alerts: bool) -> None:
    """Faust agents that land usage.attributed (and, with ``alerts``, quota.alerts) in ClickHouse."""
    settings, counters, topics = shared.settings, shared.counters, shared.settings.topics
    stopping = threading.Event()

    async def land_batches(stream: faust.StreamT, table: TableSpec[Any], parse: Any) -> None:
        """Batches a topic into a ClickHouse table; a record that does not parse is dead-lettered."""
        loop = asyncio.get_running_loop()
        sink_stats = counters.sinks.setdefault(table.name, SinkStats())
        send = faults.wrap(table.send) if faults else table.send
        async for events in stream.take_events(settings.sink_batch, within=settings.sink_within_s):
            records = []
            for event in events:
                try:
                    records.append(parse(event.message.value))
                except ValidationError as exc:
                    await shared.dead_letter(event.message, Rejection(
                        reason="invalid_event", message=f"not a {table.name} record: {exc.errors()[0]['msg']}"))
            if not records:
                continue
            # Blocks this agent, and so the offset commit of the batch, until the batch lands.
            # take_events() acknowledges the batch when this body ends, even when it ends by
            # cancellation (shutdown), so the write is shielded from cancellation: on SIGTERM the
            # batch in flight lands before its offsets can be committed, or, if ClickHouse refuses
            # it, the process leaves without committing them.
            write = loop.run_in_executor(sink.executor, partial(_encode_and_land, sink, table, records, sink_stats,
                                                                stopping, send))
            try:
                landed = await asyncio.shield(write)
            except asyncio.CancelledError:
                stopping.set()  # a failing write stops retrying; one in progress finishes
                if not await write:
                    log.error("stopping with %d unlanded %s rows; exiting without committing their offsets",
                              len(records), table.name)
                    os._exit(EXIT_UNLANDED)
                raise
            if not landed:  # only when stopping, which only the branch above sets
                os._exit(EXIT_UNLANDED)
            for event in events:
                counters.processed(event.message.topic, event.message.partition, event.message.offset)

    @app.agent(_raw_topic(app, topics.attributed, settings.partitions), name="land", concurrency=1)
    async def land_usage(stream: faust.StreamT) -> None:
        await land_batches(stream, LEDGER, AttributedUsage.model_validate_json)

    if alerts:
        @app.agent(_raw_topic(app, topics.alerts, settings.partitions), name="land_alerts", concurrency=1)
        async def land_alerts(stream: faust.StreamT) -> None:
            await land_batches(stream, ALERTS, QuotaAlert.model_validate_json)


def _encode_and_land(sink: Sink, table: TableSpec[Any], records: list[Any], stats: SinkStats,
                     stopping: threading.Event, send: Callable[[Client, Encoded], None]) -> bool:
    """On the writer's thread: the event loop stays free while a batch is encoded."""
    return land(sink.writer, table.encode(records, sink.compression), stats, stopping=stopping, send=send)


def _add_queries(app: faust.App, settings: Settings, sink: Sink, faults: ClickHouseFaults | None) -> None:
    """The endpoints of the worker that has the database open: queries, re-pricing, fault injection."""
    query_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse-query")

    @app.page("/v1/faults/clickhouse")
    class Faults(faust.web.View):
        async def post(self, request: faust.web.Request) -> faust.web.Response:
            if faults is None:
                return self.json({"error": "fault injection is off (COSTLINE_FAULT_INJECTION=1)"}, status=404)
            body = await request.json()
            faults.fail_for(float(body["fail_for_s"]))
            return self.json({"failing_for_s": float(body["fail_for_s"])})

    @app.page("/v1/query")
    class Query(faust.web.View):
        async def post(self, request: faust.web.Request) -> faust.web.Response:
            try:
                sql = (await request.json())["sql"]
            except (ValueError, KeyError, TypeError):
                return self.json({"error": 'send a JSON object {"sql": "SELECT ..."}'}, status=400)
            loop = asyncio.get_running_loop()
            try:
                result = await loop.run_in_executor(query_executor, run_readonly, sink.reader, sql)
            except QueryError as exc:
                return self.json({"error": str(exc)}, status=400)
            return self.json(result.to_json())

    @app.page("/v1/reprice")
    class Reprice(faust.web.View):
        """Re-prices stored usage with the configuration on disk now (see ``costline reprice``)."""

        async def post(self, request: faust.web.Request) -> faust.web.Response:
            try:
                body = await request.json()
                window = RepriceWindow.model_validate(body)
                fresh = Enricher.from_config_dir(settings.config_dir)
            except (ValueError, TypeError) as exc:
                return self.json({"error": str(exc).splitlines()[0]}, status=400)
            loop = asyncio.get_running_loop()
            # On the writer's executor: the writer client is used by one thread at a time.
            try:
                result = await loop.run_in_executor(
                    sink.executor, partial(reprice, sink.writer, fresh, window.since, window.until, window.tenant))
            except RepriceRefused as exc:
                return self.json({"error": str(exc)}, status=400)
            return self.json(result.to_json())


def _add_health(app: faust.App, shared: _Shared, enricher: Enricher, engine: BatchEngine | None,
                owns_database: bool, sources: set[str]) -> None:
    settings, counters = shared.settings, shared.counters

    @app.page("/v1/health")
    class Health(faust.web.View):
        async def get(self, request: faust.web.Request) -> faust.web.Response:
            failing = any(sink.failing_since is not None for sink in counters.sinks.values())
            status = "degraded" if failing else "ok"
            body = {"status": status, "role": settings.role, "pricing_version": enricher.pricer.version,
                    # Only the worker that has the database open says which: queries are routed by it.
                    "clickhouse_url": settings.clickhouse_url if owns_database else None,
                    **counters.health()}
            return self.json(body, status=200 if status == "ok" else 503)

    @app.page("/metrics")
    class Metrics(faust.web.View):
        async def get(self, request: faust.web.Request) -> faust.web.Response:
            highwaters = dict(engine.highwaters) if engine is not None else {}
            if sources:
                consumer = app.consumer
                for tp in consumer.assignment():
                    highwater = consumer.highwater(tp)  # None until the partition's first fetch
                    if tp.topic in sources and highwater is not None:
                        highwaters[(tp.topic, tp.partition)] = highwater
            return self.text(render(counters, highwaters), content_type="text/plain; version=0.0.4")
