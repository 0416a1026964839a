"""Continuous evaluation against the local control plane, the operator in-process: a new
ModelService gets one baseline evaluation Job per variant at once; the real Job controller
makes their pods, the test plays the kubelet (the evaluator's exit with its termination
message, as `python -m kubetrain_trainer.evaluate_service` writes it), the Job controller
completes the Jobs, and the operator puts the results into status.evaluation and the
Prometheus gauge. A failed evaluation is a result with its error."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetrain_api import modelservice as ms
from kubetrain_api.contract import LABEL_MODELSERVICE, LABEL_VARIANT
from kubetrain_operator import metrics
from tests.support import kubelet
from tests.support.cluster import kubectl, wait_until
from tests.support.operators import in_process_operator
from tests.support.runs import RBAC, apply

pytestmark = pytest.mark.controlplane


@pytest.fixture(scope="module")
def operator(cluster: Any, crd_installed: None) -> Any:
    kubectl("create", "namespace", "kubetrain-system", check=False)
    kubectl("apply", "-f", str(RBAC))
    with in_process_operator(cluster.operator_kubeconfig, "--all-namespaces"):
        yield


def service_doc(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "ModelService",
        "metadata": {"name": name},
        "spec": {
            "variants": [
                {"name": "a", "source": {"uri": "pvc://models/a", "version": "a-v1"}, "weight": 50},
                {"name": "b", "source": {"uri": "pvc://models/b", "version": "b-v1"}, "weight": 50},
            ],
            "evaluation": {
                "schedule": "0 0 1 1 *",  # yearly: only the baselines run in the test
                "datasets": [{"name": "intents", "uri": "pvc://data/intents.jsonl"}],
                "metrics": ["accuracy"],
                "regression": {"metric": "intents/accuracy", "maxDrop": 0.05},
            },
        },
    }


def status(name: str, namespace: str) -> dict[str, Any]:
    out = kubectl("get", "modelservice", name, "-n", namespace, "-o", "json").stdout
    return dict(json.loads(out).get("status") or {})


def test_baseline_results_land_in_status_and_the_gauge(operator: None, namespace: str) -> None:
    apply(service_doc("chat"), namespace)
    jobs = wait_until(
        lambda: (
            len(a := status("chat", namespace).get("evaluation", {}).get("active", [])) == 2 and a
        ),
        timeout=60,
        message="two baseline evaluation Jobs",
    )
    by_variant: dict[str, str] = {}
    for name in jobs:
        assert name.startswith(ms.evaluation_job_prefix("chat") + "-")
        job = json.loads(kubectl("get", "job", name, "-n", namespace, "-o", "json").stdout)
        by_variant[job["metadata"]["labels"][LABEL_VARIANT]] = name
    assert sorted(by_variant) == ["a", "b"]

    # The Job controller made each Job's pod; play its kubelet.
    messages = {"a": {"intents/accuracy": 0.9, "accuracy": 0.9}, "b": None}
    for variant, job_name in by_variant.items():
        (pod,) = wait_until(
            lambda n=job_name: kubelet.pods(namespace, f"job-name={n}"),
            timeout=60,
            message=f"the pod of Job {job_name}",
        )
        assert pod["metadata"]["labels"][LABEL_MODELSERVICE] == "chat"
        (container,) = pod["spec"]["containers"]
        assert container["terminationMessagePath"] == "/dev/termination-log"
        result = messages[variant]
        if result is None:  # b's evaluator failed: its error line is the message
            line = "evaluate_service: invalid data: spec.evaluation.datasets: no such file"
            kubelet.set_terminated(namespace, pod["metadata"]["name"], 11, message=line)
        else:
            text = json.dumps({"metrics": result}, separators=(",", ":"))
            kubelet.set_terminated(namespace, pod["metadata"]["name"], 0, message=text)

    done = wait_until(
        lambda: (
            len((s := status("chat", namespace)).get("evaluation", {}).get("results", [])) == 2
            and s
        ),
        timeout=90,
        message="both results in status.evaluation",
    )
    evaluation = done["evaluation"]
    assert evaluation.get("active", []) == []
    results = {r["variant"]: r for r in evaluation["results"]}
    assert results["a"]["metrics"] == {"intents/accuracy": 0.9, "accuracy": 0.9}
    assert results["a"]["modelVersion"] == "a-v1"
    assert results["a"]["job"] == by_variant["a"]
    assert results["b"].get("metrics", {}) == {}
    assert "exit code 11" in results["b"]["error"]
    assert "spec.evaluation.datasets" in results["b"]["error"]
    assert evaluation["nextScheduleTime"].endswith("-01-01T00:00:00Z")
    conditions = {c["type"]: c for c in done["conditions"]}
    assert conditions["Regressed"]["status"] == "False"

    labels = {
        "namespace": namespace,
        "modelservice": "chat",
        "variant": "a",
        "model_version": "a-v1",
        "metric": "intents/accuracy",
    }
    gauge = "kubetrain_modelservice_evaluation_metric"
    # Observed right after the status is written.
    wait_until(
        lambda: metrics.REGISTRY.get_sample_value(gauge, labels) == 0.9,
        timeout=30,
        message="the gauge",
    )
    # Each new model version gets one baseline; nothing more runs until the schedule.
    assert len(kubectl("get", "jobs", "-n", namespace, "-o", "name").stdout.split()) == 2
