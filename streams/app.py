"""The Faust worker: thin agents around the plain functions of each pipeline stage.

    usage.raw ──attribute──▶ usage.attributed ──land──▶ ClickHouse usage_ledger
        │  └─(rejected)──▶ usage.dlq  (original key, bytes and timestamp; reason in headers)
        └─ quota windows (Faust tables) ──▶ quota.alerts ──land_alerts──▶ ClickHouse quota_alerts
                                        └─(every 250 ms)─▶ quota.state (compacted)

Values are raw bytes on every topic: decoding happens inside the agents, because a Faust
codec that raises makes Faust acknowledge and silently drop the message. Agents run with
concurrency 1 (higher values can commit offsets past in-flight events); the worker scales
with partitions and more worker processes in the same consumer group. ``COSTLINE_ROLE`` splits
the worker in two: ``stream`` runs the attribute agent and the quota tables, ``sink`` the two
ClickHouse agents and the query endpoints (its own consumer group); ``all`` runs both.
"""

from __future__ import annotations

import streams.faust_patches  # noqa: F401 - must precede every import of faust

import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import faust
from clickhouse_connect.driver.client import Client
from pydantic import ValidationError

from schemas.attributed import AttributedUsage
from schemas.dead_letter import Rejection, dead_letter_headers
from schemas.quota import QuotaAlert, QuotaState
from streams.faults import ClickHouseFaults
from streams.metrics import Counters, render
from streams.pipeline import Enricher, attribute_raw
from streams.plans import Plans
from streams.query import QueryError, run_readonly
from streams.quotas import QUOTA_TABLES, QuotaEngine
from streams.reprice import RepriceWindow, reprice
from streams.settings import Settings
from streams.sink import ALERTS, LEDGER, SinkStats, TableSpec, land
from streams.topics import MAX_RECORD_BYTES

log = logging.getLogger(__name__)

#: Exit status of a worker stopped while a batch could not be written (nothing was committed).
EXIT_UNLANDED = 75


def _raw_topic(app: faust.App, name: str, partitions: int) -> faust.TopicT:
    return app.topic(
        name,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=partitions,
    )


STATE_FLUSH_S = 0.25


@dataclass(frozen=True)
class Sink:
    """The sink's ClickHouse clients: ``writer`` lands batches; ``reader`` (from ``connect_readonly``)
    serves queries. chDB keeps settings per session, so the two are never the same client."""

    writer: Client
    reader: Client


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


def group_id(settings: Settings) -> str:
    """The Faust app id, which is also the Kafka consumer group: a sink-only worker has its own."""
    return f"{settings.app_id}-sink" if settings.role == "sink" else settings.app_id


def source_topics(settings: Settings) -> list[str]:
    """The topics a worker of ``settings.role`` consumes."""
    t = settings.topics
    return {"stream": [t.raw], "sink": [t.attributed, t.alerts], "all": [t.raw, t.attributed, t.alerts]}[
        settings.role]


def create_app(settings: Settings, enricher: Enricher, plans: Plans, sink: Sink | None) -> faust.App:
    """The worker app for ``settings.role``: ``stream`` (validate, price, tag, quotas), ``sink``
    (ClickHouse; needs ``sink``) or ``all``. A sink-only worker has its own consumer group."""
    app_id = f"{settings.app_id}-sink" if settings.role == "sink" else settings.app_id
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
    if settings.role in ("all", "stream"):
        _add_stream(app, shared, enricher, plans)
    if settings.role in ("all", "sink"):
        if sink is None:
            raise ValueError("a sink worker needs ClickHouse clients")
        _add_sink(app, shared, sink, enricher)
    _add_health(app, shared, enricher, sink is not None, set(source_topics(settings)))
    return app


def _add_stream(app: faust.App, shared: _Shared, enricher: Enricher, plans: Plans) -> None:
    settings, counters, topics = shared.settings, shared.counters, shared.settings.topics
    raw = _raw_topic(app, topics.raw, settings.partitions)
    attributed = _raw_topic(app, topics.attributed, settings.partitions)
    alerts = _raw_topic(app, topics.alerts, settings.partitions)
    state = _raw_topic(app, topics.state, settings.partitions)
    windows, tenants, seen = (
        app.Table(name, partitions=settings.partitions,
                  schema=faust.Schema(key_type=str, key_serializer="json", value_serializer="json"))
        for name in QUOTA_TABLES
    )
    quotas = QuotaEngine(plans, windows, tenants, seen)
    # Latest state per window since the last flush; the topic's key is per tenant × limit × scope.
    pending_states: dict[tuple[str, datetime], QuotaState] = {}
    max_future = timedelta(seconds=settings.max_future_s)

    @app.agent(raw, name="attribute", concurrency=1)
    async def attribute(stream: faust.StreamT) -> None:
        async for event in stream.events():
            message = event.message
            counters.events_in += 1
            counters.processed(message.topic, message.partition, message.offset)
            try:
                out = attribute_raw(message.value, enricher, now=datetime.now(UTC), max_future=max_future,
                                    max_bytes=settings.max_event_bytes)
            except Exception as exc:  # noqa: BLE001 - a bug on one event must not stop the stream
                log.exception("processing failed for %s[%s]@%s", message.topic, message.partition, message.offset)
                out = Rejection(reason="processing_error", message=f"{type(exc).__name__}: {exc}"[:500])
            if isinstance(out, Rejection):
                await shared.dead_letter(message, out)
                continue
            counters.attributed += 1
            counters.unpriced += not out.priced
            try:
                quota = quotas.apply(out, message.partition, message.offset)
            except Exception:  # noqa: BLE001 - the event still reaches the ledger; the error is counted
                counters.quota_errors += 1
                log.exception("quota update failed for %s[%s]@%s", message.topic, message.partition, message.offset)
            else:
                counters.duplicates += quota.duplicate
                if quota.late:
                    counters.late += 1
                    out = out.model_copy(update={"late": True})
                for alert in quota.alerts:
                    counters.alerts += 1
                    await alerts.send(key=alert.tenant_id.encode(), value=alert.model_dump_json().encode())
                for quota_state in quota.states:
                    pending_states[(quota_state.key, quota_state.window_start)] = quota_state
            await attributed.send(key=out.tenant_id.encode(), value=out.model_dump_json().encode(),
                                  timestamp=message.timestamp)

    @app.timer(interval=STATE_FLUSH_S)
    async def publish_quota_state() -> None:
        """The latest state of every window that changed since the last flush (coalesced)."""
        if not pending_states:
            return
        latest = list(pending_states.values())
        pending_states.clear()
        for quota_state in latest:
            await state.send(key=quota_state.key.encode(), value=quota_state.model_dump_json().encode())

    @app.on_partitions_revoked.connect
    async def _partitions_moved(sender: Any, revoked: Any, **kwargs: Any) -> None:
        quotas.forget_partitions()


def _add_sink(app: faust.App, shared: _Shared, sink: Sink, enricher: Enricher) -> None:
    settings, counters, topics = shared.settings, shared.counters, shared.settings.topics
    attributed = _raw_topic(app, topics.attributed, settings.partitions)
    alerts = _raw_topic(app, topics.alerts, settings.partitions)
    ch_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse-sink")
    query_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse-query")
    stopping = threading.Event()
    faults = ClickHouseFaults() if settings.fault_injection else None

    async def land_batches(stream: faust.StreamT, table: TableSpec[Any], parse: Any) -> None:
        """Batches a topic into a ClickHouse table; a record that does not parse is dead-lettered."""
        loop = asyncio.get_running_loop()
        sink_stats = counters.sinks.setdefault(table.name, SinkStats())
        insert = faults.wrap(table.insert) if faults else table.insert
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
            write = loop.run_in_executor(ch_executor, partial(land, sink.writer, table, records, sink_stats,
                                                              stopping=stopping, insert=insert))
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

    @app.agent(attributed, name="land", concurrency=1)
    async def land_usage(stream: faust.StreamT) -> None:
        await land_batches(stream, LEDGER, AttributedUsage.model_validate_json)

    @app.agent(alerts, name="land_alerts", concurrency=1)
    async def land_alerts(stream: faust.StreamT) -> None:
        await land_batches(stream, ALERTS, QuotaAlert.model_validate_json)

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
            # On the sink's executor: the writer client is used by one thread at a time.
            result = await loop.run_in_executor(
                ch_executor, partial(reprice, sink.writer, fresh, window.since, window.until, window.tenant))
            return self.json(result.to_json())


def _add_health(app: faust.App, shared: _Shared, enricher: Enricher, owns_database: bool, sources: set[str]) -> None:
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
            consumer = app.consumer
            highwaters = {(tp.topic, tp.partition): consumer.highwater(tp) for tp in consumer.assignment()
                          if tp.topic in sources}
            return self.text(render(counters, highwaters), content_type="text/plain; version=0.0.4")
