"""Dashboards and alerts without Prometheus: the generated files match the code, every
metric a query names is one kubetrain exports, the JSON is well formed for Grafana, the
chart renders them, and the metrics added for them behave."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from kubetrain_monitoring.__main__ import generated, main
from kubetrain_monitoring.dashboards import DASHBOARDS
from kubetrain_monitoring.grafana import DATASOURCE, GRID_WIDTH, SCHEMA_VERSION
from kubetrain_operator import metrics as operator_metrics
from kubetrain_trainer import metrics as trainer_metrics
from kubetrain_trainer.route.metrics import RouteMetrics
from kubetrain_trainer.serve.metrics import ServeMetrics
from tests.monitoring.queries import CHART, metric_names, panel_queries, render_rules

SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "info": ("_info",),
}


def exported(registry: CollectorRegistry) -> set[str]:
    """Every sample name a registry can expose, labelled children or not yet."""
    return {
        family.name + suffix
        for family in registry.collect()
        for suffix in SAMPLE_SUFFIXES[family.type]
    }


def full_telemetry() -> trainer_metrics.Telemetry:
    """A trainer snapshot with every series set."""
    telemetry = trainer_metrics.Telemetry("mon", "builtin://tiny-llama")
    telemetry.set_phase("Running")
    telemetry.update(**{name: 1.0 for name in trainer_metrics.TRAINING_FIELDS})
    telemetry.record_checkpoint(1, "/ckpt/step-1", 0.5)
    telemetry.record_eval(1, {"loss": 1.0, "perplexity": 2.7}, gate={"passed": True})
    telemetry.set_data_summary({"stages": [{"stage": "filter", "in": 3, "kept": 2}]})
    return telemetry


@pytest.fixture(scope="module")
def exported_names() -> set[str]:
    return (
        exported(operator_metrics.REGISTRY)
        | exported(full_telemetry().registry)
        | exported(ServeMetrics("mon", "mon-step1").registry)
        | exported(RouteMetrics().registry)
    )


def test_committed_files_match_the_code() -> None:
    assert main(["--check"]) == 0, "run `make dashboards` and commit the result"


def test_check_fails_on_drift(tmp_path: Path) -> None:
    chart = tmp_path / "chart"
    assert main(["--chart", str(chart)]) == 0
    assert main(["--check", "--chart", str(chart)]) == 0
    (chart / "dashboards" / "serving.json").write_text("{}\n")
    assert main(["--check", "--chart", str(chart)]) == 1
    (chart / "rules" / "alerts.yaml").unlink()
    assert main(["--check", "--chart", str(chart)]) == 1


def test_module_entry_point_checks() -> None:
    done = subprocess.run([sys.executable, "-m", "kubetrain_monitoring", "--check"], check=False)
    assert done.returncode == 0


def test_every_queried_metric_is_exported(exported_names: set[str]) -> None:
    rules = yaml.safe_load(generated()["rules/alerts.yaml"])
    exprs = [e for _, _, e in panel_queries()]
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    exprs += [v["query"] for b in DASHBOARDS.values() for v in b["templating"]["list"]]
    unknown = {name for e in exprs for name in metric_names(e)} - exported_names
    assert not unknown, f"queries name metrics nobody exports: {sorted(unknown)}"
    # ... and the check itself can fail.
    assert metric_names("rate(kubetrain_serve_request_total[5m])") - exported_names


def test_exported_names_match_a_real_scrape(exported_names: set[str]) -> None:
    """The family-type arithmetic above agrees with what /metrics really prints."""
    text = generate_latest(full_telemetry().registry).decode()
    scraped = {m.group(1) for m in re.finditer(r"^(kubetrain_\w+)[{ ]", text, re.M)}
    assert scraped
    assert scraped <= exported_names


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_json_is_well_formed(name: str) -> None:
    board = json.loads(generated()[f"dashboards/{name}.json"])
    assert board["uid"] == f"kubetrain-{name}"
    assert board["schemaVersion"] == SCHEMA_VERSION
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"] == {
        **variables["datasource"],
        "type": "datasource",
        "query": "prometheus",
    }
    assert "namespace" in variables
    if name in ("training", "serving"):
        assert "run" in variables
    if name == "experiments":
        assert "modelservice" in variables
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= GRID_WIDTH, panel["title"]
        covered = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not covered & cells, f"{panel['title']} overlaps another panel"
        cells |= covered
        if panel["type"] == "row":
            continue
        assert panel["type"] in ("timeseries", "stat", "table", "state-timeline")
        assert panel["datasource"] == DATASOURCE
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE
            assert target["expr"]
            assert target["refId"]


def test_dashboards_cover_what_the_issue_asks() -> None:
    titles = {name: {p["title"] for p in b["panels"]} for name, b in DASHBOARDS.items()}
    assert {
        "Loss",
        "Evaluation metrics",
        "Learning rate",
        "Tokens/s",
        "MFU",
        "Gradient norm",
        "Checkpoint age",
        "ETA",
        "Runs",
        "Preference and RL",
        "Reward: $run",
        "Reward margin and accuracy",
        "KL to the reference",
    } <= titles["training"]
    assert {"Runs by phase", "Failures and retries", "GPU-hours (time range)", "Queue"} <= titles[
        "fleet"
    ]
    assert {
        "Reconcile rate",
        "Reconcile latency",
        "Kubernetes API errors",
        "Run retries",
    } <= titles["operator"]
    assert {
        "Requests by code",
        "Request latency",
        "Time to first token",
        "Generated tokens/s",
        "Errors by code",
        "Feedback",
        "In flight and queued",
    } <= titles["serving"]
    assert {
        "Requests by variant",
        "Traffic weights",
        "Primary metric by variant",
        "p-value",
        "Decision timeline",
        "Weights timeline",
        "5xx ratio by variant",
        "Latency p95 by variant",
        "Continuous evaluation",
        "Feedback by variant",
        "Prompt drift: words",
        "Prompt drift: lengths",
    } <= titles["experiments"]


# ---------------------------------------------------------------------------- chart


@pytest.fixture(scope="module")
def helm() -> Path:
    from tests.support.cluster import controlplane

    return Path(controlplane.fetch_tools()) / "helm"


def _template(helm: Path, *sets: str, show: str) -> list[dict]:
    args = [str(helm), "template", "kt", str(CHART), "--show-only", show]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_chart_ships_each_dashboard_as_a_labelled_configmap(helm: Path) -> None:
    maps = _template(
        helm,
        "monitoring.dashboards.label=my_label",
        "monitoring.dashboards.labelValue=yes",
        "monitoring.dashboards.folder=ML",
        "monitoring.dashboards.additionalLabels.team=ml",
        show="templates/dashboards.yaml",
    )
    assert {m["metadata"]["name"] for m in maps} == {
        f"kt-kubetrain-dashboard-{n}" for n in DASHBOARDS
    }
    for cm in maps:
        meta = cm["metadata"]
        assert meta["labels"]["my_label"] == "yes"
        assert meta["labels"]["team"] == "ml"
        assert meta["labels"]["app.kubernetes.io/instance"] == "kt"
        assert meta["annotations"] == {"grafana_folder": "ML"}
        ((key, text),) = cm["data"].items()
        assert json.loads(text) == DASHBOARDS[key.removesuffix(".json")]


def test_chart_renders_thresholds_into_the_rules(helm: Path) -> None:
    spec = render_rules(
        helm,
        stalledMinutes=7,
        checkpointMaxAgeMinutes=42,
        servingErrorRatio=0.2,
        promptDriftJsd=0.15,
        promptDriftPsi=0.5,
    )
    rules = {r["alert"]: r for g in spec["groups"] for r in g["rules"]}
    assert set(rules) == {
        "KubetrainRunFailed",
        "KubetrainRunStalled",
        "KubetrainCheckpointTooOld",
        "KubetrainOperatorReconcileErrors",
        "KubetrainServingErrors",
        "KubetrainGuardrailRollback",
        "KubetrainPromptDrift",
        "KubetrainModelRegressed",
    }
    assert "> 60 * 7\n" in rules["KubetrainRunStalled"]["expr"]
    drift = rules["KubetrainPromptDrift"]["expr"]
    assert ") > 0.15\nor " in drift
    assert drift.endswith(") > 0.5")
    assert "> 60 * 42\n" in rules["KubetrainCheckpointTooOld"]["expr"]
    assert rules["KubetrainServingErrors"]["expr"].endswith("> 0.2")
    # Prometheus' own templates survive Helm.
    assert "{{ $labels.run }}" in rules["KubetrainRunStalled"]["annotations"]["description"]


def test_promtool_accepts_the_rendered_rules(helm: Path, tmp_path: Path) -> None:
    # Installed with prometheus by `hack/controlplane.py tools` (make test): never skipped.
    assert shutil.which("promtool"), "no promtool: run `python3 hack/controlplane.py tools`"
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(render_rules(helm)))
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 8 rules found" in done.stdout


def test_the_operator_s_own_namespace_labels_survive_the_scrape(helm: Path) -> None:
    """The ModelService series carry the service's `namespace`; without honorLabels the
    operator pod's namespace would replace it (the scraped one becoming exported_namespace)."""
    (monitor,) = _template(
        helm, "monitoring.serviceMonitor.enabled=true", show="templates/servicemonitor.yaml"
    )
    assert [e.get("honorLabels") for e in monitor["spec"]["endpoints"]] == [True]


def test_rules_are_off_by_default(helm: Path) -> None:
    done = subprocess.run(
        [str(helm), "template", "kt", str(CHART), "--show-only", "templates/prometheusrule.yaml"],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "could not find template" in done.stderr


# ---------------------------------------------------------------------------- metric additions


def test_operator_exports_requested_gpus_by_phase() -> None:
    index = operator_metrics.RunIndex()
    index.set("a", "Running", 16)
    index.set("b", "Running", 8)
    index.set("c", "Pending", 4)
    index.set("d", "Failed")
    index.set("c", "Running", 4)  # phase moved on
    index.forget("b")
    registry = CollectorRegistry()
    registry.register(index)
    assert registry.get_sample_value("kubetrain_operator_run_gpus", {"phase": "Running"}) == 20
    assert registry.get_sample_value("kubetrain_operator_run_gpus", {"phase": "Pending"}) == 0
    assert registry.get_sample_value("kubetrain_operator_runs", {"phase": "Running"}) == 2


def test_trainer_exports_the_time_of_the_last_step() -> None:
    now = [1000.0]
    telemetry = trainer_metrics.Telemetry("mon", "m", clock=lambda: now[0])
    value = lambda: telemetry.registry.get_sample_value(  # noqa: E731
        "kubetrain_trainer_last_step_timestamp_seconds"
    )
    assert value() is None  # no step yet: no series, so no stall alert before training
    telemetry.update(step=1)
    now[0] = 1060.0
    telemetry.update(loss=2.0)  # not a step
    assert value() == 1000.0
    telemetry.update(step=2)
    assert value() == 1060.0
    info = {"run": "mon", "model": "m"}
    assert telemetry.registry.get_sample_value("kubetrain_trainer_run_info", info) == 1


def test_model_server_exports_which_model_it_serves() -> None:
    registry = ServeMetrics("mon", "mon-step30").registry
    labels = {"model": "mon", "version": "mon-step30"}
    assert registry.get_sample_value("kubetrain_serve_model_info", labels) == 1


def test_the_decision_timeline_knows_every_decision_in_the_api_order() -> None:
    from typing import get_args

    from kubetrain_api.modelservice import Decision
    from kubetrain_monitoring.experiments import DECISIONS

    assert get_args(Decision) == DECISIONS
