"""What the HTTP surfaces and their settings guarantee, without a server."""

from __future__ import annotations

import pytest

from streams.httpjson import bearer_ok
from streams.settings import Settings, SettingsError
from streams.storage.clickhouse import redact


@pytest.mark.parametrize(("host", "token", "ok"), [
    ("127.0.0.1", None, True), ("localhost", None, True), ("::1", None, True), ("127.0.0.2", None, True),
    ("0.0.0.0", None, False), ("10.1.2.3", None, False), ("worker.internal", None, False),
    ("0.0.0.0", "t0ken", True),
])
def test_a_worker_reachable_from_other_hosts_needs_a_token(host, token, ok):
    env = {"COSTLINE_WEB_HOST": host, **({"COSTLINE_WEB_TOKEN": token} if token else {})}
    if ok:
        assert Settings.from_env(env).web_host == host
    else:
        with pytest.raises(SettingsError, match=f"COSTLINE_WEB_HOST='{host}' is reachable from other hosts: set "
                                                "COSTLINE_WEB_TOKEN"):
            Settings.from_env(env)


@pytest.mark.parametrize(("header", "ok"), [
    ("Bearer t0ken", True), ("bearer t0ken", True), ("BEARER  t0ken ", True),
    ("Bearer t0ken2", False), ("Basic t0ken", False), ("t0ken", False), ("", False), (None, False),
])
def test_the_bearer_scheme_is_read_without_regard_to_case(header, ok):
    assert bearer_ok(header, "t0ken") is ok
    assert bearer_ok(header, None) is True  # no token set: nothing to check (loopback only)


def test_credentials_never_leave_the_process_in_a_url():
    assert redact("https://costline:pa55@ch.example.com:8443/costline") == "https://costline:***@ch.example.com:8443/costline"
    assert redact("chdb:///var/lib/costline/chdb") == "chdb:///var/lib/costline/chdb"
    settings = Settings.from_env({"COSTLINE_WEB_TOKEN": "t0ken"})
    assert settings.web_headers == {"Authorization": "Bearer t0ken"}
    shown = repr(Settings.from_env({"COSTLINE_WEB_TOKEN": "t0ken", "COSTLINE_ENFORCER_TOKEN": "t0ken",
                                    "CLICKHOUSE_URL": "https://costline:pa55@ch.example.com/costline"}))
    assert "t0ken" not in shown and "pa55" not in shown
