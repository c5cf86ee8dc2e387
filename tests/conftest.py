"""Shared fixtures. Integration fixtures live in tests/integration/conftest.py."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from streams.messaging.topics import KafkaUnavailable, check_reachable
from streams.settings import Settings
from streams.stages.attribution import Attribution
from streams.stages.pricing import Pricer
from streams.stages.tagging import PathRules, Rule

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="session")
def pricer() -> Pricer:
    """The bundled catalog, without overrides."""
    return Pricer()


@pytest.fixture(scope="session")
def attribution(pricer: Pricer) -> Attribution:
    return Attribution(pricer, PathRules([Rule.model_validate({"path": "{service}/{feature}",
                                                            "when": {"service": "*", "feature": "*"}})]))


@pytest.fixture(scope="session")
def ch_client(tmp_path_factory):
    """The embedded ClickHouse of this test process (one data path per process), migrated."""
    from streams.storage.clickhouse import connect
    from streams.storage.migrations import migrate

    client = connect(f"chdb://{tmp_path_factory.mktemp('chdb')}")
    migrate(client)
    yield client
    client.close()


@pytest.fixture(scope="session")
def ch_sink(ch_client):
    """The sink on that engine: the session's client writes, a read-only client of the same path reads."""
    from streams.storage.query import connect_readonly
    from streams.storage.sink import ClickHouseSink

    sink = ClickHouseSink(ch_client, connect_readonly(f"chdb://{ch_client.path}"))
    yield sink
    sink.close()


@pytest.fixture(scope="session")
def kafka_servers() -> str:
    """The broker of the integration and fault tests; scripts/test starts one on 127.0.0.1:9092."""
    settings = Settings.from_env()
    try:
        check_reachable(settings, timeout_s=10)
    except KafkaUnavailable as exc:
        pytest.fail(f"{exc} (scripts/test starts it for the test run)")
    return settings.kafka_bootstrap_servers
