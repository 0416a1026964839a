"""The operator touches only what its run owns, on the real local control plane.

Child names are deterministic, so another object can hold one: a team's ConfigMap or
Deployment, or what an earlier run of the same name left behind (a finished run keeps its
head pod; `kubectl delete --cascade=orphan` leaves every child). Such an object must stay
exactly as it is, the run must say so (condition ChildConflict and a Warning event) and not
go on with that child; and a run re-created under an old name is a new run: it neither
adopts the old pods, claim or model, nor resumes in the old run's storage folder.

No operator runs here: the test reconciles with the operator's credentials (the chart's
RBAC) and plays the kubelet (tests/support/kubelet.py), so every step is deterministic.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetrain_api import contract
from kubetrain_operator.k8s import Kube
from kubetrain_operator.reconcile import reconcile
from kubetrain_operator.settings import OperatorSettings
from tests.support import kubelet
from tests.support.cluster import kubectl, wait_until
from tests.support.runs import (
    apply,
    condition,
    events,
    get_run,
    quickstart,
    run_pods,
    status,
)

pytestmark = pytest.mark.controlplane

SETTINGS = OperatorSettings()


def reconciled(kube: Kube, name: str, namespace: str, times: int = 2) -> dict[str, Any]:
    """Reconcile `times` passes (a new run's first pass only writes its status)."""
    for _ in range(times):
        reconcile(get_run(name, namespace), kube, SETTINGS)
    return status(name, namespace)


def get(kind: str, name: str, namespace: str) -> dict[str, Any] | None:
    proc = kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def conflict_events(name: str, namespace: str) -> list[dict[str, Any]]:
    return [
        e
        for e in events(name, namespace)
        if e["reason"] == "ChildConflict" and e["type"] == "Warning"
    ]


def finish(kube: Kube, name: str, namespace: str, message: str | None = None) -> str:
    """Create the run's cluster, let its driver exit 0; returns the kept head pod's name."""
    reconciled(kube, name, namespace)
    pods = run_pods(name, namespace, 1)
    assert len(pods) == 3, [p["metadata"]["name"] for p in pods]
    for pod in pods:
        kubelet.set_running(namespace, pod["metadata"]["name"])
    head = f"{name}-a1-head"
    kubelet.set_terminated(namespace, head, 0, message=message)
    assert reconciled(kube, name, namespace)["phase"] == "Succeeded"
    return head


def test_a_foreign_config_map_is_left_alone_and_reported(kube: Kube, namespace: str) -> None:
    team = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "llama-config", "namespace": namespace, "labels": {"team": "a"}},
        "data": {"prompt": "the team's own"},
    }
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(team))
    before = get("configmap", "llama-config", namespace)

    apply(quickstart("llama"), namespace)
    st = reconciled(kube, "llama", namespace, times=3)

    assert get("configmap", "llama-config", namespace) == before  # byte for byte
    clash = condition(st, "ChildConflict")
    assert (clash["status"], clash["reason"]) == ("True", "NotOwned")
    assert "ConfigMap llama-config" in clash["message"]
    assert len(conflict_events("llama", namespace)) == 1  # on the transition, not each pass
    # Nothing is built on someone else's ConfigMap.
    assert run_pods("llama", namespace) == []

    # The team renames theirs: the run goes on, and says the conflict is over.
    kubectl("delete", "configmap", "llama-config", "-n", namespace)
    st = reconciled(kube, "llama", namespace)
    assert len(run_pods("llama", namespace, 1)) == 3
    cm = get("configmap", "llama-config", namespace)
    assert cm is not None
    assert (
        cm["metadata"]["ownerReferences"][0]["uid"]
        == get_run("llama", namespace)["metadata"]["uid"]
    )
    clash = condition(st, "ChildConflict")
    assert (clash["status"], clash["reason"]) == ("False", "Resolved")


def test_a_foreign_deployment_with_the_serving_name_is_left_alone(
    kube: Kube, namespace: str
) -> None:
    team = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "chat-serve", "namespace": namespace},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": "chat"}},
            "template": {
                "metadata": {"labels": {"app": "chat"}},
                "spec": {"containers": [{"name": "chat", "image": "team/chat:1"}]},
            },
        },
    }
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(team))
    before = get("deployment", "chat-serve", namespace)
    assert before is not None

    apply(quickstart("chat", serve={"enabled": True}), namespace)
    result = {
        "model": {"uri": "/storage/chat/model", "version": "chat-step200"},
        "evaluation": {"step": 200, "metrics": {"loss": 1.9}, "gate": {"passed": True}},
    }
    finish(kube, "chat", namespace, message=json.dumps(result))
    st = reconciled(kube, "chat", namespace, times=2)

    after = get("deployment", "chat-serve", namespace)
    assert after is not None
    # The controller-manager writes the Deployment's status; nothing else may change.
    for key in ("labels", "annotations", "ownerReferences", "generation", "uid"):
        assert after["metadata"].get(key) == before["metadata"].get(key), key
    assert after["spec"] == before["spec"]
    clash = condition(st, "ChildConflict")
    assert clash["status"] == "True"
    assert "Deployment chat-serve" in clash["message"]
    assert conflict_events("chat", namespace)
    # Serving stops at the clash: no Service or PDB next to someone else's Deployment.
    assert get("service", "chat-serve", namespace) is None
    assert condition(st, "Serving")["status"] == "False"


def test_a_run_re_created_under_an_old_name_starts_afresh(kube: Kube, namespace: str) -> None:
    apply(quickstart("again"), namespace)
    old_uid = get_run("again", namespace)["metadata"]["uid"]
    head = finish(kube, "again", namespace)
    old_head = get("pod", head, namespace)
    assert old_head is not None
    old_script = old_head["spec"]["containers"][0]["command"][-1]

    # Deleted, leaving its children (a finished head pod, the claim, the ConfigMap, ...)
    # without an owner; then applied again under the same name.
    kubectl("delete", "tr", "again", "-n", namespace, "--cascade=orphan")
    left = {"pod": head, "pvc": "again-storage", "configmap": "again-config"}

    def without_owners() -> dict[str, Any] | None:
        objs = {kind: get(kind, name, namespace) for kind, name in left.items()}
        owned = any(not o or o["metadata"].get("ownerReferences") for o in objs.values())
        return None if owned else objs

    orphaned = wait_until(without_owners, timeout=60, message="the children orphaned")
    apply(quickstart("again"), namespace)
    new_uid = get_run("again", namespace)["metadata"]["uid"]
    assert new_uid != old_uid

    st = reconciled(kube, "again", namespace, times=3)

    # The old head pod (Succeeded, attempt 1) is not the new run's attempt 1.
    assert st.get("phase") != "Succeeded", st
    assert not st.get("model")
    for kind, name in left.items():
        assert get(kind, name, namespace) == orphaned[kind], f"{kind} {name} was modified"
    clash = condition(st, "ChildConflict")
    assert (clash["status"], clash["reason"]) == ("True", "NotOwned")
    assert "again-config" in clash["message"]

    # The user clears the leftovers: the new run builds its own cluster, in its own folder.
    for kind, name in [*left.items(), ("secret", "again-ray-token"), ("service", "again-head")]:
        kubectl("delete", kind, name, "-n", namespace, "--ignore-not-found", "--wait=false")
    kubectl("delete", "networkpolicy", "again-ray", "-n", namespace, "--ignore-not-found")
    wait_until(
        lambda: all(get(k, n, namespace) is None for k, n in left.items()),
        timeout=60,
        message="the leftovers gone",
    )
    st = reconciled(kube, "again", namespace)
    pods = run_pods("again", namespace, 1)
    assert len(pods) == 3
    assert all(p["metadata"]["ownerReferences"][0]["uid"] == new_uid for p in pods)
    new_head = get("pod", "again-a1-head", namespace)
    assert new_head is not None
    script = new_head["spec"]["containers"][0]["command"][-1]
    # Each run resumes only in its own folder (contract.run_folder: keyed by the uid).
    assert f"--run-uid {old_uid} " in old_script
    assert f"--run-uid {new_uid} " in script
    assert contract.run_folder("again", new_uid) != contract.run_folder("again", old_uid)
    assert condition(st, "ChildConflict")["status"] == "False"
    assert st["phase"] == "Provisioning"


def test_pods_of_an_earlier_run_of_the_same_name_are_not_this_runs(
    kube: Kube, namespace: str
) -> None:
    """Garbage collection of a deleted run's pods takes time; until it is done, a pod of
    the earlier run (another owner uid, same labels and names) is neither counted nor
    deleted by the new run, which waits with the condition PreviousRun."""
    apply(quickstart("twice"), namespace)
    run = get_run("twice", namespace)
    # A stand-in for the earlier run's kept head pod, owned by the earlier run's uid; a
    # finalizer keeps it while garbage collection deletes it (the earlier run is gone).
    earlier = "00000000-0000-4000-8000-0000000000ee"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "twice-a1-head",
            "namespace": namespace,
            "labels": {
                contract.LABEL_RUN: "twice",
                contract.LABEL_ROLE: contract.ROLE_HEAD,
                contract.LABEL_ATTEMPT: "1",
            },
            "finalizers": ["kubetrain.dev/test-hold"],
            "ownerReferences": [
                {
                    "apiVersion": run["apiVersion"],
                    "kind": "TrainingRun",
                    "name": "twice",
                    "uid": earlier,
                    "controller": True,
                }
            ],
        },
        "spec": {"containers": [{"name": "ray-head", "image": "old"}]},
    }
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod))
    kubelet.set_terminated(namespace, "twice-a1-head", 0)

    st = reconciled(kube, "twice", namespace, times=3)

    assert st.get("phase") == "Provisioning", st
    clash = condition(st, "ChildConflict")
    assert (clash["status"], clash["reason"]) == ("True", "PreviousRun")
    assert "Pod twice-a1-head" in clash["message"]
    # Nothing of the new run is built past the clash, and the earlier pod is not deleted
    # by the new run (only garbage collection may).
    new_uid = run["metadata"]["uid"]
    assert [
        p
        for p in run_pods("twice", namespace)
        if p["metadata"]["ownerReferences"][0]["uid"] == new_uid
    ] == []
    old = get("pod", "twice-a1-head", namespace)
    assert old is not None
    assert old["metadata"]["ownerReferences"][0]["uid"] == earlier

    kubectl(
        "patch", "pod", "twice-a1-head", "-n", namespace, "--type=merge",
        "-p", json.dumps({"metadata": {"finalizers": None}}),
    )  # fmt: skip
    wait_until(
        lambda: (
            (p := get("pod", "twice-a1-head", namespace)) is None
            or p["metadata"]["ownerReferences"][0]["uid"] != earlier
        ),
        timeout=60,
        message="the earlier run's pod collected",
    )
    st = reconciled(kube, "twice", namespace)
    head = get("pod", "twice-a1-head", namespace)
    assert head is not None
    assert head["metadata"]["ownerReferences"][0]["uid"] == new_uid
    assert condition(st, "ChildConflict")["status"] == "False"
