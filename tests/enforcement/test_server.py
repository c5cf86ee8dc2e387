"""The enforcer's HTTP server on loopback: bounded connections, read timeouts, bounded requests,
the bearer scheme, and two enforcers sharing the tenants."""

from __future__ import annotations

import json
import socket
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from streams.enforcement.client import EnforcerClient
from streams.enforcement.enforcer import Enforcer
from streams.enforcement.server import EnforcerServer
from streams.operations.processes import wait_for
from streams.settings import Settings


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(EnforcerServer, "READ_TIMEOUT_S", 0.5)
    monkeypatch.setattr(EnforcerServer, "MAX_CONNECTIONS", 16)
    enforcer = Enforcer(Settings.from_env({}), durable=False)  # not fed from Kafka: ready with nothing counted
    enforcer.ready.set()
    httpd = EnforcerServer(enforcer, "127.0.0.1", 0, "t0ken").start()
    yield httpd
    httpd.stop()


def decision(httpd, authorization: str) -> tuple[int, dict]:
    url = f"{httpd.url}/v1/decisions/acme"
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


def until_closed(sock: socket.socket) -> bytes:
    """What a socket receives until the server closes it (b"reset" for a reset)."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        return b"reset"
    return received


def test_half_sent_requests_are_closed_after_the_read_timeout_and_never_take_more_than_16_slots(server):
    stalled = []
    for _ in range(40):  # more than MAX_CONNECTIONS (16)
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(b"GET /v1/decisions/acme HTTP/1.1\r\nHost: x\r\n")  # never finished
        stalled.append(sock)
    answers = [until_closed(sock) for sock in stalled]
    # Each one closed unanswered after its read timeout, or, having waited that long for a slot,
    # turned away: a 503, or a reset when the close came before the client's bytes were read.
    turned_away = [a for a in answers if a.startswith(b"HTTP/1.1 503 ") or a == b"reset"]
    assert len(turned_away) == server.turned_away and [a for a in answers if a not in turned_away] == \
        [b""] * (40 - server.turned_away)
    assert server.peak == 16
    wait_for(lambda: server.connections == 0, 10, "every connection to be closed")
    assert decision(server, "Bearer t0ken")[0] == 200
    for sock in stalled:
        sock.close()


def test_one_kept_alive_connection_serves_request_after_request():
    enforcer = Enforcer(Settings.from_env({}), durable=False)
    enforcer.ready.set()
    httpd = EnforcerServer(enforcer, "127.0.0.1", 0, None).start()
    try:
        with socket.create_connection(("127.0.0.1", httpd.port), timeout=10) as sock:
            body = b'{"tenant_id": "acme", "provider": "openai", "model": "gpt-4o", "idempotency_key": "k"}'
            post = (b"POST /v1/reservations HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(body), body))
            sock.sendall(b"GET /v1/decisions/acme HTTP/1.1\r\nHost: x\r\n\r\n" + post + post)  # pipelined
            replies = b""
            while replies.count(b"HTTP/1.1 200 OK") < 3:
                replies += sock.recv(65536)
        assert httpd.connections == 1 or wait_for(lambda: httpd.connections == 0, 10, "the connection to close")
        assert len(enforcer.reservations.holds) == 1   # the second POST was the same reservation
    finally:
        httpd.stop()


@pytest.mark.parametrize(("raw", "status"), [
    (b"GET /v1/decisions/acme HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", 431),
    (b"POST /v1/reservations HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 411),
    (b"DELETE /v1/reservations/x HTTP/1.1\r\nAuthorization: Bearer t0ken\r\nConnection: close\r\n\r\n", 405),
    (b"POST /v1/reservations HTTP/1.1\r\nContent-Length: nope\r\n\r\n", 400),
    (b"garbage\r\n\r\n", 400),
])
def test_malformed_or_oversized_requests_get_a_4xx_in_one_line(server, raw, status):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(raw)
        reply = until_closed(sock)
    assert reply.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"\r\n\r\n{\"error\": " in reply


def test_a_burst_of_300_clients_is_answered_in_full(server):
    with ThreadPoolExecutor(max_workers=300) as pool:
        answers = list(pool.map(lambda _: decision(server, "Bearer t0ken")[0], range(300)))
    assert answers == [200] * 300


def post(httpd, path: str, body: bytes, authorization: str = "Bearer t0ken") -> tuple[int, dict]:
    url = f"{httpd.url}{path}"
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


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.fixture
def two_enforcers(tmp_path):
    (tmp_path / "plans.yaml").write_text("default_plan: p\nplans:\n  p:\n    limits:\n      - {id: daily-spend, "
                                         "metric: cost_usd, window: day, limit: 1.00, thresholds: [100], hard_cap: 100}\n")
    ports = free_ports(2)
    peers = ",".join(f"http://127.0.0.1:{port}" for port in ports)
    servers = []
    for port in ports:
        settings = Settings.from_env({"COSTLINE_ENFORCER_PEERS": peers, "COSTLINE_ENFORCER_URL": f"http://127.0.0.1:{port}",
                                      "COSTLINE_CONFIG_DIR": str(tmp_path)})
        enforcer = Enforcer(settings, durable=False)
        enforcer.ready.set()
        servers.append(EnforcerServer(enforcer, "127.0.0.1", port, None).start())
    yield servers
    for server in servers:
        server.stop()


def test_two_enforcers_share_the_tenants_and_a_client_reaches_each_owner(two_enforcers):
    first, second = two_enforcers
    layout = first.enforcer.layout
    client = EnforcerClient(first.url, timeout_s=10)   # knows only the first enforcer
    tenants = [f"tenant-{i}" for i in range(40)]
    answers = {t: client.reserve(t, "openai", "gpt-4o", f"k-{t}", input_tokens=1000, max_tokens=10) for t in tenants}
    owners = {t: two_enforcers[layout.partition(t) % 2] for t in tenants}
    assert {owner.port for owner in owners.values()} == {first.port, second.port}   # both own some
    for tenant, answer in answers.items():
        assert answer["granted"] and answer["reservation_id"] in owners[tenant].enforcer.reservations.holds
    assert len(first.enforcer.reservations.holds) + len(second.enforcer.reservations.holds) == 40
    # A release sent to either enforcer reaches the owner (the id names the tenant's partition).
    via_second = EnforcerClient(second.url, timeout_s=10)
    assert all(via_second.release(answer["reservation_id"]) for answer in answers.values())
    assert first.enforcer.reservations.holds == {} and second.enforcer.reservations.holds == {}


def test_one_tenants_cap_holds_whichever_enforcer_its_clients_ask(two_enforcers):
    """50 threads, half of them configured with each enforcer, reserve $0.10001 calls of one tenant
    against a $1.00 hard cap: exactly 9 are granted, all by the owner."""
    clients = [EnforcerClient(server.url, timeout_s=10) for server in two_enforcers]

    def attempt(i: int) -> bool:
        return clients[i % 2].reserve("acme", "openai", "gpt-4o", f"call-{i}", input_tokens=40_000,
                                      max_tokens=1)["granted"]

    with ThreadPoolExecutor(max_workers=50) as pool:
        granted = sum(pool.map(attempt, range(200)))
    owner = two_enforcers[two_enforcers[0].enforcer.layout.partition("acme") % 2]
    assert granted == 9 and len(owner.enforcer.reservations.holds) == 9
    assert owner.enforcer.reservations.counters.refused == 191


def test_a_layout_that_does_not_name_this_enforcer_is_one_line(tmp_path):
    from streams.enforcement.layout import EnforcerLayout
    from streams.settings import SettingsError

    settings = Settings.from_env({"COSTLINE_ENFORCER_PEERS": "http://10.0.0.1:6067,http://10.0.0.2:6067"})
    with pytest.raises(SettingsError, match=r"^COSTLINE_ENFORCER_URL='http://127.0.0.1:6067' is not one of "):
        EnforcerLayout.from_settings(settings)


@pytest.mark.parametrize(("target", "status"), [("//[", 400), ("/v1/reservations/%C2%B2-x/release", 200)])
def test_odd_targets_get_an_answer_not_a_dropped_connection(server, target, status):
    method = "GET" if target == "//[" else "POST"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"{method} {target} HTTP/1.1\r\nAuthorization: Bearer t0ken\r\nContent-Length: 0\r\n"
                     "Connection: close\r\n\r\n".encode())
        reply = until_closed(sock)
    assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply[:200]


def test_a_client_that_never_reads_its_answers_loses_its_connection_not_the_servers_slot(monkeypatch):
    monkeypatch.setattr(EnforcerServer, "IDLE_TIMEOUT_S", 1.0)
    monkeypatch.setattr(EnforcerServer, "READ_TIMEOUT_S", 1.0)
    enforcer = Enforcer(Settings.from_env({}), durable=False)
    enforcer.ready.set()
    httpd = EnforcerServer(enforcer, "127.0.0.1", 0, None).start()
    try:
        sock = socket.create_connection(("127.0.0.1", httpd.port), timeout=10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        request = b"GET /v1/decisions/acme HTTP/1.1\r\nHost: x\r\n\r\n" * 2000   # pipelined, never read
        sock.setblocking(False)
        try:
            sock.sendall(request)
        except BlockingIOError:
            pass  # (the server stopped reading: that is the point)
        wait_for(lambda: httpd.connections == 1, 10, "the connection to be served")
        wait_for(lambda: httpd.connections == 0, 15, "the connection that does not read to be dropped")
        sock.close()
    finally:
        httpd.stop()


def test_idle_kept_alive_connections_give_their_slots_to_new_clients(monkeypatch):
    """Two slots, both held by clients idle between requests: a third client is served at once,
    and the oldest idle connection is the one closed."""
    monkeypatch.setattr(EnforcerServer, "MAX_CONNECTIONS", 2)
    enforcer = Enforcer(Settings.from_env({}), durable=False)
    enforcer.ready.set()
    httpd = EnforcerServer(enforcer, "127.0.0.1", 0, None).start()
    ask = b"GET /v1/decisions/acme HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        kept = []
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", httpd.port), timeout=10)
            sock.sendall(ask)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
            kept.append(sock)
        wait_for(lambda: len(httpd.idle) == 2, 5, "both connections idle")
        with socket.create_connection(("127.0.0.1", httpd.port), timeout=10) as third:
            third.sendall(ask)
            assert third.recv(65536).startswith(b"HTTP/1.1 200 ")   # served, not 503 after 5 s
        assert until_closed(kept[0]) == b"" and httpd.evicted == 1   # the oldest gave its slot up
        kept[1].sendall(ask)
        assert kept[1].recv(65536).startswith(b"HTTP/1.1 200 ")      # the other still served
        for sock in kept:
            sock.close()
    finally:
        httpd.stop()
