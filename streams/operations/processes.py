"""Costline processes run as children — by ``costline demo``, the integration tests and the
benchmarks: start one, wait until it serves its health endpoint, stop it with a signal."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from confluent_kafka import KafkaException

from streams.errors import CostlineError
from streams.httpjson import get_json
from streams.messaging.topics import admin, pipeline_topics
from streams.settings import Settings

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
#: The topic prefix of every pipeline ``isolated_env`` makes.
_ISOLATED_PREFIX = "run-"


class ProcessFailed(CostlineError):
    """A child process exited, or a condition was not met in time."""


def wait_for(condition: Callable[[], T], timeout_s: float, what: str, *, alive: Child | None = None,
             interval_s: float = 0.2) -> T:
    """Polls ``condition`` until it returns something truthy, and returns that."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if alive is not None and not alive.running:
            raise ProcessFailed(f"{alive.name} exited with status {alive.process.returncode} while waiting for "
                                f"{what}; its log ends:\n{alive.log_tail()}")
        if time.monotonic() > deadline:
            raise ProcessFailed(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (children, theirs, ...), from /proc."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                children = [int(c) for c in open(f"/proc/{parent}/task/{task}/children").read().split()]
            except (FileNotFoundError, ValueError):
                continue
            found += children
            queue += children
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def isolated_env(home: Path, kafka_servers: str, config_dir: Path, **extra: str) -> dict[str, str]:
    """An environment for a pipeline of its own: topics, consumer group, database and ports."""
    tag = uuid.uuid4().hex[:10]
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_servers,
        "COSTLINE_HOME": str(home),
        "COSTLINE_TOPIC_PREFIX": f"{_ISOLATED_PREFIX}{tag}.",
        "COSTLINE_APP_ID": f"costline-{tag}",
        "COSTLINE_WEB_PORT": str(free_port()),
        "COSTLINE_ENFORCER_PORT": str(free_port()),
        "COSTLINE_CONFIG_DIR": str(config_dir),
        "COSTLINE_LOG_LEVEL": "warning",
        **extra,
    }
    env.pop("CLICKHOUSE_URL", None)
    return env


def remove_isolated_topics(settings: Settings, timeout_s: float = 15.0) -> None:
    """Deletes the topics of a pipeline made by ``isolated_env`` (best effort: what the broker does
    not delete in time stays), so that runs do not pile up thousands of topics on a local broker."""
    if not settings.topic_prefix.startswith(_ISOLATED_PREFIX):
        raise ValueError(f"not an isolated pipeline (topic prefix {settings.topic_prefix!r}); nothing deleted")
    client = admin(settings)  # (kept until the deletions answer: a destroyed client fails them)
    futures = client.delete_topics(list(pipeline_topics(settings)), operation_timeout=timeout_s)
    for future in futures.values():
        try:
            future.result(timeout=timeout_s)
        except (KafkaException, TimeoutError):  # a topic already gone, or a slow broker
            pass


class Child:
    """A ``costline <command>`` child process with its output in a log file."""

    def __init__(self, command: str, env: Mapping[str, str], log_path: Path, args: tuple[str, ...] = ()) -> None:
        self.name = f"costline {command}"
        self.command = command
        self.args = args
        self.env = dict(env)
        self.settings = Settings.from_env(self.env)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def health(self) -> dict[str, Any] | None:
        raise NotImplementedError

    def start(self, timeout_s: float = 90) -> Child:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "streams.cli", self.command, *self.args], env=self.env,
                                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: (self.health() or {}).get("status") == "ok", timeout_s, f"{self.name} to be ready",
                 alive=self)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        """Signals the process and waits for it; returns its exit status."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


class WorkerProcess(Child):
    def __init__(self, env: Mapping[str, str], log_path: Path, processes: int = 0) -> None:
        """``processes``: ``costline worker --processes N`` (its health is the sink's)."""
        super().__init__("worker", env, log_path, ("--processes", str(processes)) if processes else ())

    def health(self) -> dict[str, Any] | None:
        return get_json(f"{self.settings.web_url}/v1/health", headers=self.settings.web_headers)


class EnforcerProcess(Child):
    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        super().__init__("enforcer", env, log_path)
        self.url = f"http://{self.settings.enforcer_host}:{self.settings.enforcer_port}"

    def health(self) -> dict[str, Any] | None:
        return get_json(f"{self.url}/v1/health")
