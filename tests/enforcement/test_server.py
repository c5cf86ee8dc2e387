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
    httpd = make_server(Enforcer(Settings.from_env({})), "127.0.0.1", 0, "t0ken")
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
