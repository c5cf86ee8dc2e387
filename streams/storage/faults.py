"""Deliberate ClickHouse write failures, for proving the delivery guarantees.

Off unless ``COSTLINE_FAULT_INJECTION=1``. Then ``POST /v1/faults/clickhouse`` with
``{"fail_for_s": 30}`` makes every insert of the worker fail for that long, at the client
boundary, the way an unreachable server or a timed-out write fails — with the embedded engine
too, which cannot otherwise be taken down while the worker holds it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from clickhouse_connect.driver.client import Client

from streams.storage.tables import Encoded


class InjectedOutage(ConnectionError):
    """The failure an injected outage raises in place of an insert."""


class ClickHouseFaults:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fail_until = 0.0

    def fail_for(self, seconds: float) -> None:
        with self._lock:
            self._fail_until = time.monotonic() + seconds

    @property
    def active(self) -> bool:
        return time.monotonic() < self._fail_until

    def wrap(self, send: Callable[[Client, Encoded], None]) -> Callable[[Client, Encoded], None]:
        """``send`` (the sink's one attempt at an insert), failing while an outage is on."""
        def send_unless_failing(client: Client, batch: Encoded) -> None:
            if self.active:
                raise InjectedOutage("injected ClickHouse outage (COSTLINE_FAULT_INJECTION)")
            send(client, batch)

        return send_unless_failing
