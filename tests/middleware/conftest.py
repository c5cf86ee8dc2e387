"""A real enforcer (in-process, its HTTP server on loopback), a real Kafka topic and a Meter on
them, for the middleware's tests against local servers that speak each provider's wire format."""

from __future__ import annotations

import uuid

import pytest

from schemas.usage import UsageEvent
from streams.enforcement.client import EnforcerClient
from streams.enforcement.enforcer import Enforcer
from streams.enforcement.server import EnforcerServer
from streams.messaging.producer import UsageProducer
from streams.messaging.topics import admin, ensure_topics
from streams.middleware.meter import Meter
from streams.settings import Settings
from tests.integration.conftest import read_topic

PLANS = """
default_plan: p
plans:
  p:
    limits:
      - {id: daily-spend, metric: cost_usd, window: day, limit: 1.00, thresholds: [100], hard_cap: 100}
"""


@pytest.fixture
def metering(kafka_servers, tmp_path):
    config = tmp_path / "config"
    config.mkdir()
    (config / "plans.yaml").write_text(PLANS)
    settings = Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": kafka_servers, "COSTLINE_CONFIG_DIR": str(config),
                                  "COSTLINE_TOPIC_PREFIX": f"mw-{uuid.uuid4().hex[:8]}."})
    ensure_topics(settings)
    enforcer = Enforcer(settings, durable=False)  # not fed from Kafka here: nothing counted, only holds
    enforcer.ready.set()
    httpd = EnforcerServer(enforcer, "127.0.0.1", 0, None).start()
    producer = UsageProducer(kafka_servers, settings.topics.raw)
    meter = Meter(EnforcerClient(httpd.url, timeout_s=10), producer,
                  service="chat-api")
    yield {"meter": meter, "enforcer": enforcer, "producer": producer, "settings": settings, "servers": kafka_servers}
    producer.close()
    httpd.stop()
    admin(settings).delete_topics(list({settings.topics.raw, settings.topics.state, settings.topics.alerts,
                                        settings.topics.attributed, settings.topics.dlq, settings.topics.reservations}))


def published(setup, expected: int) -> list[UsageEvent]:
    """The usage events the meter published (read back from Kafka)."""
    setup["producer"].flush()
    records = read_topic(setup["servers"], setup["settings"].topics.raw, expected, 10)
    return [UsageEvent.model_validate_json(r.value()) for r in records]
