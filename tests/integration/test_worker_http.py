"""The worker's HTTP endpoint under bad requests: a token, one read-only statement, limits, 4xx."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from streams.messaging.topics import ensure_topics
from streams.operations.processes import ROOT, WorkerProcess, isolated_env, remove_isolated_topics


def post(worker: WorkerProcess, path: str, body: bytes, token: str | None = "s3cret") -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"bEaReR {token}"} if token else {})}
    request = urllib.request.Request(f"{worker.settings.web_url}{path}", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


@pytest.fixture(scope="module")
def guarded(kafka_servers: str, tmp_path_factory) -> WorkerProcess:
    """One worker for the module's requests, with a token and small limits."""
    tmp = tmp_path_factory.mktemp("guarded")
    env = isolated_env(tmp / "home", kafka_servers, ROOT / "config", COSTLINE_WEB_TOKEN="s3cret",
                       COSTLINE_QUERY_MAX_ROWS="10", COSTLINE_QUERY_TIMEOUT_S="2")
    worker = WorkerProcess(env, tmp / "worker.log")
    ensure_topics(worker.settings)
    yield worker.start()
    worker.stop()
    remove_isolated_topics(worker.settings)


@pytest.mark.parametrize(("body", "status", "error"), [
    (b'{"sql": "SELECT 1 + 1"}', 200, None),
    (b'{"sql": "SELECT 10; SELECT 20"}', 400, "send exactly one statement (2 were sent)"),
    (b'{"sql": "KILL QUERY WHERE 1 SYNC"}', 400, "KILL is not a query"),
    (b'{"sql": "SELECT 1 INTO OUTFILE \'/tmp/costline-outfile\'"}', 400, "INTO OUTFILE is not allowed"),
    (b'{"sql": "SELECT number FROM numbers(11)"}', 400, "(TOO_MANY_ROWS_OR_BYTES); add a LIMIT, or raise COSTLINE_QUERY_MAX_ROWS"),
    (b'{"sql": "SELECT sleep(3)"}', 400, "(TIMEOUT_EXCEEDED); narrow the query, or raise COSTLINE_QUERY_TIMEOUT_S"),
    (b'{"sql": "SELECT 1 SETTINGS max_result_rows = 100"}', 400, "readonly mode"),
    (b'{"sql": 42}', 400, 'send a JSON object {"sql": "SELECT ..."}'),
    (b'{"sql": null}', 400, 'send a JSON object {"sql": "SELECT ..."}'),
    (b'{"sql": ["SELECT 1"]}', 400, 'send a JSON object {"sql": "SELECT ..."}'),
    (b'["SELECT 1"]', 400, 'send a JSON object {"sql": "SELECT ..."}'),
    (b"[" * 100_000 + b"]" * 100_000, 400, 'send a JSON object {"sql": "SELECT ..."}'),
    (b"not json", 400, 'send a JSON object {"sql": "SELECT ..."}'),
])
def test_queries_run_one_read_only_statement_within_limits_and_bad_bodies_get_400(guarded, body, status, error):
    got_status, answer = post(guarded, "/v1/query", body)
    assert got_status == status, answer
    if error is None:
        assert answer["rows"] == [[2]]
    else:
        assert error in answer["error"] and "\n" not in answer["error"] and "Traceback" not in answer["error"]


def test_every_endpoint_needs_the_token_when_one_is_set(guarded):
    assert post(guarded, "/v1/query", b'{"sql": "SELECT 1"}', token=None)[0] == 401
    assert post(guarded, "/v1/query", b'{"sql": "SELECT 1"}', token="wrong")[0] == 401
    assert post(guarded, "/v1/reprice", b'{"since": "2026-01-01T00:00:00Z"}', token=None)[0] == 401
    assert post(guarded, "/v1/invoices", b'{"tenant": "acme", "period": "2026-11"}', token=None)[0] == 401
    for path in ("/v1/health", "/metrics"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{guarded.settings.web_url}{path}", timeout=10)
        assert refused.value.code == 401
    assert guarded.health()["status"] == "ok"  # with the token (the harness sends it)
    status, answer = post(guarded, "/v1/reprice", b'{"since": "yesterday"}')
    assert status == 400 and answer["error"].startswith("since: ")


@pytest.mark.parametrize(("body", "status", "error"), [
    (b'{"tenant": "acme", "period": "2026-11"}', 200, None),
    (b'{"tenant": "acme", "period": "November"}', 400, "period 'November' is not a month: use YYYY-MM"),
    (b'{"tenant": "acme"}', 400, 'send a JSON object {"tenant": "acme", "period": "2026-11"}'),
    (b'{"tenant": 7, "period": "2026-11"}', 400, 'send a JSON object {"tenant": "acme", "period": "2026-11"}'),
    (b'["acme", "2026-11"]', 400, 'send a JSON object {"tenant": "acme", "period": "2026-11"}'),
    (b"not json", 400, 'send a JSON object {"tenant": "acme", "period": "2026-11"}'),
])
def test_an_invoice_is_recorded_through_the_worker_and_bad_bodies_get_400(guarded, body, status, error):
    got_status, answer = post(guarded, "/v1/invoices", body)
    assert got_status == status, answer
    if error is None:
        # No usage yet: the starter plan's flat fee alone, recorded as the month's latest issue.
        assert (answer["total"], [line["id"] for line in answer["lines"]]) == ("19.00", ["flat_fee"])
        _, latest = post(guarded, "/v1/query", b'{"sql": "SELECT invoice_id, toString(total) FROM latest_invoices"}')
        assert latest["rows"] == [[answer["invoice_id"], "19"]]
    else:
        assert answer["error"] == error or error in answer["error"]
