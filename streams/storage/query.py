"""Read-only SQL for analysts and commands, wherever the database is.

With a ClickHouse server the query goes straight to it. With the embedded engine only one
process may open the data path, so while a worker runs on it the query travels to the
worker's ``POST /v1/query`` endpoint, which runs it read-only on the worker's client.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from streams.errors import CostlineError
from streams.httpjson import get_json
from streams.settings import Settings
from streams.storage.clickhouse import connect, is_embedded


class QueryError(CostlineError):
    """The query failed; the message is ClickHouse's (or the worker's) one-line reason."""


@dataclass
class QueryResult:
    columns: list[str]
    types: list[str]
    rows: list[list[Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"columns": self.columns, "types": self.types, "rows": [[_jsonable(v) for v in r] for r in self.rows]}

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> QueryResult:
        types = payload["types"]
        rows = [[_decimal(v) if t.startswith(("Decimal", "Nullable(Decimal")) else v for v, t in zip(r, types)]
                for r in payload["rows"]]
        return cls(columns=payload["columns"], types=types, rows=rows)


def connect_readonly(url: str) -> Client:
    """A client that can only read: ``readonly=1`` is a setting of its session, not of one query."""
    client = connect(url)
    client.set_client_setting("readonly", "1")
    return client


def run_readonly(client: Client, sql: str) -> QueryResult:
    """Runs ``sql`` on a client from ``connect_readonly``."""
    try:
        result = client.query(sql)
    except ClickHouseError as exc:
        raise QueryError(str(exc).strip().splitlines()[0][:500]) from None
    return QueryResult(
        columns=list(result.column_names),
        types=[t.name for t in result.column_types],
        rows=[list(r) for r in result.result_rows],
    )


def worker_health(settings: Settings) -> dict[str, Any] | None:
    """The health of the worker on this settings' web port, or None when none answers."""
    return get_json(f"{settings.web_url}/v1/health")


def worker_owns_database(settings: Settings) -> bool:
    """True when a worker answers on the web port and has this settings' database open."""
    health = worker_health(settings)
    return health is not None and health.get("clickhouse_url") == settings.clickhouse_url


def post_to_worker(settings: Settings, path: str, payload: dict[str, Any], timeout_s: float = 600.0) -> dict[str, Any]:
    """POSTs JSON to the worker's endpoint; its error answers become ``QueryError``."""
    request = urllib.request.Request(
        f"{settings.web_url}{path}",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        try:
            detail = json.load(exc).get("error", exc.reason)
        except ValueError:
            detail = exc.reason
        raise QueryError(str(detail)) from None
    except OSError as exc:
        raise QueryError(f"the worker at {settings.web_url} did not answer: {exc}") from None


def remote_query(settings: Settings, sql: str, timeout_s: float = 60.0) -> QueryResult:
    return QueryResult.from_json(post_to_worker(settings, "/v1/query", {"sql": sql}, timeout_s))


def query(settings: Settings, sql: str) -> QueryResult:
    if is_embedded(settings.clickhouse_url) and worker_owns_database(settings):
        return remote_query(settings, sql)
    client = connect_readonly(settings.clickhouse_url)
    try:
        return run_readonly(client, sql)
    finally:
        client.close()


def _jsonable(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _decimal(value: Any) -> Any:
    return Decimal(value) if isinstance(value, str) else value
