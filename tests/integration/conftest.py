"""Integration fixtures: a real Kafka broker (scripts/kafka start) and real worker processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from streams.settings import Settings
from streams.topics import KafkaUnavailable, check_reachable, ensure_topics

ROOT = Path(__file__).resolve().parents[2]


def wait_until(condition: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.2) -> object:
    """Polls ``condition`` until it returns something truthy; fails the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def kafka_servers() -> str:
    settings = Settings.from_env()
    try:
        check_reachable(settings, timeout_s=10)
    except KafkaUnavailable as exc:
        pytest.fail(f"{exc} (scripts/test starts it for the test run)")
    return settings.kafka_bootstrap_servers


@dataclass
class Worker:
    settings: Settings
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self) -> Worker:
        self.process = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker"], env=self.env, cwd=ROOT,
                                        stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT)
        wait_until(self._ready, 90, f"the worker to serve /v1/health (log: {self.log_path})")
        return self

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"worker exited with {self.process.returncode}:\n{self.log_path.read_text()[-3000:]}")
        try:
            return self.health()["status"] == "ok"
        except OSError:
            return False

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.settings.web_url}/v1/health", timeout=2) as resp:
            return json.load(resp)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@pytest.fixture
def pipeline(kafka_servers: str, tmp_path: Path) -> Iterator[Worker]:
    """An isolated pipeline: its own topics, consumer group, embedded database and web port."""
    tag = uuid.uuid4().hex[:10]
    config_dir = tmp_path / "config"
    shutil.copytree(ROOT / "config", config_dir)
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_servers,
        "COSTLINE_HOME": str(tmp_path / "home"),
        "COSTLINE_TOPIC_PREFIX": f"test-{tag}.",
        "COSTLINE_APP_ID": f"costline-test-{tag}",
        "COSTLINE_WEB_PORT": str(free_port()),
        "COSTLINE_PARTITIONS": "4",
        "COSTLINE_LOG_LEVEL": "warning",
        "COSTLINE_CONFIG_DIR": str(config_dir),
    }
    env.pop("CLICKHOUSE_URL", None)
    settings = Settings.from_env(env)
    ensure_topics(settings)
    worker = Worker(settings, env, tmp_path / "worker.log")
    yield worker
    worker.stop()


def read_topic(servers: str, topic: str, expected: int, timeout_s: float) -> list:
    """Reads ``topic`` from the beginning until ``expected`` records arrived, then a little longer
    to catch any surplus; returns every record read."""
    consumer = Consumer({"bootstrap.servers": servers, "group.id": f"reader-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
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
