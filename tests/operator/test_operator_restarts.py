"""Killing the operator at any moment is safe (RELIABILITY.md 5): the real `kubetrain
operator` process is SIGKILLed at random points of a run's life and restarted; the run
still converges with exactly one set of children and never leaves a terminal phase.

Also checks the process's liveness and metrics endpoints, since it is the real command.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import kubelet
from tests.support.cluster import kubectl, wait_until
from tests.support.operators import OperatorProcess
from tests.support.runs import (
    RBAC,
    apply,
    quickstart,
    run_pods,
    status,
    wait_phase,
)

pytestmark = pytest.mark.controlplane


@pytest.fixture
def operator_process(
    cluster: Any, crd_installed: None, progress: kubelet.FakeProgress
) -> Iterator[OperatorProcess]:
    kubectl("create", "namespace", "kubetrain-system", check=False)
    kubectl("apply", "-f", str(RBAC))
    op = OperatorProcess(str(cluster.operator_kubeconfig), progress.port)
    op.start()
    yield op
    if op.proc and op.proc.poll() is None:
        op.kill()


@pytest.fixture(scope="module")
def progress() -> Iterator[kubelet.FakeProgress]:
    server = kubelet.FakeProgress()
    yield server
    server.close()


def children(name: str, namespace: str) -> dict[str, list[str]]:
    out = {}
    for kind in ("configmaps", "services", "networkpolicies", "persistentvolumeclaims"):
        items = json.loads(
            kubectl(
                "get", kind, "-n", namespace, "-l", f"kubetrain.dev/run={name}", "-o", "json"
            ).stdout
        )["items"]
        out[kind] = [i["metadata"]["name"] for i in items]
    out["pods"] = sorted(p["metadata"]["name"] for p in run_pods(name, namespace))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_killed_operator_converges_with_one_set_of_children(
    seed: int, operator_process: OperatorProcess, namespace: str
) -> None:
    rng = random.Random(seed)
    op, name = operator_process, f"kill{seed}"

    def kill_and_restart() -> None:
        time.sleep(rng.uniform(0.0, 2.0))  # somewhere inside a reconcile, or between two
        op.kill()
        op.start()

    apply(quickstart(name), namespace)
    kill_and_restart()
    pods = wait_until(
        lambda: len(p := run_pods(name, namespace)) == 3 and p, timeout=60, message="3 pods"
    )
    for pod in pods:
        kubelet.set_running(namespace, pod["metadata"]["name"])
    kill_and_restart()
    wait_phase(name, namespace, "Running")
    head = next(p["metadata"]["name"] for p in pods if p["metadata"]["name"].endswith("-head"))
    kubelet.set_terminated(namespace, head, 0)
    kill_and_restart()
    st = wait_phase(name, namespace, "Succeeded")
    assert st["attempts"] == 1  # the kills caused no retry
    wait_until(
        lambda: children(name, namespace)["pods"] == [head], timeout=30, message="workers gone"
    )
    assert children(name, namespace) == {
        "configmaps": [f"{name}-config"],
        "services": [f"{name}-head"],
        "networkpolicies": [f"{name}-ray"],
        "persistentvolumeclaims": [f"{name}-storage"],
        "pods": [head],
    }

    # A restart after the end never regresses the terminal phase.
    op.kill()
    op.start()
    time.sleep(4)
    assert status(name, namespace)["phase"] == "Succeeded"


def test_liveness_and_metrics_endpoints(operator_process: OperatorProcess, namespace: str) -> None:
    op = operator_process
    apply(quickstart("watched"), namespace)
    wait_phase("watched", namespace, "Provisioning")
    wait_until(lambda: _ok(op, op.liveness, "/healthz"), timeout=30, message="liveness")
    # A new run's first reconcile only writes its status (Provisioning), the next creates
    # its pods: wait for both (a bare 'phase="Provisioning"' is always listed, with 0).
    text = wait_until(
        lambda: (
            (t := _get(op, op.metrics, "/metrics"))
            and 'kubetrain_operator_runs{phase="Provisioning"} 1.0' in t
            and 'kubetrain_operator_api_calls_total{resource="Pod",verb="create"}' in t
            and t
        ),
        timeout=30,
        message="runs by phase and pod creations in the metrics",
    )
    assert "kubetrain_operator_reconcile_duration_seconds_bucket" in text
    # A deleted run leaves the phase gauge (no per-run series exist at all).
    kubectl("delete", "tr", "watched", "-n", namespace)
    wait_until(
        lambda: (
            'kubetrain_operator_runs{phase="Provisioning"} 0.0' in _get(op, op.metrics, "/metrics")
        ),
        timeout=30,
        message="the deleted run to leave the counts",
    )


def _get(op: OperatorProcess, port: int, path: str) -> str:
    try:
        return op.get(port, path)
    except OSError:
        return ""


def _ok(op: OperatorProcess, port: int, path: str) -> bool:
    return bool(_get(op, port, path))
