"""The chart's RBAC is exactly what the operator uses, read from the API server's audit log.

The local control plane logs every request of the operator's identity (hack/controlplane.py,
Metadata level). The operator runs in-process with exactly the chart's rendered RBAC
(`helm template`) and is driven through every path that calls the API server: a run with
progress, a retry whose children were changed behind its back (read and replaced), a pod
name taken by a stranger (create, 409, read), success, serving created, retained
(replaced, the storage claim patched), turned off (deleted), and ttlSecondsAfterFinished
(the run deleted). The (verb, API group, resource) set of those requests, 403s included,
plus the grants only admission checks (ADMISSION_ONLY), must equal the ClusterRole's
grants: nothing missing, nothing extra. A second short run
with `--namespace` (the chart's watchNamespaces) splits the grants between the Role in the
watched namespace and the cluster-scoped ClusterRole.

Re-run this after any change to what the operator calls (k8s.py, kopf settings, leader
election, finalizers): a new call fails it until the chart grants it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

from kubetrain_operator.names import ChildNames
from tests.helm.chart import template
from tests.operator.test_serving_controlplane import (
    SERVING_KINDS,
    get,
    served_run,
    serving_pods,
    summary,
    wait_serving_objects,
)
from tests.support import kubelet
from tests.support.cluster import controlplane, kubectl, wait_until
from tests.support.operators import in_process_operator
from tests.support.runs import (
    RBAC,
    apply,
    get_run,
    quickstart,
    start_cluster,
    status,
    wait_phase,
    wait_pods,
)

pytestmark = pytest.mark.controlplane

RBAC_KINDS = ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
# Checked by admission, never requested: the OwnerReferencesPermissionEnforcement plugin
# (on in the local control plane, as on OpenShift) lets only who may delete an object change
# its owner references (the storage claim of a retained server), and only who may update the
# owner's finalizers set blockOwnerDeletion (every child of a run).
ADMISSION_ONLY = {
    ("update", "kubetrain.dev", "trainingruns/finalizers"),
    ("update", "kubetrain.dev", "modelservices/finalizers"),
    ("delete", "", "persistentvolumeclaims"),
}
INPUT_HASH = "kubetrain.dev/input-hash"


class Request(NamedTuple):
    verb: str
    group: str
    resource: str  # with its subresource: trainingruns/status
    namespaced: bool  # False: cluster-scoped, or across all namespaces
    allowed: bool  # False: forbidden by RBAC or by an admission plugin


def audit_offset(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def audited(path: Path, since: int) -> set[Request]:
    """The operator's resource requests logged after byte `since`. Non-resource requests
    (discovery: /api, /apis, /version) are left out: every authenticated user may make
    them (system:discovery), and the chart grants no nonResourceURLs."""
    out: set[Request] = set()
    if not path.exists():  # created by the first logged request
        return out
    with path.open("rb") as file:
        file.seek(since)
        for line in file:
            event = json.loads(line)
            if event["user"]["username"] != controlplane.OPERATOR_USER:
                continue
            ref = event.get("objectRef")
            if ref is None:
                continue
            resource = ref["resource"] + (
                f"/{ref['subresource']}" if ref.get("subresource") else ""
            )
            decision = event.get("annotations", {}).get("authorization.k8s.io/decision")
            code = event.get("responseStatus", {}).get("code")
            out.add(
                Request(
                    event["verb"],
                    ref.get("apiGroup", ""),
                    resource,
                    bool(ref.get("namespace")),
                    decision != "forbid" and code != 403,  # 403: RBAC or admission
                )
            )
    return out


def grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (verb, group, resource)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def used(requests: set[Request]) -> set[tuple[str, str, str]]:
    return {(r.verb, r.group, r.resource) for r in requests}


def rbac_docs(values: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [d for d in template(values) if d["kind"] in RBAC_KINDS]


def rules(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [rule for d in docs if d["kind"] == kind for rule in d["rules"]]


@contextlib.contextmanager
def chart_rbac(values: dict[str, Any] | None) -> Iterator[list[dict[str, Any]]]:
    """Only the chart's rendered RBAC binds the operator token for the block; the static
    operator/deploy/rbac.yaml that the other modules use comes back after it."""
    kubectl("create", "namespace", controlplane.OPERATOR_NAMESPACE, check=False)
    kubectl("delete", "-f", str(RBAC), "--ignore-not-found")
    docs = rbac_docs(values)
    manifest = yaml.safe_dump_all(docs)
    kubectl("apply", "-f", "-", input=manifest)
    # The authorizer's cache follows RBAC changes a moment later: a request in between
    # would be refused and counted as used but not granted.
    can_i = ["auth", "can-i", "create", "events", "--all-namespaces"]
    if values is None:  # the ClusterRole grants it everywhere
        wait_until(
            lambda: (
                kubectl(*can_i, "--as", controlplane.OPERATOR_USER, check=False).stdout.strip()
                == "yes"
            ),
            timeout=30,
            message="the chart's RBAC in effect",
        )
    try:
        yield docs
    finally:
        kubectl("delete", "-f", "-", "--ignore-not-found", input=manifest)
        kubectl("apply", "-f", str(RBAC))


def gone(kind: str, name: str, namespace: str) -> bool:
    return kubectl("get", kind, name, "-n", namespace, check=False).returncode != 0


def every_path(namespace: str, progress: kubelet.FakeProgress, log: Path, since: int) -> None:
    """Drive the operator through every code path that calls the API server."""
    # A stranger's pod holds the name of a run's head: the create answers 409 and the
    # operator reads the pod.
    decoy = ChildNames("clash", 1).head_pod
    kubectl("run", decoy, "-n", namespace, "--image=busybox", "--restart=Never")
    apply(quickstart("clash", serve={"enabled": False}), namespace)
    wait_until(
        lambda: ("get", "", "pods") in used(audited(log, since)),
        timeout=60,
        message="the operator to read the pod in its way",
    )
    kubectl("delete", "tr", "clash", "-n", namespace, "--wait=false")

    # A run with the finalizer older operators (a kopf timer per run) left: kopf patches it
    # away, or the run could never be deleted without the operator.
    legacy = quickstart("legacy", serve={"enabled": False}, runPolicy={"suspend": True})
    legacy["metadata"]["finalizers"] = ["kubetrain.dev/finalizer"]
    apply(legacy, namespace)
    wait_until(
        lambda: not get_run("legacy", namespace)["metadata"].get("finalizers"),
        timeout=60,
        message="the old finalizer removed",
    )
    kubectl("delete", "tr", "legacy", "-n", namespace, "--wait=false")

    apply(served_run("life"), namespace)
    head = start_cluster("life", namespace)
    progress.document = {"phase": "Running", "step": 50, "totalSteps": 200, "loss": 1.6}
    wait_until(
        lambda: status("life", namespace).get("progress", {}).get("step") == 50,
        timeout=30,
        message="progress in the status",
    )
    # Children changed behind the operator's back: the retry's creates answer 409, and the
    # operator reads them and replaces those it may.
    changed = [
        ("configmap", ChildNames("life").config),
        ("secret", ChildNames("life").ray_token),
        ("networkpolicy", ChildNames("life").network_policy),
        ("service", ChildNames("life").head_service),
    ]
    for kind, name in changed:
        kubectl("annotate", kind, name, "-n", namespace, f"{INPUT_HASH}=stale", "--overwrite")
    kubelet.set_terminated(namespace, head, 137, "OOMKilled")
    head = start_cluster("life", namespace, attempt=2)
    wait_until(
        lambda: all(
            (get(kind, name, namespace) or {})["metadata"]["annotations"][INPUT_HASH] != "stale"
            for kind, name in changed
        ),
        timeout=30,
        message="the changed children replaced",
    )
    kubelet.set_terminated(namespace, head, 0, message=summary("life"))
    wait_phase("life", namespace, "Succeeded")

    # Serving: created, its pod ready, then retained (every object replaced without its
    # owner reference, the storage claim patched), then turned off (deleted).
    wait_serving_objects("life", namespace)
    (pod,) = wait_until(lambda: serving_pods("life", namespace), message="the server pod")
    kubelet.set_running(namespace, pod["metadata"]["name"])
    apply(served_run("life", retain=True), namespace)
    wait_until(
        lambda: (
            "Deployment"
            in {
                r["kind"]
                for r in get("pvc", ChildNames("life").storage, namespace)["metadata"].get(
                    "ownerReferences", []
                )
            }
        ),
        timeout=30,
        message="the Deployment as an owner of the storage claim",
    )
    apply(quickstart("life", serve={"enabled": False}), namespace)
    wait_until(
        lambda: all(get(kind, "life-serve", namespace) is None for kind in SERVING_KINDS),
        timeout=30,
        message="the serving objects deleted",
    )
    # A ModelService serving the run's model: resolved from the run, its children built
    # (router ConfigMap, claim, Deployments, Services, PDBs), its status written.
    apply(served_model_service("life"), namespace)
    wait_until(
        lambda: (get("modelservice", "life-ms", namespace) or {}).get("status", {}).get("traffic"),
        timeout=60,
        message="the ModelService's children built",
    )
    wait_until(
        lambda: get("deployment", "life-ms-router", namespace) is not None,
        timeout=30,
        message="the router's Deployment",
    )
    # Its continuous evaluation: a baseline Job (read, created), deleted with spec.evaluation.
    evaluated = served_model_service("life")
    evaluated["spec"]["evaluation"] = {
        "schedule": "0 0 1 1 *",
        "heldOut": "pvc://data/held.jsonl",
        "metrics": ["perplexity"],
    }
    apply(evaluated, namespace)
    jobs = wait_until(
        lambda: kubectl("get", "jobs", "-n", namespace, "-o", "name").stdout.split(),
        timeout=30,
        message="the evaluation Job",
    )
    apply(served_model_service("life"), namespace)
    wait_until(
        lambda: (
            not kubectl(
                "get", *jobs, "-n", namespace, "--ignore-not-found", "-o", "name"
            ).stdout.strip()
        ),
        timeout=30,
        message="the evaluation Job deleted with spec.evaluation",
    )
    # Its retraining loop: a scheduled trigger (the next minute) creates the feedback
    # export Job; the Job's pod "finishes" with a snapshot; the operator reads the Job and
    # its pod and creates the retraining TrainingRun.
    apply(served_model_service("life", retraining=True), namespace)
    job = "life-ms-feedback-1"
    wait_until(lambda: get("job", job, namespace), timeout=90, message="the export Job")
    (pod,) = wait_until(
        lambda: json.loads(
            kubectl("get", "pods", "-n", namespace, "-l", f"job-name={job}", "-o", "json").stdout
        )["items"],
        timeout=30,
        message="the export Job's pod",
    )
    snapshot = {"id": "5f0c1d2e3a4b", "uri": "/snapshots/life/5f0c1d2e3a4b", "sft": 3}
    kubelet.set_terminated(namespace, pod["metadata"]["name"], 0, message=json.dumps(snapshot))
    wait_until(
        lambda: get("tr", "life-ms-retrain-1", namespace),
        timeout=60,
        message="the retraining TrainingRun",
    )
    # ttlSecondsAfterFinished: the operator deletes the run.
    ttl = {"ttlSecondsAfterFinished": 1}
    apply(quickstart("life", serve={"enabled": False}, runPolicy=ttl), namespace)
    for run in ("life", "clash"):
        wait_until(lambda r=run: gone("tr", r, namespace), timeout=90, message=f"{run} deleted")


def served_model_service(run: str, retraining: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"variants": [{"name": "a", "source": {"trainingRun": run}}]}
    if retraining:
        spec["retraining"] = {
            "triggers": {"schedule": "* * * * *"},
            "feedback": {"destination": "pvc://snapshots/life"},
            "template": {"spec": quickstart("x")["spec"]},
        }
    return {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "ModelService",
        "metadata": {"name": f"{run}-ms"},
        "spec": spec,
    }


def watched_namespace_run(namespace: str) -> None:
    apply(quickstart("scoped", serve={"enabled": False}), namespace)
    wait_pods("scoped", namespace, 1, 3)
    kubectl("delete", "tr", "scoped", "-n", namespace, "--wait=false")
    wait_until(lambda: gone("tr", "scoped", namespace), timeout=60, message="scoped deleted")


def run_audited(cluster: Any, scope: list[str], drive: Any, env: dict[str, str]) -> set[Request]:
    """The operator's requests while `drive()` runs it; failures name what was forbidden."""
    log = cluster.audit_log
    since = audit_offset(log)
    try:
        with in_process_operator(cluster.operator_kubeconfig, *scope, **env):
            drive(log, since)
    except BaseException as exc:
        denied = sorted({r for r in audited(log, since) if not r.allowed})
        raise AssertionError(f"the operator failed; requests forbidden: {denied}") from exc
    return audited(log, since)


def diff(granted: set[tuple[str, str, str]], needed: set[tuple[str, str, str]]) -> str:
    extra, missing = sorted(granted - needed), sorted(needed - granted)
    return f"granted, never used: {extra}; used, not granted: {missing}"


def test_rbac_grants_exactly_the_audited_requests(
    cluster: Any, crd_installed: None, namespace: str, progress: kubelet.FakeProgress
) -> None:
    if not (cluster.dir / "audit-policy.yaml").exists():
        pytest.skip("the control plane writes no audit log (started by an older hack/)")
    env = {"KUBETRAIN_PROGRESS_PORT": str(progress.port), "KUBETRAIN_PROGRESS_HOST": "127.0.0.1"}

    # Every namespace (the chart's default): one ClusterRole.
    with chart_rbac(None) as docs:
        everywhere = run_audited(
            cluster,
            ["--all-namespaces"],
            lambda log, since: every_path(namespace, progress, log, since),
            env,
        )
    assert not {r for r in everywhere if not r.allowed}
    granted = grants(rules(docs, "ClusterRole"))
    needed = used(everywhere) | ADMISSION_ONLY
    assert granted == needed, diff(granted, needed)

    # watchNamespaces: Roles where runs live, the ClusterRole for cluster-scoped requests.
    with chart_rbac({"watchNamespaces": [namespace]}) as docs:
        scoped = run_audited(
            cluster,
            ["--namespace", namespace],
            lambda log, since: watched_namespace_run(namespace),
            env,
        )
    assert not {r for r in scoped if not r.allowed}
    granted = grants(rules(docs, "ClusterRole"))
    needed = used({r for r in scoped if not r.namespaced})
    assert granted == needed, diff(granted, needed)
    granted = grants(rules(docs, "Role"))
    needed = used({r for r in everywhere | scoped if r.namespaced}) | ADMISSION_ONLY
    assert granted == needed, diff(granted, needed)
