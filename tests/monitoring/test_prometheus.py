"""Every dashboard query and every alert, as the chart ships them, against a real
Prometheus scraping a real operator (on the local control plane), a real training run and
the real model server serving what it exported, a real router in front of it, and the
operator's ModelService series for an experiment (tests/monitoring/live.py).

One setup for the module (about a minute on 2 cores, mostly the training run's start-up).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.monitoring.live import OPERATOR_NAMESPACE, RUN, RUN_NAMESPACE, SERVICE, Stack
from tests.monitoring.queries import panel_queries, render_rules, variable_queries
from tests.support import prometheus
from tests.support.cluster import controlplane, kubectl, wait_until
from tests.support.runs import RBAC, apply, quickstart

pytestmark = pytest.mark.controlplane

K8S_NAMESPACE = "monitoring-test"
GPU_RUN = "gpu-run"


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    helm = Path(controlplane.fetch_tools()) / "helm"
    path = tmp_path_factory.mktemp("rules") / "alerts.yaml"
    path.write_text(yaml.safe_dump(render_rules(helm)))
    return path


@pytest.fixture(scope="module")
def stack(
    cluster: Any, crd_installed: None, rules_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    assert prometheus.available(), "no prometheus binary: run `python3 hack/controlplane.py tools`"
    kubectl("create", "namespace", "kubetrain-system", check=False)
    kubectl("apply", "-f", str(RBAC))
    kubectl("create", "namespace", K8S_NAMESPACE, check=False)
    live = Stack(
        tmp_path_factory.mktemp("stack"),
        operator_kubeconfig=cluster.operator_kubeconfig,
        rule_files=[rules_file],
    )
    try:
        live.start()
        # A GPU run for the operator to reconcile (it stays Provisioning: no nodes).
        run = quickstart(GPU_RUN, resources__gpusPerWorker=4, hyperparameters__globalBatchSize=64)
        apply(run, K8S_NAMESPACE)
        live.wait_served()
        # Two waves: the first creates the labelled counters (a series is born at its
        # first value, so a rate needs a later increase), the second moves them.
        # The experiment moves on with them: Undecided, then a guardrail rolls b back.
        live.traffic()
        live.prometheus.wait_for("sum(kubetrain_serve_feedback_total) == 2", timeout=30)
        live.prometheus.wait_for("sum(kubetrain_route_feedback_total) == 2", timeout=30)
        live.experiment("Undecided", {"a": 50, "b": 50})
        live.traffic()
        live.prometheus.wait_for("sum(kubetrain_serve_feedback_total) == 4", timeout=30)
        live.prometheus.wait_for("sum(kubetrain_route_feedback_total) == 4", timeout=30)
        live.experiment("Rollback", {"a": 100, "b": 0}, cause="Guardrail")
        live.prometheus.wait_for(
            'kubetrain_experiment_decision{decision="Rollback"} == 1', timeout=30
        )
        time.sleep(2)  # a couple more scrapes, so the rate windows hold both waves
        live.prometheus.wait_for(
            f'kubetrain_operator_run_gpus{{phase="Provisioning"}} == {2 * 4}', timeout=60
        )
        yield live
    except BaseException:
        for name in live.processes:
            print(f"--- {name} log ---\n{live.tail(name)}")
        raise
    finally:
        live.stop()
        kubectl("delete", "namespace", K8S_NAMESPACE, "--wait=false", check=False)


def test_the_traffic_happened(stack: Stack) -> None:
    assert stack.sent["completions"] == 4  # of the last wave
    assert stack.sent["streamed"]
    assert stack.sent["refused"] == 400
    assert stack.sent["routed"] == {"a": 2, "b": 2}
    up = {t["labels"]["job"]: t["health"] for t in stack.prometheus.targets()}
    assert up == {
        "kubetrain-operator": "up",
        "kubetrain-operator-services": "up",
        "kubetrain-router": "up",
        "kubetrain-serving": "up",
        "kubetrain-trainer": "down",
    }


def test_every_panel_query_evaluates(stack: Stack) -> None:
    assert stack.prometheus.query("sum(kubetrain_trainer_loss")["status"] == "error"  # can fail
    failures = []
    for board, title, expr in panel_queries():
        answer = stack.prometheus.query(expr)
        if answer.get("status") != "success":
            failures.append(f"{board} / {title}: {answer.get('error')}\n  {expr}")
    assert not failures, "\n".join(failures)


def test_every_alert_expression_evaluates(stack: Stack, rules_file: Path) -> None:
    rules = yaml.safe_load(rules_file.read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert len(exprs) == 8
    for expr in exprs:
        answer = stack.prometheus.query(expr)
        assert answer["status"] == "success", (expr, answer)


def test_prometheus_loads_the_rendered_rules_and_they_are_healthy(stack: Stack) -> None:
    def evaluated() -> list[dict[str, Any]] | None:
        rules = [r for g in stack.prometheus.rules() for r in g["rules"]]
        done = rules and all(r["lastEvaluation"] > "2000" for r in rules)
        return rules if done else None

    rules = wait_until(evaluated, timeout=30, message="every rule evaluated")
    assert {r["name"] for r in rules} == {
        "KubetrainRunFailed",
        "KubetrainRunStalled",
        "KubetrainCheckpointTooOld",
        "KubetrainOperatorReconcileErrors",
        "KubetrainServingErrors",
        "KubetrainGuardrailRollback",
        "KubetrainPromptDrift",
        "KubetrainModelRegressed",
    }
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []


def test_the_guardrail_rollback_alerts(stack: Stack) -> None:
    """The stack's experiment was rolled back on a guardrail: the alert fires at once,
    naming the service in its own namespace (not the operator's)."""

    def firing() -> list[dict[str, Any]] | None:
        rules = [r for g in stack.prometheus.rules() for r in g["rules"]]
        (rule,) = [r for r in rules if r["name"] == "KubetrainGuardrailRollback"]
        return rule["alerts"] if rule["state"] == "firing" else None

    (alert,) = wait_until(firing, timeout=30, message="KubetrainGuardrailRollback firing")
    assert alert["labels"]["namespace"] == RUN_NAMESPACE
    assert alert["labels"]["modelservice"] == SERVICE


def test_dashboard_variables_find_the_run(stack: Stack) -> None:
    window = {"start": stack.started, "end": time.time()}
    found = {}
    for board, variable, selector, label in variable_queries():
        answer = stack.prometheus.api("series", **{"match[]": selector}, **window)
        assert answer["status"] == "success", (selector, answer)
        found[board, variable] = {s.get(label) for s in answer["data"]}
    assert found["training", "namespace"] == {RUN_NAMESPACE}
    assert found["training", "run"] == {RUN}  # `kubetrain run` names its run_info
    assert found["serving", "run"] == {RUN}
    assert found["fleet", "namespace"] == {OPERATOR_NAMESPACE}
    assert found["experiments", "namespace"] == {RUN_NAMESPACE}
    assert found["experiments", "modelservice"] == {SERVICE}  # the router's model_info


# Panels that must show data after the run: (dashboard, panel title).
MUST_HAVE_DATA = [
    ("training", "Runs"),
    ("training", "Loss"),
    ("training", "Evaluation metrics"),
    ("training", "Learning rate"),
    ("training", "Gradient norm"),
    ("training", "Progress"),
    ("training", "Tokens/s"),
    ("training", "MFU"),
    ("training", "ETA"),
    ("training", "Checkpoint age"),
    ("training", "Data preparation"),
    ("fleet", "Queued runs"),
    ("fleet", "Runs by phase"),
    ("fleet", "GPUs requested by phase"),
    ("fleet", "Training throughput by run"),
    ("operator", "Reconcile rate"),
    ("operator", "Reconcile latency"),
    ("operator", "Kubernetes API writes"),
    ("serving", "Requests by code"),
    ("serving", "Errors by code"),
    ("serving", "Request latency"),
    ("serving", "Time to first token"),
    ("serving", "Generated tokens/s"),
    ("serving", "Feedback"),
    ("serving", "Serving pods by version"),
    ("experiments", "Requests by variant"),
    ("experiments", "Traffic weights"),
    ("experiments", "Weights timeline"),
    ("experiments", "Last traffic change"),
    ("experiments", "Primary metric by variant"),
    ("experiments", "Difference and confidence sequence"),
    ("experiments", "p-value"),
    ("experiments", "Samples by variant"),
    ("experiments", "Decision timeline"),
    ("experiments", "5xx ratio by variant"),
    ("experiments", "Latency p95 by variant"),
    ("experiments", "Feedback by variant"),
]


def _range(stack: Stack, expr: str) -> list[dict[str, Any]]:
    answer = stack.prometheus.query_range(expr, stack.started, time.time(), step=1)
    assert answer["status"] == "success", (expr, answer)
    return list(answer["data"]["result"])


def _finite(series: list[dict[str, Any]]) -> list[float]:
    return [float(v) for s in series for _, v in s["values"] if math.isfinite(float(v))]


@pytest.mark.parametrize(("board", "title"), MUST_HAVE_DATA)
def test_panel_shows_data(stack: Stack, board: str, title: str) -> None:
    exprs = [e for b, t, e in panel_queries() if (b, t) == (board, title)]
    assert exprs, f"no panel {title!r} on {board}"
    values = [v for expr in exprs for v in _finite(_range(stack, expr))]
    assert values, f"{board} / {title}: no data"


def test_panels_show_the_right_numbers(stack: Stack) -> None:
    queries: dict[tuple[str, str], list[str]] = {}
    for board, title, expr in panel_queries():
        queries.setdefault((board, title), []).append(expr)
    train, evaluation = (_range(stack, e) for e in queries["training", "Loss"])
    assert {s["metric"]["run"] for s in train + evaluation} == {RUN}
    train_loss, eval_loss = _finite(train), _finite(evaluation)
    assert train_loss[0] > train_loss[-1]  # it learned
    assert eval_loss[0] > eval_loss[-1]
    (progress_query,) = queries["training", "Progress"]
    progress = _finite(_range(stack, progress_query))
    assert max(progress) == 100
    gpus = _range(stack, queries["fleet", "GPUs requested by phase"][0])
    assert {s["metric"]["phase"]: _finite([s])[-1] for s in gpus}["Provisioning"] == 8
    feedback = stack.prometheus.values(
        'sum by (rating) (kubetrain_serve_feedback_total{namespace="ml-team"})'
    )
    assert {r["metric"]["rating"]: r["value"][1] for r in feedback} == {"up": "2", "down": "2"}
    errors = _range(stack, queries["serving", "Errors by code"][0])
    assert {s["metric"]["code"] for s in errors} == {"400"}


def test_experiments_panels_show_the_right_numbers(stack: Stack) -> None:
    queries: dict[tuple[str, str], list[str]] = {}
    for board, title, expr in panel_queries():
        if board == "experiments":
            queries.setdefault((board, title), []).append(expr)

    def last(title: str, label: str, n: int = 0) -> dict[str, float]:
        series = _range(stack, queries["experiments", title][n])
        return {s["metric"].get(label, ""): _finite([s])[-1] for s in series}

    def seen(title: str, label: str) -> dict[str, list[float]]:
        series = _range(stack, queries["experiments", title][0])
        return {s["metric"].get(label, ""): _finite([s]) for s in series}

    assert set(last("Requests by variant", "variant")) == {"a", "b"}  # both got traffic
    assert last("Traffic weights", "variant") == {"a": 100, "b": 0}  # the operator's
    assert last("Traffic weights", "variant", 1) == {"a": 50, "b": 50}  # the router's file
    weights = seen("Weights timeline", "variant")
    assert (weights["b"][0], weights["b"][-1]) == (50, 0)
    (decisions,) = seen("Decision timeline", "modelservice").values()
    codes = ["Collecting", "Undecided", "Promote", "Rollback"]
    assert [codes[int(c)] for c in dict.fromkeys(decisions)] == [
        "Collecting",
        "Undecided",
        "Rollback",
    ]
    assert set(last("5xx ratio by variant", "variant").values()) == {0.0}
    assert last("Primary metric by variant", "variant", 1) == {"a": 0.40, "b": 0.30}
    changes = stack.prometheus.values(queries["experiments", "Last traffic change"][0])
    assert {r["metric"]["cause"] for r in changes} == {"Spec", "Guardrail"}
