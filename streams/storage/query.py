"""Read-only SQL for analysts and commands, wherever the database is.

With a ClickHouse server the query goes straight to it. With the embedded engine only one
process may open the data path, so while a worker runs on it the query travels to the
worker's ``POST /v1/query`` endpoint, which runs it read-only on the worker's client.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from streams.errors import CostlineError
from streams.httpjson import Refused, get_json, post_json
from streams.settings import Settings
from streams.storage.clickhouse import connect, is_embedded, redact


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


def connect_readonly(url: str, settings: Settings | None = None) -> Client:
    """A client that can only read, within the query limits of ``settings`` (COSTLINE_QUERY_*).

    ``readonly=1`` is a setting of the client's session, set last: from then on no query can change
    any setting, the limits included (a ``SETTINGS`` clause is refused)."""
    limits = settings or Settings()
    client = connect(url)
    for name, value in (("max_execution_time", limits.query_timeout_s),
                        ("max_memory_usage", limits.query_max_memory_mb * 1024 * 1024),
                        ("max_result_rows", limits.query_max_rows), ("result_overflow_mode", "throw"),
                        ("max_threads", limits.query_max_threads), ("readonly", 1)):
        client.set_client_setting(name, str(value))
    return client


#: What a read-only query may start with. ``readonly=1`` still lets ``KILL QUERY`` through, which
#: could cancel the worker's own inserts.
_READ_STATEMENTS = ("SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "EXISTS")


#: What a user can do about ClickHouse's refusals of a read-only query, by error name.
_FIXES = {
    "UNKNOWN_TABLE": "; run `costline migrate` (or start a worker) to create Costline's tables",
    "TOO_MANY_ROWS_OR_BYTES": "; add a LIMIT, or raise COSTLINE_QUERY_MAX_ROWS",
    "TIMEOUT_EXCEEDED": "; narrow the query, or raise COSTLINE_QUERY_TIMEOUT_S",
    "MEMORY_LIMIT_EXCEEDED": "; narrow the query, or raise COSTLINE_QUERY_MAX_MEMORY_MB",
}


def one_read_statement(sql: str) -> str:
    """``sql`` if it is one statement that only reads (a trailing ``;`` allowed); else ``QueryError``."""
    statements = [s for s in _split_statements(sql) if s]
    if len(statements) != 1:
        raise QueryError(f"send exactly one statement ({len(statements)} were sent)")
    first = statements[0].lstrip("(").split(None, 1)[0].upper()
    if first not in _READ_STATEMENTS:
        raise QueryError(f"{first} is not a query: only {', '.join(_READ_STATEMENTS)} statements run here")
    if _INTO_OUTFILE.search(_QUOTED.sub("''", statements[0])):
        # readonly=1 lets it through, and the embedded engine then writes the file on the worker's host.
        raise QueryError("INTO OUTFILE is not allowed: the result comes back in the answer")
    return statements[0]


_QUOTED = re.compile(r"'(?:\\.|[^'\\])*'|\"(?:\\.|[^\"\\])*\"|`[^`]*`")
_INTO_OUTFILE = re.compile(r"\bINTO\s+OUTFILE\b", re.IGNORECASE)


def _split_statements(sql: str) -> list[str]:
    """The statements of ``sql`` split at ``;`` outside quotes and comments, each without comments
    and stripped."""
    out, current, i, n = [], [], 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"`":  # a quoted string or name, with backslash escapes
            j = i + 1
            while j < n and sql[j] != c:
                j += 2 if sql[j] == "\\" else 1
            current.append(sql[i:j + 1])
            i = j + 1
        elif sql.startswith("--", i) or c == "#":
            end = sql.find("\n", i)
            i = n if end < 0 else end
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            i = n if end < 0 else end + 2
            current.append(" ")
        elif c == ";":
            out.append("".join(current).strip())
            current = []
            i += 1
        else:
            current.append(c)
            i += 1
    out.append("".join(current).strip())
    return out


def run_readonly(client: Client, sql: str) -> QueryResult:
    """Runs one read-only statement on a client from ``connect_readonly``."""
    statement = one_read_statement(sql)
    try:
        result = client.query(statement)
    except ClickHouseError as exc:
        reason = str(exc).strip().splitlines()[0][:500]
        fix = next((fix for code, fix in _FIXES.items() if f"({code})" in reason), "")
        raise QueryError(f"{reason}{fix}") from None
    return QueryResult(
        columns=list(result.column_names),
        types=[t.name for t in result.column_types],
        rows=[list(r) for r in result.result_rows],
    )


def sql_string(text: str) -> str:
    """A ClickHouse string literal, for SQL built by the commands (``query`` takes no parameters)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def sql_time(at: datetime) -> str:
    """A ClickHouse ``DateTime64`` literal of an aware time, to the microsecond."""
    return f"toDateTime64('{at.astimezone(UTC):%Y-%m-%d %H:%M:%S.%f}', 6, 'UTC')"


def worker_health(settings: Settings) -> dict[str, Any] | None:
    """The health of the worker on this settings' web port, or None when none answers."""
    return get_json(f"{settings.web_url}/v1/health", headers=settings.web_headers)


def owning_worker(settings: Settings) -> dict[str, Any] | None:
    """The health of the worker on the web port when it has this settings' database open."""
    health = worker_health(settings)
    owns = health is not None and health.get("clickhouse_url") == redact(settings.clickhouse_url)
    return health if owns else None


def worker_owns_database(settings: Settings) -> bool:
    return owning_worker(settings) is not None


def post_to_worker(settings: Settings, path: str, payload: dict[str, Any], timeout_s: float = 600.0) -> dict[str, Any]:
    """POSTs JSON to the worker's endpoint; its error answers become ``QueryError``."""
    try:
        return post_json(f"{settings.web_url}{path}", payload, timeout_s, settings.web_headers)
    except Refused as exc:
        raise QueryError(exc.detail) from None
    except OSError as exc:
        raise QueryError(f"the worker at {settings.web_url} did not answer: {exc}") from None


def remote_query(settings: Settings, sql: str, timeout_s: float = 60.0) -> QueryResult:
    return QueryResult.from_json(post_to_worker(settings, "/v1/query", {"sql": sql}, timeout_s))


def query(settings: Settings, sql: str) -> QueryResult:
    if is_embedded(settings.clickhouse_url) and worker_owns_database(settings):
        return remote_query(settings, sql)
    client = connect_readonly(settings.clickhouse_url, settings)
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
