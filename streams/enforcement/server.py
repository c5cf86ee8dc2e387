"""The enforcer's HTTP server: one asyncio event loop, every connection a coroutine.

    GET  /v1/decisions/{tenant}[?user=&model=&business_path=]   allow / warn / block
    POST /v1/reservations                                       hold budget before a call
    POST /v1/reservations/{id}/release                          free it, the call was not made
    GET  /v1/health                                             no token needed

Why asyncio and not the standard library's thread-per-connection server: at 1,000 reservations
a second a fifth of that server's time went to starting threads, and a reservation waits ~3 ms
for its journal write (``acks=all``), which a coroutine spends waiting on a future instead of
holding a thread. Here a reservation is decided in the loop (the book's lock is held for a few
µs), its journal write is awaited without blocking the others, and many writes share a request
to the broker.

Bounds, each one a failure measured before it was there:

- ``BACKLOG`` connections wait in the kernel's queue (the standard library's 5 made a burst of
  200 clients wait up to 54 s);
- at most ``MAX_CONNECTIONS`` are served at once; past it a connection waits up to
  ``READ_TIMEOUT_S`` for a slot (a burst of short requests is served in full), and is answered
  503 and closed when none frees up, or at once when ``BACKLOG`` are waiting already;
- a request has ``READ_TIMEOUT_S`` from its first byte to its last (200 half-sent requests used
  to hold 200 threads without end), and a kept-alive connection is closed after
  ``IDLE_TIMEOUT_S`` without one;
- a request head is at most ``MAX_HEAD_BYTES`` (431) and a body ``MAX_BODY_BYTES`` (413), with a
  ``Content-Length`` (411 for a chunked body).

With a token configured, all but the health check need ``Authorization: Bearer <token>``. A
request for a tenant another enforcer owns is answered ``307`` with the owner's URL
(``streams.enforcement.layout``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import ValidationError

from streams.enforcement.enforcer import JOURNAL_TIMEOUT_S, Enforcer, JournalFailed
from streams.enforcement.reservations import ReservationRequest
from streams.errors import CostlineError
from streams.httpjson import bearer_ok

log = logging.getLogger(__name__)

#: The largest request body the enforcer reads (a reservation is a few hundred bytes).
MAX_BODY_BYTES = 16_384

Answer = tuple[int, dict[str, Any], dict[str, str]]


class EnforcerServer:
    BACKLOG = 1024
    MAX_CONNECTIONS = 1024
    READ_TIMEOUT_S = 5.0
    IDLE_TIMEOUT_S = 60.0
    MAX_HEAD_BYTES = 16_384

    def __init__(self, enforcer: Enforcer, host: str, port: int, token: str | None) -> None:
        self.enforcer, self.host, self.token = enforcer, host, token
        self.port = port
        self.connections = 0
        #: The most connections served at once, and the connections waiting for a slot.
        self.peak = 0
        self.waiting = 0
        self.turned_away = 0
        self._slots: asyncio.Semaphore | None = None
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
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        self._slots = asyncio.Semaphore(self.MAX_CONNECTIONS)
        server = await asyncio.start_server(self._connection, self.host, self.port, backlog=self.BACKLOG,
                                            limit=self.MAX_HEAD_BYTES)
        self.port = server.sockets[0].getsockname()[1]
        self._bound.set()
        async with server:
            await self._stopping.wait()
        # (``async with`` closed the listener; open connections end with the loop)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        slots = self._slots
        if slots.locked():  # all taken: wait for one, a while, in a bounded queue
            if self.waiting >= self.BACKLOG:
                await self._turn_away(writer)
                return
            self.waiting += 1
            try:
                await asyncio.wait_for(slots.acquire(), self.READ_TIMEOUT_S)
            except TimeoutError:
                await self._turn_away(writer)
                return
            finally:
                self.waiting -= 1
        else:
            await slots.acquire()
        self.connections += 1
        self.peak = max(self.peak, self.connections)
        try:
            idle = self.READ_TIMEOUT_S  # a new connection is opened to send a request at once
            while True:
                try:
                    first = await asyncio.wait_for(reader.readexactly(1), idle)
                    head = first + await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.READ_TIMEOUT_S)
                except asyncio.LimitOverrunError:
                    writer.write(_response(431, {"error": f"request head over {self.MAX_HEAD_BYTES} bytes"}, {}, True))
                    break
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    break  # idle, half-sent, or gone: closed, nothing to answer
                status, body, headers, keep = await self._request(head, reader)
                writer.write(_response(status, body, headers, not keep))
                await writer.drain()
                if not keep:
                    break
                idle = self.IDLE_TIMEOUT_S
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            self.connections -= 1
            slots.release()
            await _close(writer)

    async def _turn_away(self, writer: asyncio.StreamWriter) -> None:
        self.turned_away += 1
        writer.write(_response(503, {"error": "too many connections to the enforcer: retry shortly"}, {}, True))
        await _close(writer)

    async def _request(self, head: bytes, reader: asyncio.StreamReader) -> tuple[int, dict[str, Any],
                                                                                  dict[str, str], bool]:
        """Reads the rest of one request and answers it: (status, body, headers, keep the connection)."""
        try:
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, version = request_line.split(" ")
        except ValueError:
            return 400, {"error": "malformed request line"}, {}, False
        headers = {}
        for line in header_lines:
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        connection = headers.get("connection", "").lower()
        keep = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
        if "transfer-encoding" in headers:
            return 411, {"error": "send the body with a Content-Length, not chunked"}, {}, False
        try:
            length = int(headers.get("content-length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            return (413 if length > MAX_BODY_BYTES else 400,
                    {"error": f"send a JSON body of at most {MAX_BODY_BYTES} bytes, with its Content-Length"}, {}, False)
        # The body is read first, whatever the answer: on a kept-alive connection an unread body
        # would be taken for the next request.
        body = await asyncio.wait_for(reader.readexactly(length), self.READ_TIMEOUT_S) if length else b""
        status, answer, extra = await self._answer(method, target, headers, body)
        return status, answer, extra, keep

    async def _answer(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Answer:
        enforcer = self.enforcer
        path = urlsplit(target).path
        if method == "GET" and path == "/v1/health":
            return (200 if enforcer.ready.is_set() else 503), self.health(), {}
        if method not in ("GET", "POST"):
            return 405, {"error": "use GET or POST"}, {"Allow": "GET, POST"}
        if not bearer_ok(headers.get("authorization"), self.token):
            return 401, {"error": "missing or wrong bearer token"}, {}
        if method == "GET":
            if not path.startswith("/v1/decisions/") or len(path) <= len("/v1/decisions/"):
                return 404, {"error": "use GET /v1/decisions/{tenant} or GET /v1/health"}, {}
            query = {k: v[-1] for k, v in parse_qs(urlsplit(target).query).items()
                     if k in ("user", "model", "business_path")}
            return 200, enforcer.decide(unquote(path[len("/v1/decisions/"):]), **query).to_json(), {}
        if path == "/v1/reservations":
            return await self._reserve(body)
        parts = path.split("/")
        if len(parts) == 5 and parts[:3] == ["", "v1", "reservations"] and parts[4] == "release" and parts[3]:
            reservation_id = unquote(parts[3])
            owner = enforcer.layout.owner_of_reservation(reservation_id)
            if owner is not None and owner != enforcer.layout.peers[enforcer.layout.me]:
                return _elsewhere(owner, path, f"reservation {reservation_id}")
            return 200, {"released": enforcer.reservations.release(reservation_id)}, {}
        return 404, {"error": "use POST /v1/reservations or POST /v1/reservations/{id}/release"}, {}

    async def _reserve(self, body: bytes) -> Answer:
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
            answer, durable = self.enforcer.admit(request)
            if durable is not None:  # journaled before it is answered: a restarted enforcer holds it again
                await asyncio.wait_for(asyncio.wrap_future(durable), JOURNAL_TIMEOUT_S)  # (on timeout: cancelled, released)
        except TimeoutError:
            return 503, {"error": str(JournalFailed.timed_out(self.enforcer.journal_topic))}, {}
        except CostlineError as exc:  # starting, or the journal did not take it: retry
            return 503, {"error": str(exc)}, {}
        return 200, answer, {}

    def health(self) -> dict[str, Any]:
        enforcer = self.enforcer
        return {"status": "ok" if enforcer.ready.is_set() else "starting", "states_applied": enforcer.book.applied,
                "reservations": {"live": len(enforcer.reservations.holds), **vars(enforcer.reservations.counters)},
                "connections": {"open": self.connections, "turned_away": self.turned_away},
                "layout": {"peers": len(enforcer.layout.peers), "me": enforcer.layout.me},
                "errors": enforcer.errors}


def _elsewhere(owner: str, path: str, what: str) -> Answer:
    return 307, {"error": f"{what} is served by the enforcer at {owner}", "owner": owner}, {"Location": owner + path}


def _response(status: int, body: dict[str, Any], headers: dict[str, str], close: bool) -> bytes:
    data = json.dumps(body).encode()
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "Content-Type: application/json",
             f"Content-Length: {len(data)}", *(f"{k}: {v}" for k, v in headers.items())]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


async def _close(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 1.0)
    except (ConnectionError, TimeoutError, OSError):
        pass
