"""Applies ``sql/NNNN_name.sql`` migrations in order, once each, recording what was applied.

A migration file holds one or more statements separated by ``;`` at the end of a line.
Statements are written to be idempotent (``IF NOT EXISTS``), so a migration interrupted
half-way can simply be run again.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from clickhouse_connect.driver.client import Client

from streams.storage.clickhouse import SQL_DIR

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_STATEMENT_END = re.compile(r";\s*$", re.MULTILINE)

MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations
(
    version UInt32,
    name String,
    checksum String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY version
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()[:16]

    def statements(self) -> list[str]:
        return [s.strip() for s in _STATEMENT_END.split(self.sql) if _strip_comments(s)]


def _strip_comments(sql: str) -> str:
    return "\n".join(line for line in sql.splitlines() if not line.strip().startswith("--")).strip()


def discover(directory: Path = SQL_DIR) -> list[Migration]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE.match(path.name)
        if not match:
            raise ValueError(f"{path}: migration files are named NNNN_snake_case.sql")
        found.append(Migration(int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"{directory}: two migrations share a version number")
    return found


def applied_versions(client: Client) -> set[int]:
    client.command(MIGRATIONS_TABLE)
    return {row[0] for row in client.query("SELECT version FROM schema_migrations FINAL").result_rows}


def migrate(client: Client, directory: Path = SQL_DIR) -> list[Migration]:
    """Applies pending migrations in version order; returns those applied now."""
    done = applied_versions(client)
    applied = []
    for migration in discover(directory):
        if migration.version in done:
            continue
        for statement in migration.statements():
            client.command(statement)
        client.insert(
            "schema_migrations",
            [[migration.version, migration.name, migration.checksum]],
            column_names=["version", "name", "checksum"],
        )
        applied.append(migration)
    return applied
