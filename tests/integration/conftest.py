"""Integration fixtures: a real Kafka broker (scripts/kafka start) and real worker processes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from streams.messaging.topics import ensure_topics
from streams.operations.processes import ROOT, WorkerProcess, isolated_env, remove_isolated_topics


@pytest.fixture
def worker(kafka_servers: str, tmp_path: Path) -> Iterator[WorkerProcess]:
    """A worker, not started yet, of a pipeline of its own: its own topics, consumer group, embedded
    database, ports and a copy of config/ to edit."""
    config_dir = tmp_path / "config"
    shutil.copytree(ROOT / "config", config_dir)
    env = isolated_env(tmp_path / "home", kafka_servers, config_dir, COSTLINE_PARTITIONS="4")
    worker = WorkerProcess(env, tmp_path / "worker.log")
    ensure_topics(worker.settings)
    yield worker
    worker.stop()
    remove_isolated_topics(worker.settings)


def costline(worker, *args: str) -> str:
    """Runs ``costline <args>`` with the worker's environment; its output, whitespace collapsed."""
    done = subprocess.run([sys.executable, "-m", "streams.cli", *args], env=worker.env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return " ".join(done.stdout.split())


def read_topic(servers: str, topic: str, expected: int, timeout_s: float) -> list:
    """Reads ``topic`` from the beginning until ``expected`` records arrived, then a little longer
    to catch any surplus; returns every record read."""
    consumer = Consumer({"bootstrap.servers": servers, "group.id": f"reader-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest", "isolation.level": "read_committed"})
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, 0) for p in metadata.partitions])
        records: list = []
        deadline = time.monotonic() + timeout_s
        settle_until = None
        while time.monotonic() < deadline:
            for msg in consumer.consume(1000, timeout=0.5):
                if msg.error() is None:
                    records.append(msg)
            if len(records) >= expected:
                settle_until = settle_until or time.monotonic() + 2.0
                if time.monotonic() > settle_until:
                    break
        return records
    finally:
        consumer.close()
