"""``costline worker``: builds a worker from its settings and runs it.

This is the one place where the parts meet: configuration, topics and database first (a
mistake stops the start here, before anything consumes), then the batch loop of the role —
source, processor, checkpoint and sink — and the Faust host around it.

| role     | reads                     | writes ClickHouse | publishes                            |
|----------|---------------------------|-------------------|--------------------------------------|
| `all`    | usage.raw, usage.attributed (backfill) | ledger, alerts | dead letters, alerts, quota state |
| `stream` | usage.raw                 | —                 | the above, usage.ledger (and usage.attributed if `COSTLINE_PUBLISH_ATTRIBUTED`) |
| `sink`   | usage.ledger, usage.attributed, quota.alerts | ledger, alerts | dead letters      |

With ``COSTLINE_OTLP_TOPIC`` set, roles ``all`` and ``stream`` also read an OpenTelemetry
Collector's spans from that topic and publish their usage events to usage.raw
(``streams.runtime.spans``).
"""

from __future__ import annotations

import logging
import threading

import faust

from streams.messaging.topics import LEDGER_BLOCK_BYTES, changelog_topic, ensure_topics
from streams.runtime.checkpoint import Checkpoint
from streams.runtime.host import create_app
from streams.runtime.kafka import KafkaChangelog, KafkaSource, KafkaTransactions
from streams.runtime.logs import logging_config
from streams.runtime.loop import BatchLoop, LoopThread
from streams.runtime.metrics import Counters
from streams.runtime.processor import BatchProcessor, quota_state
from streams.runtime.spans import SpanIngest
from streams.settings import Settings, Topics
from streams.stages.attribution import Attribution
from streams.stages.plans import Plans
from streams.stages.quotas import QuotaEngine, QuotaTables
from streams.stages.spans import SpanMapping
from streams.storage.clickhouse import connect, is_embedded
from streams.storage.faults import ClickHouseFaults
from streams.storage.migrations import migrate
from streams.storage.query import connect_readonly
from streams.storage.sink import ClickHouseSink, send_to

#: How often, at most, the embedded ClickHouse gives its allocator's free memory back after a
#: landing (``ClickHouseSink``, ``purge_every_s``).
_PURGE_EVERY_S = 1.0

log = logging.getLogger(__name__)


def run_worker(settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT. The worker owns an embedded database path while it runs."""
    attribution = Attribution.from_settings(settings)
    plans = Plans.from_file(settings.plans_file)
    reads_spans = bool(settings.otlp_topic) and settings.role in ("all", "stream")
    mapping = SpanMapping.from_file(settings.otlp_file) if reads_spans else None  # (a mistake stops the start)
    ensure_topics(settings)
    counters = Counters()
    faults = ClickHouseFaults() if settings.fault_injection else None
    sink = None
    if settings.role in ("all", "sink"):  # a stream-only worker never opens the database
        writer = connect(settings.clickhouse_url)
        for migration in migrate(writer):
            log.info("applied migration %04d_%s", migration.version, migration.name)
        sink = ClickHouseSink(writer, connect_readonly(settings.clickhouse_url, settings), counters.sinks,
                              send=faults.wrap(send_to) if faults else send_to,
                              purge_every_s=_PURGE_EVERY_S if is_embedded(settings.clickhouse_url) else None)
    loop, checkpoint = build_loop(settings, counters, attribution, plans, sink)
    spans = SpanIngest(settings, mapping, counters) if mapping is not None else None
    app = create_app(settings, loop, checkpoint, counters, attribution, sink, faults, spans)
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False,
                          logging_config=logging_config(settings.log_level, settings.log_format))
    worker.execute_from_commandline()


def build_loop(settings: Settings, counters: Counters, attribution: Attribution, plans: Plans,
               sink: ClickHouseSink | None) -> tuple[LoopThread, Checkpoint]:
    """The batch loop of ``settings.role`` on the Kafka cluster, and its checkpoint."""
    t = settings.topics
    stopping = threading.Event()
    source, transactions = KafkaSource(settings), KafkaTransactions(settings)
    reads_raw = settings.role in ("all", "stream")
    state = quotas = changelog = None
    if reads_raw:
        state = quota_state(changelog_topic(settings), settings.live_state_entries)
        quotas = QuotaEngine(plans, lambda partition: QuotaTables(**state.views(partition)))
        changelog = KafkaChangelog(settings.kafka_bootstrap_servers, f"{settings.deployment}-restore")
    stream = settings.role == "stream"
    processor = BatchProcessor(t, counters, attribution=attribution if reads_raw else None, quotas=quotas,
                               state=state, block_bytes=LEDGER_BLOCK_BYTES if stream else None)
    checkpoint = Checkpoint(topics=t, source=source, transactions=transactions, counters=counters,
                            stopping=stopping, sink=sink, state=state, changelog=changelog,
                            on_restore=quotas.forget_partitions if quotas else lambda: None,
                            publish_blocks=stream, publish_json=stream and settings.publish_attributed)
    loop = BatchLoop(source=source, topics=role_topics(settings.role, t), processor=processor, checkpoint=checkpoint,
                     transactions=transactions, batch_size=settings.sink_batch, within_s=settings.sink_within_s,
                     stopping=stopping)

    def close() -> None:
        source.close()
        transactions.close()

    return LoopThread(loop, close), checkpoint


def role_topics(role: str, t: Topics) -> list[str]:
    """The topics a role's loop reads (the module docstring's table)."""
    return {"all": [t.raw, t.attributed], "stream": [t.raw], "sink": [t.ledger, t.attributed, t.alerts]}[role]
