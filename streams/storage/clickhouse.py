"""ClickHouse access, through clickhouse-connect only.

``CLICKHOUSE_URL`` picks the engine: ``chdb:///path`` runs ClickHouse embedded in this
process (clickhouse-connect's chDB interface); ``http(s)://user:pass@host:port/db`` talks to a
server. Everything above this module is the same for both.

An embedded data path can be opened by one process at a time. While a worker owns it, other
commands query through the worker's read-only endpoint (see ``streams.storage.query``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from urllib.parse import urlparse

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from streams.errors import CostlineError

DEFAULT_DATABASE = "costline"
SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# clickhouse-connect logs every failed request before raising it; Costline reports the raised error itself.
logging.getLogger("clickhouse_connect.driver._backend.http_sync").setLevel(logging.ERROR)


class ClickHouseUnavailable(CostlineError):
    """ClickHouse cannot be opened or reached; the message says how to fix it."""


class EmbeddedPathLocked(ClickHouseUnavailable):
    """Another process (normally the worker) has the embedded data path open."""


def is_embedded(url: str) -> bool:
    return url.startswith("chdb:")


def embedded_path(url: str) -> Path:
    return Path(urlparse(url).path)


def database_of(url: str) -> str:
    if is_embedded(url):
        return DEFAULT_DATABASE
    name = urlparse(url).path.strip("/") or DEFAULT_DATABASE
    if not _IDENT.match(name):
        raise ClickHouseUnavailable(f"CLICKHOUSE_URL names database {name!r}: use letters, digits and underscores")
    return name


def connect(url: str) -> Client:
    """A client on the Costline database, created if missing."""
    database = database_of(url)
    try:
        if is_embedded(url):
            path = embedded_path(url)
            path.parent.mkdir(parents=True, exist_ok=True)
            client = clickhouse_connect.get_client(interface="chdb", path=str(path))
        else:
            parsed = urlparse(url)
            client = clickhouse_connect.get_client(dsn=parsed._replace(path="").geturl(), database="default")
        client.command(f"CREATE DATABASE IF NOT EXISTS {database}")
        client.database = database
        return client
    except ClickHouseError as exc:
        if is_embedded(url) and ("EmbeddedServer" in str(exc) or "lock" in str(exc).lower()):
            raise EmbeddedPathLocked(
                f"the embedded ClickHouse at {embedded_path(url)} is open in another process "
                "(a running `costline worker`); query through it, or stop it first"
            ) from None
        raise ClickHouseUnavailable(
            f"cannot open ClickHouse at {redact(url)}: {_first_line(exc)}; check CLICKHOUSE_URL"
        ) from None


def redact(url: str) -> str:
    """The URL without its password, for anything that is shown or logged."""
    parsed = urlparse(url)
    if parsed.password:
        return parsed._replace(netloc=parsed.netloc.replace(f":{parsed.password}@", ":***@")).geturl()
    return url


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    for cause in ("Connection refused", "Name or service not known", "timed out", "Authentication failed"):
        if cause.lower() in text.lower():
            return cause.lower()
    lines = text.strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__
