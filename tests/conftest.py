"""Shared fixtures. Integration fixtures live in tests/integration/conftest.py."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from streams.pipeline import Enricher
from streams.pricing import Pricer
from streams.settings import Settings
from streams.tagging import PathRules, Rule
from streams.topics import KafkaUnavailable, check_reachable

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="session")
def pricer() -> Pricer:
    """The bundled catalog, without overrides."""
    return Pricer()


@pytest.fixture(scope="session")
def enricher(pricer: Pricer) -> Enricher:
    return Enricher(pricer, PathRules([Rule.model_validate({"path": "{service}/{feature}",
                                                            "when": {"service": "*", "feature": "*"}})]))


@pytest.fixture(scope="session")
def ch_client(tmp_path_factory):
    """The embedded ClickHouse of this test process (one data path per process), migrated."""
    from streams.clickhouse import connect
    from streams.migrations import migrate

    client = connect(f"chdb://{tmp_path_factory.mktemp('chdb')}")
    migrate(client)
    yield client
    client.close()


@pytest.fixture(scope="session")
def kafka_servers() -> str:
    """The broker of the integration and fault tests; scripts/test starts one on 127.0.0.1:9092."""
    settings = Settings.from_env()
    try:
        check_reachable(settings, timeout_s=10)
    except KafkaUnavailable as exc:
        pytest.fail(f"{exc} (scripts/test starts it for the test run)")
    return settings.kafka_bootstrap_servers
