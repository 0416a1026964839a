"""The local control plane (hack/controlplane.py) is a real Kubernetes 1.20.2.

These check what the operator's tests rely on: the API version, the controllers
(Deployment -> ReplicaSet -> Pod, garbage collection), the scheduler, RBAC for the operator's
ServiceAccount identity, and helm.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import Cluster, kubectl, wait_until

pytestmark = pytest.mark.controlplane

DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {app: web}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
        - name: web
          image: registry.invalid/web:1
"""


def get_json(*args: str, **kwargs: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(kubectl(*args, "-o", "json", **kwargs).stdout)
    return data


def items(kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = get_json("get", kind, "-n", namespace, "-l", selector)["items"]
    return found


def exists(kind: str, name: str, namespace: str) -> bool:
    out = kubectl("get", kind, name, "-n", namespace, "--ignore-not-found", "-o", "name")
    return bool(out.stdout.strip())


def controller_of(obj: dict[str, Any]) -> dict[str, Any]:
    refs = [r for r in obj["metadata"].get("ownerReferences", []) if r.get("controller")]
    assert len(refs) == 1, obj["metadata"]
    ref: dict[str, Any] = refs[0]
    return ref


def test_apiserver_is_kubernetes_1_20_2(cluster: Cluster) -> None:
    version = json.loads(kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.20.2"
    # Also straight over HTTPS, verifying the serving certificate against the cluster's CA.
    if cluster.ca_file is not None:
        ctx = ssl.create_default_context(cafile=str(cluster.ca_file))
        with urllib.request.urlopen(f"{cluster.server}/version", context=ctx, timeout=10) as r:
            assert json.load(r)["gitVersion"] == "v1.20.2"


def test_deployment_gets_replicaset_and_pods(cluster: Cluster, namespace: str) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=DEPLOYMENT)
    deployment = get_json("get", "deployment", "web", "-n", namespace)

    replicasets = wait_until(
        lambda: items("replicasets", namespace, "app=web"),
        message="a ReplicaSet for the Deployment",
    )
    assert len(replicasets) == 1
    rs = replicasets[0]
    owner = controller_of(rs)
    assert (owner["kind"], owner["uid"]) == ("Deployment", deployment["metadata"]["uid"])

    def two_pods() -> list[dict[str, Any]]:
        pods = items("pods", namespace, "app=web")
        return pods if len(pods) == 2 else []

    pods = wait_until(two_pods, message="2 pods from the ReplicaSet")
    for pod in pods:
        owner = controller_of(pod)
        assert (owner["kind"], owner["uid"]) == ("ReplicaSet", rs["metadata"]["uid"])
        assert pod["status"]["phase"] == "Pending"  # no kubelet: nothing ever runs

    def unschedulable() -> bool:
        # The scheduler has looked at each pod and found no node for it.
        for pod in items("pods", namespace, "app=web"):
            conds = {c["type"]: c for c in pod["status"].get("conditions", [])}
            cond = conds.get("PodScheduled", {})
            if (cond.get("status"), cond.get("reason")) != ("False", "Unschedulable"):
                return False
        return True

    wait_until(unschedulable, message="the scheduler to mark the pods Unschedulable")


def test_deleting_a_deployment_cascades_to_replicasets_and_pods(
    cluster: Cluster, namespace: str
) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=DEPLOYMENT)
    wait_until(lambda: len(items("pods", namespace, "app=web")) == 2, message="2 pods")

    kubectl("delete", "deployment", "web", "-n", namespace, "--cascade=background")

    wait_until(
        lambda: not items("replicasets", namespace, "app=web"),
        message="the ReplicaSet to be garbage collected",
    )
    wait_until(
        lambda: not items("pods", namespace, "app=web"), message="the pods to be garbage collected"
    )


def test_owner_reference_garbage_collection(cluster: Cluster, namespace: str) -> None:
    kubectl("create", "configmap", "owner", "-n", namespace)
    owner_uid = get_json("get", "configmap", "owner", "-n", namespace)["metadata"]["uid"]
    child = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "child",
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner_uid}
            ],
        },
        "data": {"k": "v"},
    }
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(child))
    assert exists("configmap", "child", namespace)

    kubectl("delete", "configmap", "owner", "-n", namespace)

    wait_until(
        lambda: not exists("configmap", "child", namespace),
        message="the child ConfigMap to be garbage collected",
    )


def test_operator_is_forbidden_until_a_rolebinding_grants_access(
    cluster: Cluster, namespace: str
) -> None:
    if cluster.operator_kubeconfig is None:
        pytest.skip("attached cluster has no operator kubeconfig")
    operator = cluster.operator_kubeconfig

    denied = kubectl("get", "pods", "-n", namespace, kubeconfig=operator, check=False)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower()
    assert "system:serviceaccount:kubetrain-system:kubetrain-operator" in denied.stderr

    rbac = f"""
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: pod-reader, namespace: {namespace}}}
rules:
  - apiGroups: [""]
    resources: [pods]
    verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: operator-pod-reader, namespace: {namespace}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: pod-reader}}
subjects:
  - kind: ServiceAccount
    name: kubetrain-operator
    namespace: kubetrain-system
"""
    kubectl("apply", "-f", "-", input=rbac)

    wait_until(
        lambda: (
            kubectl("get", "pods", "-n", namespace, kubeconfig=operator, check=False).returncode
            == 0
        ),
        timeout=30,
        message="the RoleBinding to take effect",
    )
    # The grant is exactly what the Role says: not other namespaces, not other verbs.
    elsewhere = kubectl("get", "pods", "-n", "default", kubeconfig=operator, check=False)
    assert elsewhere.returncode != 0
    assert "forbidden" in elsewhere.stderr.lower()
    create = kubectl("create", "configmap", "x", "-n", namespace, kubeconfig=operator, check=False)
    assert create.returncode != 0
    assert "forbidden" in create.stderr.lower()


def helm(cluster: Cluster, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = cluster.env()
    # Keep helm's config/cache/data out of the user's home.
    for var in ("HELM_CONFIG_HOME", "HELM_CACHE_HOME", "HELM_DATA_HOME"):
        env[var] = str(home / var.lower())
    return subprocess.run(
        [str(cluster.helm), *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_helm_version_runs(cluster: Cluster, tmp_path: Path) -> None:
    proc = helm(cluster, tmp_path, "version")
    assert proc.returncode == 0, proc.stderr
    assert "Version:" in proc.stdout


def test_helm_installs_a_chart(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    chart = tmp_path / "demo"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: demo\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("greeting: hello\n")
    (chart / "templates" / "configmap.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-config\n"
        "data:\n  greeting: {{ .Values.greeting | quote }}\n"
    )

    proc = helm(
        cluster, tmp_path, "install", "demo", str(chart), "-n", namespace, "--set", "greeting=hi"
    )
    assert proc.returncode == 0, proc.stderr

    data = get_json("get", "configmap", "demo-config", "-n", namespace)["data"]
    assert data == {"greeting": "hi"}
