"""The enforcer's HTTP server: one asyncio event loop, every connection a protocol object.

    GET  /v1/decisions/{tenant}[?user=&model=&business_path=]   allow / warn / block
    POST /v1/reservations                                       hold budget before a call
    POST /v1/reservations/{id}/release                          free it, the call was not made
    GET  /v1/health                                             no token needed

Why an event loop, and why protocols rather than streams: at 1,000 reservations a second the
standard library's thread-per-connection server spent a fifth of its time starting threads, and
a coroutine per connection (``asyncio.start_server``) still spent most of its CPU on tasks,
timeouts and stream buffers, on a machine whose two cores it shares with the broker. Here a
request is parsed and answered in the callback that received its bytes (uvloop's loop measured
no faster here). Nothing in a request waits on the network: a grant is made durable by a local
file write before it is answered, and sent to Kafka after (``streams.enforcement.journal``).

Bounds, each one a failure measured before it was there:

- ``BACKLOG`` connections wait in the kernel's queue (the standard library's 5 made a burst of
  200 clients wait up to 54 s);
- at most ``MAX_CONNECTIONS`` are served at once; past it a connection waits, unread, up to
  ``READ_TIMEOUT_S`` for a slot (a burst of short requests is served in full), and is answered
  503 and closed when none frees up, or at once when ``BACKLOG`` are waiting already; a kept-alive
  connection idle between requests gives its slot up to one waiting (its client opens a new one);
- a request has ``READ_TIMEOUT_S`` from its first byte to its last (200 half-sent requests used
  to hold 200 threads without end), and a kept-alive connection is closed after
  ``IDLE_TIMEOUT_S`` without one;
- a request head is at most ``MAX_HEAD_BYTES`` (431) and a body ``MAX_BODY_BYTES`` (413), with a
  ``Content-Length`` (411 for a chunked body); a client that does not read its answers stops
  being read (pipelined requests cannot pile answers up in memory).

With a token configured, all but the health check need ``Authorization: Bearer <token>``. A
request for a tenant another enforcer owns is answered ``307`` with the owner's URL
(``streams.enforcement.layout``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import ValidationError

from streams.enforcement.enforcer import Enforcer
from streams.enforcement.reservations import ReservationRequest
from streams.errors import CostlineError
from streams.httpjson import bearer_ok

log = logging.getLogger(__name__)

#: The largest request body the enforcer reads (a reservation is a few hundred bytes).
MAX_BODY_BYTES = 16_384

#: (status, JSON body, extra headers).
Answer = tuple[int, dict[str, Any], dict[str, str]]


class EnforcerServer:
    BACKLOG = 1024
    MAX_CONNECTIONS = 1024
    READ_TIMEOUT_S = 5.0
    IDLE_TIMEOUT_S = 60.0
    MAX_HEAD_BYTES = 16_384

    def __init__(self, enforcer: Enforcer, host: str, port: int, token: str | None) -> None:
        self.enforcer, self.host, self.port, self.token = enforcer, host, port, token
        self.connections = 0
        #: The most connections served at once.
        self.peak = 0
        self.turned_away = 0
        #: Connections waiting for a slot, oldest first; served connections with no request under
        #: way (kept alive between requests), oldest first: these give their slots up to those.
        self.waiting: deque[_Connection] = deque()
        self.idle: dict[_Connection, None] = {}
        self.evicted = 0
        self._open: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._bound = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def serve_forever(self) -> None:
        """Serves in this thread until ``stop()`` (from another thread or a signal handler)."""
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._failure = exc
            self._bound.set()
            raise

    def start(self) -> EnforcerServer:
        """Serves on a thread of its own; returns once the port is bound (``port`` 0: now the real one)."""
        self._thread = threading.Thread(target=self._serve_quietly, name="enforcer-http", daemon=True)
        self._thread.start()
        self._bound.wait(10)
        if self._failure is not None:
            raise self._failure
        return self

    def _serve_quietly(self) -> None:
        try:
            self.serve_forever()
        except BaseException:  # noqa: BLE001 - re-raised by start() in the caller's thread
            pass

    def stop(self) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:  # (the loop closed meanwhile)
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)

    async def _serve(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = await loop.create_server(lambda: _Connection(self), self.host, self.port, backlog=self.BACKLOG)
        self.port = server.sockets[0].getsockname()[1]
        self._bound.set()
        try:
            async with server:
                await self._stopping.wait()
        finally:
            for connection in list(self._open) + list(self.waiting):
                connection.transport.abort()

    # -- connections' slots ---------------------------------------------------------------

    def _admit(self, connection: _Connection) -> bool:
        """A slot for a new connection: True when it is served now."""
        if self.connections < self.MAX_CONNECTIONS:
            self._take(connection)
            return True
        if len(self.waiting) >= self.BACKLOG:
            connection.turn_away()
            return False
        self.waiting.append(connection)
        connection.wait_for_slot(self.READ_TIMEOUT_S)
        if self.idle:  # a kept-alive connection with nothing to send gives its slot up first
            oldest = next(iter(self.idle))
            del self.idle[oldest]
            self.evicted += 1
            oldest._expire()  # (its connection_lost hands the slot to the one waiting)
        return False

    def _take(self, connection: _Connection) -> None:
        self.connections += 1
        self.peak = max(self.peak, self.connections)
        self._open.add(connection)

    def _release(self, connection: _Connection) -> None:
        self._open.discard(connection)
        self.idle.pop(connection, None)
        self.connections -= 1
        while self.waiting:
            waiting = self.waiting.popleft()
            if not waiting.closed:
                self._take(waiting)
                waiting.serve()
                return

    # -- answers ----------------------------------------------------------------------------

    def answer(self, head: Head, body: bytes) -> Answer:
        enforcer = self.enforcer
        try:
            url = urlsplit(head.target)
        except ValueError:
            return 400, {"error": "malformed request target"}, {}
        path = url.path
        if head.method == "GET" and path == "/v1/health":
            return (200 if enforcer.ready.is_set() else 503), self.health(), {}
        if head.method not in ("GET", "POST"):
            return 405, {"error": "use GET or POST"}, {"Allow": "GET, POST"}
        if not bearer_ok(head.headers.get("authorization"), self.token):
            return 401, {"error": "missing or wrong bearer token"}, {}
        if head.method == "GET":
            if not path.startswith("/v1/decisions/") or len(path) <= len("/v1/decisions/"):
                return 404, {"error": "use GET /v1/decisions/{tenant} or GET /v1/health"}, {}
            query = {k: v[-1] for k, v in parse_qs(url.query).items()
                     if k in ("user", "model", "business_path")}
            return 200, enforcer.decide(unquote(path[len("/v1/decisions/"):]), **query).to_json(), {}
        if path == "/v1/reservations":
            return self._reserve(body)
        parts = path.split("/")
        if len(parts) == 5 and parts[:3] == ["", "v1", "reservations"] and parts[4] == "release" and parts[3]:
            reservation_id = unquote(parts[3])
            owner = enforcer.layout.owner_of_reservation(reservation_id)
            if owner is not None and owner != enforcer.layout.peers[enforcer.layout.me]:
                return _elsewhere(owner, path, f"reservation {reservation_id}")
            return 200, {"released": enforcer.reservations.release(reservation_id)}, {}
        return 404, {"error": "use POST /v1/reservations or POST /v1/reservations/{id}/release"}, {}

    def _reserve(self, body: bytes) -> Answer:
        try:
            request = ReservationRequest.model_validate_json(body)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(map(str, error["loc"])) or "body"
            return 400, {"error": f"{where}: {error['msg']}"}, {}
        layout = self.enforcer.layout
        if not layout.owns(request.tenant_id):
            return _elsewhere(layout.owner_of(request.tenant_id), "/v1/reservations", f"tenant {request.tenant_id}")
        try:
            return 200, self.enforcer.reserve(request), {}
        except CostlineError as exc:  # starting: retry
            return 503, {"error": str(exc)}, {}
        except OSError as exc:  # the journal file could not be written: not granted (the hold was released)
            log.error("a reservation could not be journaled: %s", exc)
            return 503, {"error": f"the reservation could not be journaled ({exc.strerror}): retry it"}, {}

    def health(self) -> dict[str, Any]:
        enforcer = self.enforcer
        return {"status": "ok" if enforcer.ready.is_set() else "starting", "states_applied": enforcer.book.applied,
                "reservations": {"live": len(enforcer.reservations.holds), **vars(enforcer.reservations.counters)},
                "connections": {"open": self.connections, "idle": len(self.idle), "waiting": len(self.waiting),
                                "idle_closed_for_others": self.evicted, "turned_away": self.turned_away},
                "layout": {"peers": len(enforcer.layout.peers), "me": enforcer.layout.me},
                "journal": ({"lag": enforcer.journal.kafka.lag, "failed": enforcer.journal.kafka.failed}
                            if enforcer.journal is not None else None),
                "errors": enforcer.errors}


class _Connection(asyncio.Protocol):
    """One client connection: requests parsed from its bytes as they come, answered in order."""

    def __init__(self, server: EnforcerServer) -> None:
        self.server = server
        self.loop = server._loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment] - set by connection_made
        self.buffer = bytearray()
        self.head: Head | None = None
        self.serving = False
        self.closed = False
        #: The client is not reading its answers: no more requests are read or answered until it does.
        self.writing_paused = False
        self.timer: asyncio.TimerHandle | None = None

    # -- asyncio's callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.server._admit(self):
            self.serve()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._disarm()
        if self.serving:
            self.server._release(self)
        elif self in self.server.waiting:  # (gone while waiting for a slot: no longer counts as waiting)
            self.server.waiting.remove(self)

    def data_received(self, data: bytes) -> None:
        if not self.serving:  # (waiting for a slot: kept for when it has one)
            self.buffer += data
            return
        if not self.buffer and self.head is None:
            self.server.idle.pop(self, None)
            self._arm(self.server.READ_TIMEOUT_S)  # a request's first byte: it has this long to arrive whole
        self.buffer += data
        self._process()

    def pause_writing(self) -> None:  # the client is not reading its answers: stop reading its requests
        self.writing_paused = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.transport.resume_reading()
        self._process()

    # -- slots ----------------------------------------------------------------------------------

    def serve(self) -> None:
        self.serving = True
        self.transport.resume_reading()
        self._arm(self.server.READ_TIMEOUT_S)  # a new connection is opened to send a request at once
        if self.buffer:
            self._process()

    def wait_for_slot(self, timeout_s: float) -> None:
        self.transport.pause_reading()
        self._arm(timeout_s, self.turn_away)

    def turn_away(self) -> None:
        if self in self.server.waiting:
            self.server.waiting.remove(self)
        self.server.turned_away += 1
        self._send((503, {"error": "too many connections to the enforcer: retry shortly"}, {}), close=True)

    # -- requests -------------------------------------------------------------------------------

    def _process(self) -> None:
        server = self.server
        while not self.closed and self.serving and not self.writing_paused:
            if self.head is None:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0 or end + 4 > server.MAX_HEAD_BYTES:
                    if end >= 0 or len(self.buffer) > server.MAX_HEAD_BYTES:
                        self._send((431, {"error": f"request head over {server.MAX_HEAD_BYTES} bytes"}, {}),
                                   close=True)
                    return
                parsed = _parse(bytes(self.buffer[:end + 4]))
                del self.buffer[:end + 4]
                if not isinstance(parsed, Head):  # malformed: answered, and the connection closed
                    self._send(parsed, close=True)
                    return
                self.head = parsed
            head = self.head
            if len(self.buffer) < head.length:
                return  # (the body is read whatever the answer: unread, it would be taken for the next request)
            body = bytes(self.buffer[:head.length])
            del self.buffer[:head.length]
            self.head = None
            self._disarm()
            try:
                answer = server.answer(head, body)
            except Exception as exc:  # noqa: BLE001 - one request's failure is its own 500, never the loop's
                log.exception("a request failed: %s %s", head.method, head.target[:200])
                answer = 500, {"error": f"the enforcer failed on this request ({type(exc).__name__}); see its log"}, {}
            self._send(answer, close=not head.keep)

    def _send(self, answer: Answer, *, close: bool) -> None:
        if self.closed:
            return
        self.transport.write(_response(*answer, close=close))
        if close:
            self.closed = True
            self.transport.close()
            # A client that never reads would keep a closing connection (and its slot) for ever.
            self._arm(self.server.READ_TIMEOUT_S, self.transport.abort)
        elif self.buffer:
            self._arm(self.server.READ_TIMEOUT_S)
        else:
            self.server.idle[self] = None
            self._arm(self.server.IDLE_TIMEOUT_S)

    # -- timers ---------------------------------------------------------------------------------

    def _arm(self, timeout_s: float, then: Callable[[], None] | None = None) -> None:
        self._disarm()
        self.timer = self.loop.call_later(timeout_s, then or self._expire)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expire(self) -> None:
        """Idle, a request not sent whole in time, or answers not read: dropped, nothing to answer
        (``abort``: ``close`` would wait for a client that does not read to take the answers)."""
        self.closed = True
        self.transport.abort()


class Head(NamedTuple):
    method: str
    target: str
    #: Lower-cased names.
    headers: dict[str, str]
    #: Whether the connection stays open after the answer (HTTP/1.1 unless ``Connection: close``).
    keep: bool
    length: int


def _parse(head: bytes) -> Head | Answer:
    """A request's head, or the 4xx answer to a malformed one."""
    try:
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, version = request_line.split(" ")
    except ValueError:
        return 400, {"error": "malformed request line"}, {}
    headers = {}
    for line in header_lines:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    if "transfer-encoding" in headers:
        return 411, {"error": "send the body with a Content-Length, not chunked"}, {}
    given = headers.get("content-length") or "0"
    length = int(given) if given.isascii() and given.isdigit() else -1  # (int() would take "+5" and "1_0")
    if length < 0 or length > MAX_BODY_BYTES:
        return (413 if length > MAX_BODY_BYTES else 400,
                {"error": f"send a JSON body of at most {MAX_BODY_BYTES} bytes, with its Content-Length"}, {})
    connection = headers.get("connection", "").lower()
    keep = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
    return Head(method, target, headers, keep, length)


def _elsewhere(owner: str, path: str, what: str) -> Answer:
    return 307, {"error": f"{what} is served by the enforcer at {owner}", "owner": owner}, {"Location": owner + path}


def _response(status: int, body: dict[str, Any], headers: dict[str, str], *, close: bool) -> bytes:
    data = json.dumps(body).encode()
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "Content-Type: application/json",
             f"Content-Length: {len(data)}", *(f"{k}: {v}" for k, v in headers.items())]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data
