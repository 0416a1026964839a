"""A small builder for Grafana dashboard JSON (schemaVersion 39): Prometheus targets,
timeseries / stat / table / state-timeline panels laid out on the 24-column grid, and
template variables.

Every panel and target reads its data source from the `datasource` variable, so the
dashboards import into any Grafana whatever its Prometheus data source is called.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRID_WIDTH = 24

Json = dict[str, Any]


@dataclass(frozen=True)
class Target:
    """One PromQL query of a panel."""

    expr: str
    legend: str = ""
    instant: bool = False  # tables and stats of "now" read one instant, not a range
    table: bool = False  # format=table: one row per series, labels as columns

    def to_json(self, ref_id: str) -> Json:
        out: Json = {
            "datasource": DATASOURCE,
            "refId": ref_id,
            "expr": self.expr,
            "range": not self.instant,
            "instant": self.instant,
            "editorMode": "code",
        }
        if self.legend:
            out["legendFormat"] = self.legend
        if self.table:
            out["format"] = "table"
        return out


@dataclass(frozen=True)
class Panel:
    """A panel; `width` and `height` in grid units (24 columns wide)."""

    title: str
    targets: tuple[Target, ...]
    kind: str = "timeseries"  # timeseries | stat | table | state-timeline
    unit: str = "short"
    description: str = ""
    width: int = 12
    height: int = 8
    decimals: int | None = None
    stacked: bool = False
    options: Json = field(default_factory=dict)
    transformations: tuple[Json, ...] = ()
    overrides: tuple[Json, ...] = ()
    mappings: tuple[Json, ...] = ()  # value mappings, e.g. a state's number to its name
    # A variable to repeat the panel for, one copy per selected value side by side (at
    # most `max_per_row` to a row): where series of one value must not meet another's.
    repeat: str = ""
    max_per_row: int = 4

    def to_json(self, panel_id: int, x: int, y: int) -> Json:
        defaults: Json = {"unit": self.unit}
        if self.decimals is not None:
            defaults["decimals"] = self.decimals
        if self.kind == "timeseries":
            defaults["custom"] = {
                "drawStyle": "line",
                "lineWidth": 1,
                "fillOpacity": 10,
                "showPoints": "never",
                "spanNulls": False,
                "stacking": {"mode": "normal" if self.stacked else "none", "group": "A"},
            }
        elif self.kind == "state-timeline":
            defaults["custom"] = {"lineWidth": 0, "fillOpacity": 70}
        if self.mappings:
            defaults["mappings"] = list(self.mappings)
        options: Json = dict(_DEFAULT_OPTIONS[self.kind])
        options.update(self.options)
        repeat: Json = {}
        if self.repeat:
            repeat = {
                "repeat": self.repeat,
                "repeatDirection": "h",
                "maxPerRow": self.max_per_row,
            }
        return {
            "id": panel_id,
            "type": self.kind,
            "title": self.title,
            "description": self.description,
            "datasource": DATASOURCE,
            "gridPos": {"h": self.height, "w": self.width, "x": x, "y": y},
            "targets": [t.to_json(chr(ord("A") + i)) for i, t in enumerate(self.targets)],
            "fieldConfig": {"defaults": defaults, "overrides": list(self.overrides)},
            "options": options,
            "transformations": list(self.transformations),
            **repeat,
        }


_DEFAULT_OPTIONS: dict[str, Json] = {
    "timeseries": {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    },
    "stat": {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "colorMode": "value",
        "graphMode": "area",
        "justifyMode": "auto",
        "orientation": "auto",
        "textMode": "auto",
    },
    "table": {"showHeader": True, "cellHeight": "sm", "footer": {"show": False}},
    "state-timeline": {
        "mergeValues": True,
        "showValue": "auto",
        "alignValue": "left",
        "rowHeight": 0.9,
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "single", "sort": "none"},
    },
}


@dataclass(frozen=True)
class Row:
    """A collapsible section title; the panels after it belong to it."""

    title: str


def datasource_variable() -> Json:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "options": [],
        "refresh": 1,
        "regex": "",
    }


def query_variable(name: str, label: str, query: str) -> Json:
    """A multi-value variable from `label_values(...)`, refreshed on time range change;
    "All" matches every value (`.*`), including series without the label."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": query,
        "definition": query,
        "current": {},
        "hide": 0,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "options": [],
        "refresh": 2,
        "regex": "",
        "sort": 1,
    }


def dashboard(
    uid: str,
    title: str,
    description: str,
    items: list[Panel | Row],
    variables: list[Json],
    *,
    tags: tuple[str, ...] = ("kubetrain",),
    time_from: str = "now-6h",
) -> Json:
    """The dashboard JSON; panels flow left to right and wrap at 24 columns."""
    panels: list[Json] = []
    x = y = row_height = 0
    for item in items:
        if isinstance(item, Row):
            y += row_height
            x = row_height = 0
            panels.append(
                {
                    "id": len(panels) + 1,
                    "type": "row",
                    "title": item.title,
                    "collapsed": False,
                    "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y},
                    "panels": [],
                }
            )
            y += 1
            continue
        if x + item.width > GRID_WIDTH:
            y += row_height
            x = row_height = 0
        panels.append(item.to_json(len(panels) + 1, x, y))
        x += item.width
        row_height = max(row_height, item.height)
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": list(tags),
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "30s",
        "time": {"from": time_from, "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "links": [],
        "annotations": {"list": []},
        "templating": {"list": [datasource_variable(), *variables]},
        "panels": panels,
    }


def queries(board: Json) -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel, in order."""
    return [
        (panel["title"], target["expr"])
        for panel in board["panels"]
        for target in panel.get("targets", [])
    ]


RATE = "$__rate_interval"
QUANTILES = (0.5, 0.9, 0.99)


def stat(title: str, expr: str, description: str = "", unit: str = "short") -> Panel:
    """A 4x4 single-number panel."""
    return Panel(
        title,
        (Target(expr, instant=False),),
        kind="stat",
        unit=unit,
        description=description,
        width=4,
        height=4,
    )
