"""The operator, in-process (kopf's KopfRunner), against the real local control plane.

It runs with the operator token, which acts as ServiceAccount kubetrain-system/
kubetrain-operator, bound only by operator/deploy/rbac.yaml: a missing permission fails
these tests. The test plays the kubelet (tests/support/kubelet.py): it moves pod phases,
writes exit codes and evictions, and serves the head's /progress. The `operator` and
`progress` fixtures are in conftest.py.
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
    run_pods,
    start_cluster,
    status,
    wait_phase,
)

pytestmark = pytest.mark.controlplane


def test_lifecycle_from_apply_to_succeeded(
    operator: None, namespace: str, progress: kubelet.FakeProgress
) -> None:
    apply(quickstart("life"), namespace)
    st = wait_phase("life", namespace, "Provisioning")
    assert st["attempts"] == 1
    assert condition(st, "Validated")["status"] == "True"

    # Exactly the children the builders promise.
    for kind, name in [
        ("configmap", "life-config"),
        ("service", "life-head"),
        ("secret", "life-ray-token"),
        ("networkpolicy", "life-ray"),
        ("pvc", "life-storage"),
    ]:
        obj = json.loads(kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout)
        assert obj["metadata"]["ownerReferences"][0]["kind"] == "TrainingRun"
    head_name = start_cluster("life", namespace)
    pod = json.loads(kubectl("get", "pod", head_name, "-n", namespace, "-o", "json").stdout)
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True

    progress.document = {
        "phase": "Running",
        "step": 50,
        "totalSteps": 200,
        "loss": 1.6,
        "tokensPerSecond": 9000.0,
        "latestCheckpoint": {"step": 50, "path": "/storage/life/checkpoints/step-000050"},
    }
    st = wait_until(
        lambda: (s := status("life", namespace)).get("progress", {}).get("step") == 50 and s,
        timeout=30,
        message="progress copied into status",
    )
    assert st["phase"] == "Running"
    assert st["progress"]["percent"] == 25
    assert st["checkpoints"]["latest"]["step"] == 50
    assert condition(st, "ClusterReady")["status"] == "True"
    columns = kubectl("get", "tr", "life", "-n", namespace).stdout.splitlines()[1].split()
    assert columns[:4] == ["life", "Running", "25", "1.6"]

    progress.document = {
        "phase": "Evaluating",
        "step": 200,
        "totalSteps": 200,
        "loss": 0.9,
        "evaluation": {"step": 200, "metrics": {"perplexity": 2.4}, "gate": {"passed": True}},
    }
    wait_phase("life", namespace, "Evaluating", timeout=30)
    kubelet.set_terminated(namespace, head_name, 0)
    st = wait_phase("life", namespace, "Succeeded")
    assert st["completionTime"]
    assert st["evaluation"]["metrics"]["perplexity"] == 2.4
    # Workers are removed; the finished head stays for its logs.
    wait_until(
        lambda: [p["metadata"]["name"] for p in run_pods("life", namespace)] == [head_name],
        timeout=30,
        message="workers deleted after success",
    )
    reasons = {e["reason"] for e in events("life", namespace)}
    assert {"Succeeded"} <= reasons or any("Succeeded" in r for r in reasons), reasons


def test_invalid_spec_fails_with_the_field_and_creates_nothing(
    operator: None, namespace: str
) -> None:
    apply(quickstart("bad", env=[{"name": "WORLD_SIZE", "value": "8"}]), namespace)
    st = wait_phase("bad", namespace, "Failed")
    failed = condition(st, "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "spec.env[0].name" in failed["message"]
    time.sleep(2)  # a couple of resyncs: still nothing
    assert run_pods("bad", namespace) == []
    assert kubectl("get", "configmap", "bad-config", "-n", namespace, check=False).returncode != 0
    assert any(e["type"] == "Warning" for e in events("bad", namespace))


def test_oom_kill_then_success_takes_two_attempts(operator: None, namespace: str) -> None:
    apply(quickstart("oom"), namespace)
    head_name = start_cluster("oom", namespace)
    kubelet.set_terminated(namespace, head_name, 137, "OOMKilled")
    head_name = start_cluster("oom", namespace, attempt=2)
    assert run_pods("oom", namespace, attempt=1) == []
    # The head Service publishes attempt 2's head only: workers never join a dying cluster.
    service = json.loads(kubectl("get", "svc", "oom-head", "-n", namespace, "-o", "json").stdout)
    assert service["spec"]["selector"]["kubetrain.dev/attempt"] == "2"
    kubelet.set_terminated(namespace, head_name, 0)
    st = wait_phase("oom", namespace, "Succeeded")
    assert st["attempts"] == 2


def test_a_retry_waits_until_the_old_attempts_pods_are_gone(operator: None, namespace: str) -> None:
    """The head Service selects every attempt's head: workers of attempt 2 started while
    attempt 1's head is still shutting down could join the dying cluster."""
    apply(quickstart("gone", runPolicy={"backoffSeconds": 0}), namespace)  # no backoff wait
    head_name = start_cluster("gone", namespace)
    # A finalizer keeps the old worker in Terminating, as a slow kubelet would.
    hold = {"metadata": {"finalizers": ["kubetrain.dev/test-hold"]}}
    kubectl(
        "patch", "pod", "gone-a1-worker-0", "-n", namespace, "--type=merge", "-p", json.dumps(hold)
    )
    kubelet.set_terminated(namespace, head_name, 137, "OOMKilled")
    wait_until(
        lambda: status("gone", namespace).get("attempts") == 2,
        timeout=30,
        message="attempt 2 decided",
    )
    wait_until(
        lambda: kubectl(
            "get", "pod", "gone-a1-worker-0", "-n", namespace,
            "-o", "jsonpath={.metadata.deletionTimestamp}",
        ).stdout,
        timeout=30,
        message="the old worker deleted",
    )  # fmt: skip
    time.sleep(5)  # five resyncs of the test operator
    assert [p["metadata"]["name"] for p in run_pods("gone", namespace, attempt=2)] == []
    assert condition(status("gone", namespace), "ClusterReady")["reason"] == "Retrying"

    release = {"metadata": {"finalizers": None}}
    kubectl(
        "patch",
        "pod",
        "gone-a1-worker-0",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps(release),
    )
    wait_until(
        lambda: len(run_pods("gone", namespace, attempt=2)) == 3,
        timeout=30,
        message="attempt 2's head and workers",
    )


def test_exit_1_is_permanent(operator: None, namespace: str) -> None:
    apply(quickstart("bug"), namespace)
    head_name = start_cluster("bug", namespace)
    kubelet.set_terminated(namespace, head_name, 1)
    st = wait_phase("bug", namespace, "Failed")
    assert st["attempts"] == 1
    assert "ExitCode1" in condition(st, "Failed")["reason"]


def test_always_137_fails_after_backoff_limit_plus_one(operator: None, namespace: str) -> None:
    apply(quickstart("flaky", runPolicy={"backoffLimit": 2, "backoffSeconds": 1}), namespace)
    for attempt in (1, 2, 3):
        head_name = start_cluster("flaky", namespace, attempt=attempt)
        kubelet.set_terminated(namespace, head_name, 137, "OOMKilled")
    st = wait_phase("flaky", namespace, "Failed")
    assert st["attempts"] == 3
    assert condition(st, "Failed")["reason"] == "BackoffLimitExceeded"
    time.sleep(2)
    assert status("flaky", namespace)["attempts"] == 3  # and no fourth


def test_eviction_is_not_counted_against_backoff(operator: None, namespace: str) -> None:
    apply(quickstart("evicted", runPolicy={"backoffLimit": 0}), namespace)
    start_cluster("evicted", namespace)
    worker = next(p for p in run_pods("evicted", namespace, 1) if "worker" in p["metadata"]["name"])
    kubelet.evict(namespace, worker["metadata"]["name"])
    head_name = start_cluster("evicted", namespace, attempt=2)
    kubelet.set_terminated(namespace, head_name, 0)
    st = wait_phase("evicted", namespace, "Succeeded")
    assert st["attempts"] == 2
    assert st["evictions"] == 1


def test_deadline_exceeded(operator: None, namespace: str) -> None:
    apply(quickstart("slow", runPolicy={"activeDeadlineSeconds": 3}), namespace)
    start_cluster("slow", namespace)
    st = wait_phase("slow", namespace, "Failed", timeout=30)
    assert condition(st, "Failed")["reason"] == "DeadlineExceeded"
    wait_until(lambda: run_pods("slow", namespace) == [], timeout=30, message="pods removed")


def test_suspend_and_resume(operator: None, namespace: str) -> None:
    apply(quickstart("pause"), namespace)
    start_cluster("pause", namespace)
    apply(quickstart("pause", runPolicy={"suspend": True}), namespace)
    st = wait_phase("pause", namespace, "Suspended")
    assert condition(st, "Suspended")["status"] == "True"
    wait_until(lambda: run_pods("pause", namespace) == [], timeout=30, message="pods removed")
    apply(quickstart("pause", runPolicy={"suspend": False}), namespace)
    # Resuming rebuilds the same attempt (not a failure); it continues from its checkpoint.
    head_name = start_cluster("pause", namespace, attempt=1)
    kubelet.set_terminated(namespace, head_name, 0)
    st = wait_phase("pause", namespace, "Succeeded")
    assert condition(st, "Suspended")["status"] == "False"
    assert st["attempts"] == 1


def test_time_suspended_does_not_count_toward_the_deadline(operator: None, namespace: str) -> None:
    apply(quickstart("nap", runPolicy={"activeDeadlineSeconds": 15}), namespace)
    start_cluster("nap", namespace)
    apply(quickstart("nap", runPolicy={"activeDeadlineSeconds": 15, "suspend": True}), namespace)
    wait_phase("nap", namespace, "Suspended")
    time.sleep(17)  # longer than the deadline, all of it suspended
    assert status("nap", namespace)["phase"] == "Suspended"
    apply(quickstart("nap", runPolicy={"activeDeadlineSeconds": 15, "suspend": False}), namespace)
    start_cluster("nap", namespace, attempt=1)
    st = status("nap", namespace)
    assert st["phase"] != "Failed", st
    assert st["suspendedSeconds"] >= 17
    assert "suspendTime" not in st  # removed from the stored status, not just the draft
    # The clock runs again: the remaining active time passes and the run fails with no
    # further event to wake the operator.
    st = wait_phase("nap", namespace, "Failed", timeout=60)
    assert condition(st, "Failed")["reason"] == "DeadlineExceeded"


def test_ttl_after_finished_deletes_the_run(operator: None, namespace: str) -> None:
    apply(quickstart("brief", runPolicy={"ttlSecondsAfterFinished": 2}), namespace)
    head_name = start_cluster("brief", namespace)
    kubelet.set_terminated(namespace, head_name, 0)
    # Not wait_phase: 2 s after Succeeded the run may already be gone between two polls.
    wait_until(
        lambda: kubectl("get", "tr", "brief", "-n", namespace, check=False).returncode != 0,
        # kopf holds a finalizer while its resync timer runs; releasing it can take a while
        # on a loaded 2-core machine.
        timeout=90,
        message="the run deleted after its TTL",
    )
    # It was deleted after it succeeded, not before: its Succeeded event outlives it.
    succeeded = kubectl(
        "get", "events", "-n", namespace, "-o", "name",
        "--field-selector", "involvedObject.name=brief,reason=Succeeded",
    ).stdout  # fmt: skip
    assert succeeded.strip(), "no Succeeded event for the deleted run"


def test_deleting_the_run_cascades_to_children(operator: None, namespace: str) -> None:
    apply(quickstart("gone", runPolicy={"backoffSeconds": 0}), namespace)  # no backoff wait
    start_cluster("gone", namespace)
    kubectl("delete", "tr", "gone", "-n", namespace, "--wait=false")
    wait_until(
        lambda: (
            run_pods("gone", namespace) == []
            and kubectl("get", "configmap", "gone-config", "-n", namespace, check=False).returncode
        ),
        timeout=60,
        message="garbage collection of pods and ConfigMap",
    )


def test_a_converged_run_makes_no_mutating_calls(
    operator: None, cluster: Any, namespace: str, progress: kubelet.FakeProgress
) -> None:
    """Reconcile the run ourselves, with the operator's identity and a client of our own
    whose writes are counted: once converged, a reconcile only reads."""
    import kubernetes

    from kubetrain_operator.k8s import Kube
    from kubetrain_operator.reconcile import reconcile
    from kubetrain_operator.settings import OperatorSettings

    progress.document = {"phase": "Running", "step": 7, "totalSteps": 200, "loss": 2.0}
    apply(quickstart("steady"), namespace)
    start_cluster("steady", namespace)
    wait_until(
        lambda: status("steady", namespace).get("progress", {}).get("step") == 7,
        timeout=30,
        message="running with progress",
    )

    # Converged: the status no longer changes across several of the operator's resyncs.
    def settled() -> bool:
        first = status("steady", namespace)
        time.sleep(2.5)
        return first == status("steady", namespace)

    wait_until(settled, timeout=30, interval=0, message="the status to settle")
    client = kubernetes.config.new_client_from_config(config_file=str(cluster.operator_kubeconfig))
    kube = Kube(client)
    settings = OperatorSettings.from_env()
    for _ in range(3):
        reconcile(get_run("steady", namespace), kube, settings)
    assert sum(kube.mutations.values()) == 0, kube.mutations
