"""The enforcer's HTTP server on loopback: bounded threads, a read timeout, the bearer scheme."""

from __future__ import annotations

import json
import socket
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from streams.enforcement.enforcer import BoundedHTTPServer, Enforcer, make_server
from streams.operations.processes import wait_for
from streams.settings import Settings


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(BoundedHTTPServer, "READ_TIMEOUT_S", 0.5)
    monkeypatch.setattr(BoundedHTTPServer, "MAX_CONNECTIONS", 16)
    enforcer = Enforcer(Settings.from_env({}), durable=False)  # not fed from Kafka: ready with nothing counted
    enforcer.ready.set()
    httpd = make_server(enforcer, "127.0.0.1", 0, "t0ken")
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def decision(httpd, authorization: str) -> tuple[int, dict]:
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1/decisions/acme"
    request = urllib.request.Request(url, headers={"Authorization": authorization})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_the_scheme_is_case_insensitive_and_the_token_is_not(server):
    status, answer = decision(server, "bearer t0ken")
    assert (status, answer["decision"], answer["limits"]) == (200, "allow", [])
    assert decision(server, "Bearer T0KEN")[0] == 401


def test_half_sent_requests_are_dropped_after_the_read_timeout_and_do_not_hold_threads(server):
    before = threading.active_count()
    stalled = []
    for _ in range(40):  # more than MAX_CONNECTIONS: the rest wait in the listen queue
        sock = socket.create_connection(server.server_address, timeout=10)
        sock.sendall(b"GET /v1/decisions/acme HTTP/1.1\r\nHost: x\r\n")  # never finished
        stalled.append(sock)
    wait_for(lambda: threading.active_count() <= before + 16, 10, "at most 16 connection threads")
    # Every stalled connection is closed by the server in turn, and the threads are gone.
    wait_for(lambda: all(s.recv(1) == b"" for s in stalled), 30, "the stalled connections to be closed")
    wait_for(lambda: threading.active_count() <= before, 10, "the connection threads to end")
    assert decision(server, "Bearer t0ken")[0] == 200
    for sock in stalled:
        sock.close()


def test_a_burst_of_300_clients_is_answered_in_full(server):
    with ThreadPoolExecutor(max_workers=300) as pool:
        answers = list(pool.map(lambda _: decision(server, "Bearer t0ken")[0], range(300)))
    assert answers == [200] * 300


def post(httpd, path: str, body: bytes, authorization: str = "Bearer t0ken") -> tuple[int, dict]:
    url = f"http://127.0.0.1:{httpd.server_address[1]}{path}"
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Authorization": authorization, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


RESERVE = b'{"tenant_id": "acme", "provider": "openai", "model": "gpt-4o", "input_tokens": 1000, "idempotency_key": "k1"}'


@pytest.mark.parametrize(("body", "status", "error"), [
    (RESERVE, 200, None),
    (b'{"tenant_id": "acme", "provider": "openai", "model": "gpt-4o"}', 400, "idempotency_key: Field required"),
    (RESERVE.replace(b"1000", b"-5"), 400, "input_tokens: Input should be greater than or equal to 0"),
    (RESERVE[:-1] + b', "lease_s": 86400}', 400, "lease_s: Input should be less than or equal to 3600"),
    (RESERVE[:-1] + b', "surprise": 1}', 400, "surprise: Extra inputs are not permitted"),
    (b"not json", 400, "body: Invalid JSON"),
    (b"[" * 20_000, 413, "send a JSON body of at most 16384 bytes"),
])
def test_reservations_take_bounded_valid_bodies_and_say_what_is_wrong_in_one_line(server, body, status, error):
    got, answer = post(server, "/v1/reservations", body)
    assert got == status, answer
    if error is None:
        assert answer["granted"] and answer["reservation_id"] and answer["bounded"]
        again = post(server, "/v1/reservations", body)[1]   # the same idempotency key
        assert again["reservation_id"] == answer["reservation_id"]
        released = post(server, f"/v1/reservations/{answer['reservation_id']}/release", b"")
        assert released == (200, {"released": True})
        assert post(server, f"/v1/reservations/{answer['reservation_id']}/release", b"") == (200, {"released": False})
    else:
        assert answer["error"].startswith(error) and "\n" not in answer["error"]


def test_reservations_need_the_token(server):
    assert post(server, "/v1/reservations", RESERVE, authorization="Bearer nope")[0] == 401
    assert post(server, "/v1/reservations/x/release", b"", authorization="")[0] == 401
