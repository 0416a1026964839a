"""Serving through the operator, in-process, against the real local control plane
(Kubernetes 1.20: PodDisruptionBudgets are policy/v1beta1 there, which the operator must
find out by discovery). The test plays the kubelet: the driver's exit with its termination
message, and the model server pods becoming Ready, from which the controller-manager
computes the Deployment's available replicas.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.support import kubelet
from tests.support.cluster import kubectl, wait_until
from tests.support.runs import (
    apply,
    condition,
    events,
    get_run,
    quickstart,
    start_cluster,
    status,
    wait_phase,
)

pytestmark = pytest.mark.controlplane

SERVING_KINDS = {
    "deployment": "Deployment",
    "service": "Service",
    "poddisruptionbudget": "PodDisruptionBudget",
    "horizontalpodautoscaler": "HorizontalPodAutoscaler",
}


def summary(name: str, passed: bool = True, failures: tuple[str, ...] = ()) -> str:
    """The termination message `kubetrain run --termination-log` writes."""
    return json.dumps(
        {
            "model": {"uri": f"/storage/{name}/model", "version": f"{name}-step200"},
            "evaluation": {
                "step": 200,
                "metrics": {"loss": 1.9, "perplexity": 6.7},
                "gate": {"passed": passed, "failures": list(failures)},
            },
        }
    )


def get(kind: str, name: str, namespace: str) -> dict[str, Any] | None:
    proc = kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def served_run(name: str, **changes: Any) -> dict[str, Any]:
    serve = {
        "enabled": True,
        "resources": {"cpu": 1, "memory": "2Gi"},
        "autoscaling": {"minReplicas": 1, "maxReplicas": 3, "targetCpuUtilization": 60},
        **changes,
    }
    return quickstart(name, serve=serve)


def finish_training(doc: dict[str, Any], namespace: str, message: str) -> dict[str, Any]:
    """Apply the run, start its cluster, and let the driver exit 0 with `message`."""
    name = doc["metadata"]["name"]
    apply(doc, namespace)
    head = start_cluster(name, namespace)
    kubelet.set_terminated(namespace, head, 0, message=message)
    return wait_phase(name, namespace, "Succeeded")


def wait_serving_objects(name: str, namespace: str) -> dict[str, dict[str, Any]]:
    found = wait_until(
        lambda: (
            all(objs := {k: get(k, f"{name}-serve", namespace) for k in SERVING_KINDS}.values())
            and objs
        ),
        timeout=60,
        message="the serving objects",
    )
    return {SERVING_KINDS[kind]: obj for kind, obj in zip(SERVING_KINDS, found, strict=True)}


def serving_pods(name: str, namespace: str) -> list[dict[str, Any]]:
    selector = f"app.kubernetes.io/instance={name},app.kubernetes.io/component=serving"
    return [
        p for p in kubelet.pods(namespace, selector) if not p["metadata"].get("deletionTimestamp")
    ]


def test_gate_passed_serves_the_model(operator: None, cluster: Any, namespace: str) -> None:
    st = finish_training(served_run("served"), namespace, summary("served"))
    assert st["model"] == {"uri": "/storage/served/model", "version": "served-step200"}
    assert st["evaluation"]["gate"] == {"passed": True, "failures": []}

    objs = wait_serving_objects("served", namespace)
    for obj in objs.values():
        owner = obj["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["controller"]) == (
            "TrainingRun",
            "served",
            True,
        )
        assert obj["metadata"]["labels"]["app.kubernetes.io/component"] == "serving"
    deployment = objs["Deployment"]
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"][:3] == ["kubetrain", "serve", "/model"]
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    # The folder the driver reported exporting to (status.model.uri).
    assert (mounts["/model"]["subPath"], mounts["/model"]["readOnly"]) == ("served/model", True)
    assert objs["Service"]["spec"]["ports"][0]["port"] == 80
    assert objs["PodDisruptionBudget"]["apiVersion"] == "policy/v1beta1"  # found by discovery
    assert objs["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    assert objs["HorizontalPodAutoscaler"]["spec"]["targetCPUUtilizationPercentage"] == 60

    st = status("served", namespace)
    assert st["serving"] == {
        "service": "served-serve",
        "url": f"http://served-serve.{namespace}.svc/v1",
        "modelVersion": "served-step200",
    }
    assert condition(st, "Serving")["status"] == "False"

    # The server loaded the model: its pod turns Ready, the controllers count it available.
    pod = wait_until(lambda: serving_pods("served", namespace), timeout=60, message="server pod")
    kubelet.set_running(namespace, pod[0]["metadata"]["name"])
    st = wait_until(
        lambda: (
            (s := status("served", namespace)) and condition(s, "Serving")["status"] == "True" and s
        ),
        timeout=60,
        message="Serving=True",
    )
    assert condition(st, "Serving")["reason"] == "Available"
    assert st["phase"] == "Succeeded"
    assert "ServingAvailable" in {e["reason"] for e in events("served", namespace)}

    # Converged: a reconcile with the operator's identity reads, and writes nothing.
    import dataclasses

    import kubernetes

    from kubetrain_operator import serving
    from kubetrain_operator.k8s import Kube
    from kubetrain_operator.reconcile import reconcile
    from kubetrain_operator.settings import OperatorSettings

    client = kubernetes.config.new_client_from_config(config_file=str(cluster.operator_kubeconfig))
    kube = Kube(client)
    version = serving.pdb_api_version(kube.served_versions("policy"))
    settings = dataclasses.replace(OperatorSettings.from_env(), pdb_api_version=version)
    for _ in range(3):
        reconcile(get_run("served", namespace), kube, settings)
    assert sum(kube.mutations.values()) == 0, kube.mutations

    # A serving object deleted by hand comes back (level-based).
    kubectl("delete", "service", "served-serve", "-n", namespace)
    wait_until(lambda: get("service", "served-serve", namespace), timeout=30, message="Service")


def test_gate_failed_serves_nothing(operator: None, namespace: str) -> None:
    message = summary("failing", passed=False, failures=("perplexity 410 > max 200",))
    st = finish_training(quickstart("failing"), namespace, message)
    serving = wait_until(
        lambda: (
            (c := [c for c in status("failing", namespace).get("conditions", [])])
            and next((x for x in c if x["type"] == "Serving"), None)
        ),
        timeout=30,
        message="the Serving condition",
    )
    assert (serving["status"], serving["reason"]) == ("False", "GateFailed")
    assert "perplexity 410 > max 200" in serving["message"]
    assert st["evaluation"]["gate"]["passed"] is False
    time.sleep(3)  # a few resyncs: still nothing
    assert "serving" not in status("failing", namespace)
    for kind in SERVING_KINDS:
        assert get(kind, "failing-serve", namespace) is None, kind
    assert "ServingGateFailed" in {e["reason"] for e in events("failing", namespace)}


def test_deleting_the_run_removes_serving(operator: None, namespace: str) -> None:
    finish_training(served_run("brief"), namespace, summary("brief"))
    wait_serving_objects("brief", namespace)
    kubectl("delete", "tr", "brief", "-n", namespace, "--wait=false")
    wait_until(
        lambda: all(get(kind, "brief-serve", namespace) is None for kind in SERVING_KINDS),
        timeout=60,
        message="garbage collection of the serving objects",
    )


def test_retained_serving_outlives_the_run(operator: None, namespace: str) -> None:
    finish_training(served_run("kept"), namespace, summary("kept"))
    objs = wait_serving_objects("kept", namespace)
    assert all(o["metadata"]["ownerReferences"] for o in objs.values())
    cluster_ip = objs["Service"]["spec"]["clusterIP"]
    # spec.serve may change after the end: retain takes the owner references away.
    apply(served_run("kept", retain=True), namespace)

    def released() -> dict[str, dict[str, Any]] | None:
        found = wait_serving_objects("kept", namespace)
        owned = any("ownerReferences" in o["metadata"] for o in found.values())
        return None if owned else found

    objs = wait_until(released, timeout=30, message="serving objects without owners")
    assert objs["Service"]["spec"]["clusterIP"] == cluster_ip  # updated in place
    # The model's PVC gets the Deployment as a second owner.
    deployment_uid = objs["Deployment"]["metadata"]["uid"]
    wait_until(
        lambda: (
            deployment_uid
            in {
                r["uid"]
                for r in get("pvc", "kept-storage", namespace)["metadata"]["ownerReferences"]
            }
        ),
        timeout=30,
        message="the Deployment as an owner of the PVC",
    )

    kubectl("delete", "tr", "kept", "-n", namespace, "--wait=false")
    wait_until(
        lambda: get("configmap", "kept-config", namespace) is None,
        timeout=60,
        message="garbage collection of the run's children",
    )
    pvc = wait_until(
        lambda: (
            (p := get("pvc", "kept-storage", namespace))
            and [r["kind"] for r in p["metadata"]["ownerReferences"]] == ["Deployment"]
            and p
        ),
        timeout=30,
        message="the PVC kept, owned by the Deployment only",
    )
    assert not pvc["metadata"].get("deletionTimestamp")
    for kind in SERVING_KINDS:
        assert get(kind, "kept-serve", namespace) is not None, kind
