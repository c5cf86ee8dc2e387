"""A self-contained HTML page of charts and tables: one file, opened without a network.

Charts are drawn in the browser by plotly.js, read at build time from the ``plotly`` Python
package's own copy and written into the page (4.8 MB once per page; nothing is fetched when the
page is opened). Chosen over pygal, whose SVGs are small and need no script: plotly's charts
have hover values, zoom and a legend that hides series, which is what an analyst does with a
cost chart, and it draws time axes and grouped bars without our own layout code.

Amounts travel into the page as exact decimal strings (the ledger's ``Decimal``s, never a Python
float) and become numbers only for drawing; the tables print the strings themselves. Each chart
and table shows the SQL it came from, to run with ``costline query`` or any ClickHouse client.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cache
from typing import Literal

Value = Decimal | int | str


@dataclass(frozen=True)
class Chart:
    id: str
    title: str
    kind: Literal["bar", "line", "markers"]
    #: Category or time labels.
    x: list[str]
    #: (series name, one value per x).
    series: list[tuple[str, list[Value]]]
    query: str
    y_title: str = "USD"
    #: For "markers": each series' own x (times) and y labels (categories); its values are
    #: shown on hover instead of drawn.
    series_x: list[list[str]] = field(default_factory=list)
    y_labels: list[list[str]] = field(default_factory=list)


@dataclass(frozen=True)
class Table:
    id: str
    title: str
    columns: list[str]
    rows: list[list[str]]
    query: str = ""


@dataclass(frozen=True)
class Section:
    title: str
    items: list[Chart | Table]


@cache
def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def render(title: str, subtitle: str, totals: list[tuple[str, str, str]], sections: list[Section]) -> str:
    """The page: ``totals`` are (element id, label, value) shown at the top."""
    charts = []
    body = [f"<h1>{_e(title)}</h1>", f"<p class='sub'>{_e(subtitle)}</p>", "<div class='totals'>"]
    body += [f"<div class='total'><div class='label'>{_e(label)}</div><div class='value' id='{_e(tid)}'>{_e(value)}"
             "</div></div>" for tid, label, value in totals]
    body.append("</div>")
    for section in sections:
        body.append(f"<h2>{_e(section.title)}</h2>")
        for item in section.items:
            if isinstance(item, Chart):
                charts.append(_figure(item))
                body.append(f"<figure><div class='chart' id='{_e(item.id)}'></div>{_query(item.query)}</figure>")
            else:
                body.append(_table(item))
    return (_HEAD.format(title=_e(title)) + f"<script>{_plotly_js()}</script>\n" + "\n".join(body)
            + _SCRIPT.replace("__FIGURES__", _script_json(charts)) + "</body></html>\n")


def _script_json(value: object) -> str:
    """JSON safe inside a <script>: a label holding "</script>" (a tenant id, a model name) must
    not end the script and run what follows it."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _figure(chart: Chart) -> dict[str, object]:
    traces = []
    for index, (name, values) in enumerate(chart.series):
        trace: dict[str, object] = {"name": name, "x": chart.x, "y": [_text(v) for v in values]}
        if name in _COLORS:  # the same colour for cost, revenue and margin in every chart
            trace["marker"] = {"color": _COLORS[name]}
            trace["line"] = {"color": _COLORS[name]}
        if chart.kind == "bar":
            trace["type"] = "bar"
        elif chart.kind == "line":
            trace.update(type="scatter", mode="lines+markers")
        else:  # markers: y is a category per point, values are shown on hover
            trace.update(type="scatter", mode="markers", x=chart.series_x[index], y=chart.y_labels[index],
                         text=[_text(v) for v in values], marker={"size": 11, **_LEVELS.get(name, {})})
        traces.append(trace)
    layout = {"title": {"text": chart.title}, "barmode": "group", "height": 380,
              "margin": {"l": 70, "r": 20, "t": 50, "b": 90}, "legend": {"orientation": "h"},
              "yaxis": {"title": {"text": chart.y_title}} if chart.kind != "markers" else {"type": "category"}}
    return {"id": chart.id, "numeric": chart.kind != "markers", "data": traces, "layout": layout}


_COLORS = {"cost": "#d9534f", "revenue": "#3b6fd8", "margin": "#2e9e6a"}
_LEVELS = {"warning": {"color": "#f0ad4e"}, "soft_cap": {"color": "#e8590c"}, "hard_cap": {"color": "#b02a37"}}


def _table(table: Table) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in table.columns)
    rows = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in table.rows)
    empty = "" if table.rows else f"<tr><td colspan='{len(table.columns)}'>none</td></tr>"
    return (f"<h3>{_e(table.title)}</h3><table id='{_e(table.id)}'><thead><tr>{head}</tr></thead>"
            f"<tbody>{rows}{empty}</tbody></table>{_query(table.query)}")


def _query(sql: str) -> str:
    return f"<details><summary>query</summary><pre>{_e(sql.strip())}</pre></details>" if sql else ""


def _text(value: Value) -> str:
    return format(value, "f") if isinstance(value, Decimal) else str(value)


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


_HEAD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #1f2937; padding: 0 1rem; }}
h1 {{ margin-bottom: 0.2rem; }} .sub {{ color: #6b7280; margin-top: 0; }}
.totals {{ display: flex; gap: 1rem; flex-wrap: wrap; margin: 1.5rem 0; }}
.total {{ border: 1px solid #e5e7eb; border-radius: 8px; padding: 0.8rem 1.2rem; min-width: 10rem; }}
.total .label {{ color: #6b7280; font-size: 0.85rem; }} .total .value {{ font-size: 1.4rem; font-weight: 600; }}
figure {{ margin: 0 0 1.5rem 0; }} .chart {{ width: 100%; min-height: 380px; }}
table {{ border-collapse: collapse; margin: 0.5rem 0; font-size: 0.9rem; }}
th, td {{ border-bottom: 1px solid #e5e7eb; padding: 0.3rem 0.8rem; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
details {{ color: #6b7280; font-size: 0.8rem; }} pre {{ white-space: pre-wrap; }}
</style></head><body>
"""

# Each chart is drawn into its div; the values are exact decimal strings, made numbers only here.
_SCRIPT = """
<script>
const figures = __FIGURES__;
for (const figure of figures) {
  if (figure.numeric) { for (const trace of figure.data) { trace.y = trace.y.map(Number); } }
  Plotly.newPlot(figure.id, figure.data, figure.layout, {displaylogo: false, responsive: true});
}
</script>
"""
