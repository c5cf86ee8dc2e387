"""One typed settings object for every Costline process, read from the environment.

Each field is read from the variable ``_ENV`` names; the README's Configuration table lists them
with their defaults and meaning (keep the two together when adding one). A wrong value stops the
process with one line naming the variable (``SettingsError``).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from streams.errors import CostlineError
from streams.stages.validation import MAX_EVENT_BYTES, MAX_EVENT_BYTES_CEILING, MAX_FUTURE


class SettingsError(CostlineError, ValueError):
    """A configuration value is wrong; the message says which and how to fix it."""


@dataclass(frozen=True)
class Topics:
    raw: str
    attributed: str
    dlq: str
    alerts: str
    state: str
    #: The enforcer's live reservations (compacted): what a restarted enforcer holds again.
    reservations: str = "quota.reservations"
    #: Role ``stream``'s ledger rows, as Native blocks, for role ``sink`` to insert as they are.
    ledger: str = "usage.ledger"

    @classmethod
    def with_prefix(cls, prefix: str) -> Topics:
        return cls(
            raw=f"{prefix}usage.raw",
            attributed=f"{prefix}usage.attributed",
            dlq=f"{prefix}usage.dlq",
            alerts=f"{prefix}quota.alerts",
            state=f"{prefix}quota.state",
            reservations=f"{prefix}quota.reservations",
            ledger=f"{prefix}usage.ledger",
        )


_ENV = {
    "kafka_bootstrap_servers": "KAFKA_BOOTSTRAP_SERVERS",
    "clickhouse_url": "CLICKHOUSE_URL",
    "home": "COSTLINE_HOME",
    "config_dir": "COSTLINE_CONFIG_DIR",
    "topic_prefix": "COSTLINE_TOPIC_PREFIX",
    "app_id": "COSTLINE_APP_ID",
    "partitions": "COSTLINE_PARTITIONS",
    "sink_batch": "COSTLINE_SINK_BATCH",
    "sink_within_s": "COSTLINE_SINK_WITHIN_S",
    "web_host": "COSTLINE_WEB_HOST",
    "web_port": "COSTLINE_WEB_PORT",
    "max_future_s": "COSTLINE_MAX_FUTURE_S",
    "max_event_bytes": "COSTLINE_MAX_EVENT_BYTES",
    "live_state_entries": "COSTLINE_LIVE_STATE_ENTRIES",
    "log_level": "COSTLINE_LOG_LEVEL",
    "enforcer_host": "COSTLINE_ENFORCER_HOST",
    "enforcer_port": "COSTLINE_ENFORCER_PORT",
    "enforcer_token": "COSTLINE_ENFORCER_TOKEN",
    "enforcer_url": "COSTLINE_ENFORCER_URL",
    "enforcer_peers": "COSTLINE_ENFORCER_PEERS",
    "fault_injection": "COSTLINE_FAULT_INJECTION",
    "role": "COSTLINE_ROLE",
    "otlp_topic": "COSTLINE_OTLP_TOPIC",
    "publish_attributed": "COSTLINE_PUBLISH_ATTRIBUTED",
    "log_format": "COSTLINE_LOG_FORMAT",
    "web_token": "COSTLINE_WEB_TOKEN",
    "query_timeout_s": "COSTLINE_QUERY_TIMEOUT_S",
    "query_max_memory_mb": "COSTLINE_QUERY_MAX_MEMORY_MB",
    "query_max_rows": "COSTLINE_QUERY_MAX_ROWS",
    "query_max_threads": "COSTLINE_QUERY_MAX_THREADS",
    "reserve_max_output_tokens": "COSTLINE_RESERVE_MAX_OUTPUT_TOKENS",
    "reserve_unknown_usd": "COSTLINE_RESERVE_UNKNOWN_USD",
}


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True)

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    clickhouse_url: str = Field(default="", repr=False)  # may hold a password: see storage.clickhouse.redact
    home: Path = Path(".costline")
    config_dir: Path = Path(__file__).resolve().parent.parent / "config"
    topic_prefix: str = ""
    app_id: str = Field(default="costline", min_length=1)
    partitions: int = Field(default=4, ge=1, le=1024)
    sink_batch: int = Field(default=5000, ge=1, le=1_000_000)
    sink_within_s: float = Field(default=0.1, gt=0, le=60)
    web_host: str = "127.0.0.1"
    web_port: int = Field(default=6066, ge=1, le=65535)
    #: The bearer token every request to the worker's endpoints needs; required off loopback.
    web_token: str | None = Field(default=None, repr=False)
    #: Limits of each read-only query (``costline query``, ``POST /v1/query``): they keep one
    #: analyst's query from taking the worker's memory or its ClickHouse from the ledger's inserts.
    query_timeout_s: int = Field(default=30, ge=1, le=86_400)
    query_max_memory_mb: int = Field(default=1024, ge=16)
    query_max_rows: int = Field(default=100_000, ge=1)
    query_max_threads: int = Field(default=1, ge=1, le=256)
    max_future_s: int = Field(default=int(MAX_FUTURE.total_seconds()), ge=0)
    max_event_bytes: int = Field(default=MAX_EVENT_BYTES, ge=1024, le=MAX_EVENT_BYTES_CEILING)
    #: Quota and billing state entries kept as objects; beyond that, the tenants used longest ago
    #: are held as compressed bytes, a few hundred a tenant (``streams.runtime.state``). About six
    #: entries a tenant: the default keeps some 3,000 busy tenants' state ready.
    live_state_entries: int = Field(default=20_000, ge=0)
    log_level: str = "info"
    enforcer_host: str = "127.0.0.1"
    enforcer_port: int = Field(default=6067, ge=1, le=65535)
    enforcer_token: str | None = Field(default=None, repr=False)
    #: This enforcer's base URL as clients and the other enforcers reach it (default: from host and port).
    enforcer_url: str = ""
    #: The base URLs of all the enforcers sharing the tenants, comma-separated, the same list in
    #: the same order on each (``streams.enforcement.layout``); empty: this one serves them all.
    enforcer_peers: str = ""
    #: A reservation without ``max_tokens`` holds this many output tokens (``streams.enforcement.estimate``).
    reserve_max_output_tokens: int = Field(default=8192, ge=1, le=10_000_000)
    #: What a reservation for a model without a known price holds (it is then not a bound).
    reserve_unknown_usd: Decimal = Field(default=Decimal("1.00"), ge=0)
    #: Enables POST /v1/faults/clickhouse on the worker (fault tests only).
    fault_injection: bool = False
    log_format: Literal["text", "json"] = "text"
    #: What a worker runs: everything, only the stream (validate → quotas), or only the ClickHouse sink.
    role: Literal["all", "stream", "sink"] = "all"
    #: Role ``stream`` also publishes each attributed record as JSON on usage.attributed, for
    #: consumers of that topic other than the sink (which reads the ledger blocks of usage.ledger).
    publish_attributed: bool = False
    #: The topic an OpenTelemetry Collector's Kafka exporter writes spans to (``otlp_spans`` is its
    #: default); when set, workers of roles ``all`` and ``stream`` turn its GenAI spans into usage
    #: events (``streams.runtime.spans``). The Collector names it: no topic prefix is added.
    otlp_topic: str = Field(default="", max_length=249, pattern=r"^[A-Za-z0-9._-]*$")

    @property
    def plans_file(self) -> Path:
        """Plans, their limits and rate cards (``streams.stages.plans``)."""
        return self.config_dir / "plans.yaml"

    @property
    def otlp_file(self) -> Path:
        """Where a span's tenant, user and business context are (``streams.stages.spans``)."""
        return self.config_dir / "otlp.yaml"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {field: env[var] for field, var in _ENV.items() if env.get(var, "") != ""}
        values.update(overrides)
        try:
            settings = cls(**values)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = str(err["loc"][0])
            raise SettingsError(
                f"{_ENV.get(field, field)}={values.get(field)!r} is invalid: {err['msg']}"
            ) from None
        if settings.web_token is None and not is_loopback(settings.web_host):
            raise SettingsError(f"COSTLINE_WEB_HOST={settings.web_host!r} is reachable from other hosts: set "
                                "COSTLINE_WEB_TOKEN, which its endpoints then require as a bearer token")
        if settings.enforcer_token is None and not is_loopback(settings.enforcer_host):
            raise SettingsError(f"COSTLINE_ENFORCER_HOST={settings.enforcer_host!r} is reachable from other hosts: "
                                "set COSTLINE_ENFORCER_TOKEN, which its endpoints then require as a bearer token")
        home = settings.home.resolve()
        return settings.model_copy(update={
            "home": home,
            "config_dir": settings.config_dir.resolve(),
            "clickhouse_url": settings.clickhouse_url or f"chdb://{home / 'chdb'}",
            "enforcer_url": settings.enforcer_url or f"http://{settings.enforcer_host}:{settings.enforcer_port}",
        })

    @property
    def topics(self) -> Topics:
        return Topics.with_prefix(self.topic_prefix)

    @property
    def deployment(self) -> str:
        """What names this deployment's consumer groups, changelog topic and transactional ids: the
        app id behind the topic prefix, so that two deployments with different prefixes on one
        cluster share none of them (with a shared changelog, one restored the other's positions)."""
        return f"{self.topic_prefix}{self.app_id}"

    @property
    def web_headers(self) -> dict[str, str]:
        """What a request to the worker's endpoints carries: its bearer token, when one is set."""
        return {"Authorization": f"Bearer {self.web_token}"} if self.web_token else {}

    @property
    def web_url(self) -> str:
        return f"http://{self.web_host}:{self.web_port}"


def is_loopback(host: str) -> bool:
    """Whether a bind address is reachable from this host only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
