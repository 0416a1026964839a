"""The chart on the real control plane: helm install, upgrade and uninstall, and the
operator reconciling runs with exactly the permissions the chart grants.

The operator pod itself cannot run here (no kubelet, no image), so the operator runs in
this process (kopf's KopfRunner) with the operator token, whose identity is the chart's
ServiceAccount kubetrain-system/kubetrain-operator: only the chart's bindings apply to it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from kubetrain_api import crd
from tests.helm.chart import (
    CHART,
    NAMESPACE,
    RELEASE,
    helm,
    install_release,
    operator_identity_from_chart,
)
from tests.support.cluster import Cluster, kubectl, wait_until
from tests.support.operators import in_process_operator
from tests.support.runs import apply, quickstart, run_pods, wait_phase

pytestmark = pytest.mark.controlplane

NAME = "kubetrain-operator"  # the Deployment, Service, ClusterRole, Roles (release kubetrain)
WEBHOOK_TLS = f"{NAME}-webhook-tls"
# The operator's pod cannot run here, so nothing answers the chart's webhook: it checks only
# namespaces with this label, which the test namespaces lack (tests/operator/
# test_webhook_controlplane.py drives the webhook itself).
LABELLED = {"matchLabels": {"kubetrain.dev/webhook": "on"}}
WEBHOOK_VALUES = {"webhook": {"namespaceSelector": LABELLED}}
# Grafana dashboards ship as ConfigMaps by default (when the chart has any).
DASHBOARDS = next(iter(sorted((CHART / "dashboards").glob("*.json"))), None)


def get(kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
    args = ["get", kind, name, "-o", "json", "--ignore-not-found"]
    if namespace:
        args += ["-n", namespace]
    out = kubectl(*args).stdout
    return json.loads(out) if out.strip() else None


def can_i(cluster: Cluster, verb: str, resource: str, namespace: str) -> bool:
    """Whether the operator token may do it (a SelfSubjectAccessReview)."""
    out = kubectl(
        "auth",
        "can-i",
        verb,
        resource,
        "-n",
        namespace,
        kubeconfig=cluster.operator_kubeconfig,
        check=False,
    )
    return out.stdout.strip() == "yes"


def operator(cluster: Cluster, *scope: str) -> contextlib.AbstractContextManager[None]:
    """The operator in this process with the operator token; `scope` as kopf's CLI takes it."""
    return in_process_operator(cluster.operator_kubeconfig, *scope)


def reconciles(name: str, namespace: str) -> None:
    """The run gets its children and its first attempt's pods: the operator could do all
    of that with the permissions it has."""
    apply(quickstart(name), namespace)
    wait_phase(name, namespace, "Provisioning")
    for kind, child in [
        ("configmap", f"{name}-config"),
        ("secret", f"{name}-ray-token"),
        ("networkpolicy", f"{name}-ray"),
        ("service", f"{name}-head"),
    ]:
        assert get(kind, child, namespace), f"{kind} {child}"
    wait_until(lambda: len(run_pods(name, namespace, 1)) == 3, message=f"{name}'s 3 pods")


@pytest.fixture
def chart_owns_the_operator_identity(cluster: Cluster, crd_installed: None) -> Iterator[None]:
    with operator_identity_from_chart(cluster):
        yield


def webhook_ca() -> str:
    """The CA in the webhook's Secret, which must be the one the API server trusts."""
    secret = get("secret", WEBHOOK_TLS, NAMESPACE)
    config = get("validatingwebhookconfiguration", NAME)
    assert secret is not None
    assert config is not None
    (hook,) = config["webhooks"]
    assert hook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    return str(secret["data"]["ca.crt"])


def test_install_upgrade_uninstall(
    cluster: Cluster, namespace: str, chart_owns_the_operator_identity: None
) -> None:
    # Install: the operator watches every namespace; the CRD is already there (kubectl
    # applied it), which Helm's crds/ handling accepts.
    install_release(cluster, WEBHOOK_VALUES)
    ca = webhook_ca()
    deployment = get("deployment", NAME, NAMESPACE)
    assert deployment is not None
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    # The API server accepted the pod template and the controller-manager made the pod
    # (which stays Pending: nothing runs pods here).
    pods = wait_until(
        lambda: json.loads(
            kubectl(
                "get", "pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/name=" + NAME, "-o", "json"
            ).stdout
        )["items"],
        message="the operator's pod",
    )
    assert pods[0]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pods[0]["spec"]["serviceAccountName"] == NAME
    binding = get("clusterrolebinding", NAME)
    assert binding is not None
    assert binding["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert can_i(cluster, "create", "pods", "default")
    assert not can_i(cluster, "list", "secrets", namespace)

    with operator(cluster, "--all-namespaces"):
        reconciles("helm-all", namespace)

    # Upgrade: watch only this namespace, resync faster, two replicas. The Deployment
    # follows, the namespaced permissions move from the ClusterRole into a Role in the
    # namespace, and the replicas elect a leader through the release's Lease.
    helm(
        "upgrade",
        RELEASE,
        str(CHART),
        "-n",
        NAMESPACE,
        "--reuse-values",
        values={
            "watchNamespaces": [namespace],
            "operator": {"resyncSeconds": 5},
            "replicas": 2,
        },
        kubeconfig=cluster.kubeconfig,
    )
    # The webhook's certificate survives the upgrade (`lookup`): the caBundle and the
    # Secret the operator serves still match.
    assert webhook_ca() == ca
    deployment = get("deployment", NAME, NAMESPACE)
    assert deployment is not None
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert f"--namespace={namespace}" in container["args"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBETRAIN_RESYNC_SECONDS"] == "5"
    assert (env["KUBETRAIN_LEADER_ELECTION"], env["KUBETRAIN_LEASE_NAME"]) == ("true", NAME)
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert get("role", f"{NAME}-leader-election", NAMESPACE) is not None
    assert get("role", NAME, namespace) is not None
    assert get("rolebinding", NAME, namespace) is not None
    assert can_i(cluster, "create", "pods", namespace)
    assert not can_i(cluster, "create", "pods", "default")
    assert can_i(cluster, "watch", "customresourcedefinitions", "default")

    leader_election = {
        "KUBETRAIN_LEADER_ELECTION": "true",
        "KUBETRAIN_LEASE_NAME": NAME,
        "KUBETRAIN_OPERATOR_NAMESPACE": NAMESPACE,
    }
    with in_process_operator(
        cluster.operator_kubeconfig, "--namespace", namespace, **leader_election
    ):
        reconciles("helm-one", namespace)  # as the leader: the chart's Role lets it lead
        lease = get("lease", NAME, NAMESPACE)
        assert lease is not None
        assert lease["spec"]["holderIdentity"]

    # Uninstall: everything of the release goes, the CRD (and so the runs) stays.
    manifest = helm("get", "manifest", RELEASE, "-n", NAMESPACE, kubeconfig=cluster.kubeconfig)
    objects = [
        (d["kind"], d["metadata"]["name"], d["metadata"].get("namespace", NAMESPACE))
        for d in yaml.safe_load_all(manifest.stdout)
        if d
    ]
    assert ("Role", NAME, namespace) in objects
    assert ("Secret", WEBHOOK_TLS, NAMESPACE) in objects
    assert ("ValidatingWebhookConfiguration", NAME, NAMESPACE) in objects  # cluster-scoped
    assert ("ConfigMap" in {kind for kind, _, _ in objects}) is (DASHBOARDS is not None)
    helm("uninstall", RELEASE, "-n", NAMESPACE, "--wait", kubeconfig=cluster.kubeconfig)
    for kind, name, ns in objects:
        wait_until(lambda: get(kind, name, ns) is None, message=f"{kind} {name} to go")  # noqa: B023
    assert get("crd", crd.CRD_NAME) is not None
    assert get("tr", "helm-one", namespace) is not None
    assert not can_i(cluster, "create", "pods", namespace)
    # No finalizer on the runs: they and their namespace can go without the operator.
    for run in ("helm-all", "helm-one"):
        found = get("tr", run, namespace)
        assert found is not None, run
        assert not found["metadata"].get("finalizers"), run
