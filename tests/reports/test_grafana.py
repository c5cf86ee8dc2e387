"""The Grafana dashboard: every panel's query, its macros filled in as Grafana's ClickHouse plugin
fills them, runs on the project's schema (the embedded ClickHouse, migrated); the panels use the
provisioned data source."""

from __future__ import annotations

import json
import re

import yaml

from streams.operations.processes import ROOT
from streams.storage.query import connect_readonly, run_readonly

GRAFANA = ROOT / "config" / "grafana"


def filled(sql: str) -> str:
    """The SQL as the plugin sends it, for a week and two tenants."""
    sql = re.sub(r"\$__timeFilter\((\w+)\)", r"\1 >= toDateTime(1795392000) AND \1 <= toDateTime(1795996800)", sql)
    sql = re.sub(r"\$__timeInterval\((\w+)\)", r"toStartOfInterval(toDateTime(\1), INTERVAL 3600 second)", sql)
    return sql.replace("${tenant:singlequote}", "'acme','globex'")


def test_every_panel_query_runs_on_the_schema_and_uses_the_provisioned_source(ch_client):
    dashboard = json.loads((GRAFANA / "dashboards" / "costline.json").read_text())
    [source] = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "clickhouse.yaml").read_text())["datasources"]
    reader = connect_readonly(f"chdb://{ch_client.path}")
    queries = [(p["title"], t["rawSql"]) for p in dashboard["panels"] for t in p["targets"]]
    queries.append(("tenant variable", dashboard["templating"]["list"][0]["query"]))
    assert len(queries) == 13
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"] and panel["datasource"]["type"] == source["type"]
    for title, sql in queries:
        query = filled(sql)
        assert "$" not in query, f"{title}: a macro left unfilled"
        run_readonly(reader, query)  # raises on an unknown column, view or function
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
