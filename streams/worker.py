"""Starts a worker process: topics, database and migrations first, then the Faust app."""

from __future__ import annotations

import streams.faust_patches  # noqa: F401 - must precede every import of faust

import logging

import faust

from streams.app import create_app, faust_group, faust_topics
from streams.clickhouse import connect
from streams.logs import logging_config
from streams.migrations import migrate
from streams.pipeline import Enricher
from streams.plans import Plans
from streams.query import connect_readonly
from streams.settings import Settings
from streams.sink import Sink
from streams.topics import ensure_topics, seed_group_offsets

log = logging.getLogger(__name__)


def run_worker(settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT. The worker owns an embedded database path while it runs."""
    # Configuration errors stop the start here, before anything connects.
    enricher = Enricher.from_config_dir(settings.config_dir)
    plans = Plans.from_file(settings.config_dir / "plans.yaml")
    ensure_topics(settings)
    seeded = seed_group_offsets(settings, faust_group(settings), faust_topics(settings))
    if seeded:
        log.info("committed the earliest offset of %d partitions new to group %s", seeded, faust_group(settings))
    sink = None
    if settings.role in ("all", "sink"):  # a stream-only worker never opens the database
        writer = connect(settings.clickhouse_url)
        for migration in migrate(writer):
            log.info("applied migration %04d_%s", migration.version, migration.name)
        sink = Sink(writer=writer, reader=connect_readonly(settings.clickhouse_url))
    app = create_app(settings, enricher, plans, sink)
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False,
                          logging_config=logging_config(settings.log_level, settings.log_format))
    worker.execute_from_commandline()
