"""What the monitoring tests evaluate: every panel query of every dashboard with Grafana's
variables substituted, and the alert rules as the chart renders them."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from kubetrain_monitoring.dashboards import DASHBOARDS
from kubetrain_monitoring.grafana import queries
from tests.monitoring.live import OPERATOR_NAMESPACE, RUN, RUN_NAMESPACE, SERVICE

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kubetrain"

# What Grafana would put in for each dashboard's variables here (scrapes every second).
GRAFANA_BUILTINS = {
    "$__rate_interval": "5s",
    "$__interval": "1s",
    "$__range_s": "300",
    "$__range": "5m",
}
VARIABLES = {
    "training": {"$namespace": RUN_NAMESPACE, "$run": RUN},
    "serving": {"$namespace": RUN_NAMESPACE, "$run": RUN},
    "fleet": {"$namespace": OPERATOR_NAMESPACE},
    "operator": {"$namespace": OPERATOR_NAMESPACE},
    "experiments": {"$namespace": RUN_NAMESPACE, "$modelservice": SERVICE},
}


def substitute(expr: str, variables: dict[str, str]) -> str:
    for name, value in {**GRAFANA_BUILTINS, **variables}.items():
        expr = expr.replace(name, value)
    assert "$" not in expr.replace("$__", ""), f"unsubstituted variable in {expr}"
    return expr


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expr ready for Prometheus)."""
    return [
        (name, title, substitute(expr, VARIABLES[name]))
        for name, board in DASHBOARDS.items()
        for title, expr in queries(board)
    ]


def variable_queries() -> list[tuple[str, str, str, str]]:
    """(dashboard, variable, selector, label) of every `label_values(selector, label)`."""
    out = []
    for name, board in DASHBOARDS.items():
        for var in board["templating"]["list"]:
            if var["type"] != "query":
                continue
            match = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"])
            assert match, var["query"]
            selector = substitute(match.group(1), VARIABLES[name])
            out.append((name, var["name"], selector, match.group(2)))
    return out


def render_rules(helm: Path, **values: Any) -> dict[str, Any]:
    """The PrometheusRule's spec (a rules file) as `helm template` renders it."""
    sets = ["--set", "monitoring.prometheusRule.enabled=true"]
    for key, value in values.items():
        # --set-json: plain --set would hand Helm 0.05 as a string.
        sets += ["--set-json", f"monitoring.prometheusRule.{key}={json.dumps(value)}"]
    out = subprocess.run(
        [
            str(helm),
            "template",
            "kt",
            str(CHART),
            *sets,
            "--show-only",
            "templates/prometheusrule.yaml",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rule = yaml.safe_load(out)
    assert rule["kind"] == "PrometheusRule"
    return dict(rule["spec"])


METRIC = re.compile(r"\bkubetrain_[a-z0-9_]+\b")


def metric_names(expr: str) -> set[str]:
    return set(METRIC.findall(expr))
