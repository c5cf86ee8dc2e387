"""``costline worker --processes N``: N stream workers and one sink on one host.

A worker process keeps one core busy at most: its batch loop is one thread, and Python runs one
thread at a time. On a host with more cores, N stream workers (role ``stream``) share the
partitions of ``usage.raw`` through their consumer group. Each validates, prices, tags, counts
quotas and rates revenue for its partitions, and publishes ``usage.attributed`` in its
transactions. One sink (role ``sink``) lands ``usage.attributed`` and the alerts in ClickHouse and
owns the embedded database. Every guarantee of the roles holds as it does for separate hosts
(docs/operations.md): nothing here coordinates them but Kafka.

Ports: the sink takes ``COSTLINE_WEB_PORT`` (its endpoints, and ``costline query`` through it), the
i-th stream worker ``COSTLINE_WEB_PORT + i``. That port also names the worker's transactional id
and its Faust data directory, so each child keeps them across its restarts.

A child that exits is started again, after a pause of 1 s that doubles, up to 30 s, while it keeps
exiting within a minute of its start. SIGTERM or Ctrl-C stops them all: SIGTERM to each, up to 60 s
to finish its batch, then SIGKILL.
"""

from __future__ import annotations

import logging
import logging.config
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from streams.runtime.logs import logging_config
from streams.settings import Settings, SettingsError

log = logging.getLogger(__name__)

#: A child that ran this long before exiting is started again after the shortest pause.
_STEADY_S = 60.0
_MAX_PAUSE_S = 30.0


@dataclass
class _Child:
    name: str
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    pause: float = 1.0
    due: float = 0.0
    restarts: int = field(default=0)


class Supervisor:
    def __init__(self, settings: Settings, stream_workers: int, environ: Mapping[str, str] | None = None) -> None:
        if settings.role != "all":
            raise SettingsError(f"COSTLINE_ROLE={settings.role!r}: --processes starts the stream and sink roles "
                                "itself; unset COSTLINE_ROLE")
        base = dict(os.environ if environ is None else environ)
        port = settings.web_port
        if port + stream_workers > 65535:
            raise SettingsError(f"COSTLINE_WEB_PORT={port}: the stream workers take the next {stream_workers} ports; "
                                "choose a lower one")
        self.children = [_Child("sink", {**base, "COSTLINE_ROLE": "sink", "COSTLINE_WEB_PORT": str(port)})]
        self.children += [_Child(f"stream-{i}", {**base, "COSTLINE_ROLE": "stream", "COSTLINE_WEB_PORT": str(port + i)})
                          for i in range(1, stream_workers + 1)]
        self.settings = settings
        self._stop = threading.Event()

    def run(self) -> int:
        """Runs the children until ``stop()`` (or SIGTERM / SIGINT, when called in the main thread)."""
        _configure_logging(self.settings)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self.stop())
            signal.signal(signal.SIGINT, lambda *_: self.stop())
        try:
            for child in self.children:
                self._start(child)
            while not self._stop.wait(0.5):
                now = time.monotonic()
                for child in self.children:
                    if child.process is not None and child.process.poll() is not None:
                        self._exited(child, now)
                    elif child.process is None and now >= child.due:
                        self._start(child)
        finally:
            self._stop_all()
        return 0

    def stop(self) -> None:
        self._stop.set()

    def _start(self, child: _Child) -> None:
        child.process = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker"], env=child.env)
        child.started = time.monotonic()
        log.info("%s started (pid %d, port %s)", child.name, child.process.pid, child.env["COSTLINE_WEB_PORT"])

    def _exited(self, child: _Child, now: float) -> None:
        code = child.process.returncode if child.process is not None else None
        child.pause = 1.0 if now - child.started >= _STEADY_S else min(child.pause * 2, _MAX_PAUSE_S)
        child.due, child.process = now + child.pause, None
        child.restarts += 1
        log.warning("%s exited (status %s); starting it again in %.0f s", child.name, code, child.pause)

    def _stop_all(self) -> None:
        running = [child.process for child in self.children if child.process is not None]
        for process in running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        for process in running:
            try:
                process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _configure_logging(settings: Settings) -> None:
    """The children's log format for the supervisor's own lines (once; a host may have set it up)."""
    if logging.getLogger().handlers:
        return
    config = logging_config(settings.log_level, settings.log_format)
    if config is not None:
        logging.config.dictConfig(config)
    else:
        logging.basicConfig(level=settings.log_level.upper(), format="[%(asctime)s] [%(process)d] [%(levelname)s] "
                                                                     "%(message)s")
