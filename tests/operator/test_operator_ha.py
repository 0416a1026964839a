"""Operators that come and go, each test with operators of its own (no module operator):

- High availability (issue 13, item 10): two `kubetrain operator` processes with leader
  election on the Lease `kubetrain-system/kubetrain-operator`, with the lease timings the
  chart uses. Only the leader reconciles; SIGKILLing it hands over within 30 s, a run
  created meanwhile gets its cluster, and no run gets a second set of pods.
- Uninstalled operator (item 8): with the operator stopped, deleting a namespace that holds
  a run completes (no finalizer on the run holds it).
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import kubelet
from tests.support.cluster import kubectl, wait_until
from tests.support.operators import OperatorProcess, in_process_operator
from tests.support.runs import (
    RBAC,
    apply,
    quickstart,
    run_pods,
    start_cluster,
    status,
    wait_phase,
    wait_pods,
)

pytestmark = pytest.mark.controlplane

LEASE = ("kubetrain-system", "kubetrain-operator")  # OperatorSettings' defaults
HANDOVER_SECONDS = 30


@pytest.fixture(scope="module")
def progress() -> Iterator[kubelet.FakeProgress]:
    server = kubelet.FakeProgress()
    yield server
    server.close()


@pytest.fixture
def rbac(cluster: Any, crd_installed: None) -> None:
    kubectl("create", "namespace", "kubetrain-system", check=False)
    kubectl("apply", "-f", str(RBAC))


def holder() -> str:
    proc = kubectl("get", "lease", LEASE[1], "-n", LEASE[0], "-o", "json", check=False)
    if proc.returncode != 0:
        return ""
    return str(json.loads(proc.stdout)["spec"].get("holderIdentity") or "")


def metric(op: OperatorProcess, name: str, **labels: str) -> float:
    """A sample of the process's /metrics (0 when absent or unreachable)."""
    try:
        text = op.get(op.metrics, "/metrics")
    except OSError:
        return 0.0
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(f"{name}{{{wanted}}}" if labels else name) + r" ([0-9.e+-]+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def up(op: OperatorProcess) -> bool:
    try:
        return bool(op.get(op.liveness, "/healthz"))
    except OSError:
        return False


def status_writes(op: OperatorProcess) -> float:
    return metric(
        op, "kubetrain_operator_api_calls_total", resource="TrainingRun/status", verb="patch"
    )


@pytest.fixture
def two_operators(
    rbac: None, cluster: Any, progress: kubelet.FakeProgress, tmp_path: Path, namespace: str
) -> Iterator[tuple[OperatorProcess, OperatorProcess]]:
    kubectl("delete", "lease", LEASE[1], "-n", LEASE[0], "--ignore-not-found")
    ops = tuple(
        OperatorProcess(
            str(cluster.operator_kubeconfig),
            progress.port,
            log=tmp_path / f"{name}.log",
            POD_NAME=name,
            KUBETRAIN_LEADER_ELECTION="true",
            KUBETRAIN_RESYNC_SECONDS="2",
        )
        for name in ("op-a", "op-b")
    )
    try:
        yield ops[0], ops[1]
    finally:
        for op in ops:
            if op.running():
                op.kill()
        # No run left for the next test's operator to count (no finalizer: no operator
        # needed for this).
        kubectl("delete", "tr", "--all", "-n", namespace, "--timeout=60s", check=False)
        kubectl("delete", "lease", LEASE[1], "-n", LEASE[0], "--ignore-not-found")
        for op in ops:
            if op.log and op.log.exists():
                print(f"--- {op.log.name} (tail)\n" + op.log.read_text()[-3000:])


def leader_then_standby(first: OperatorProcess, second: OperatorProcess) -> None:
    """op-a starts and takes the Lease; op-b starts after it, as the standby."""
    first.start()
    wait_until(lambda: holder().startswith("op-a_"), timeout=60, message="op-a to lead")
    second.start()
    wait_until(lambda: up(second), timeout=60, message="op-b up")


def test_only_the_leader_reconciles_and_a_standby_takes_over(
    two_operators: tuple[OperatorProcess, OperatorProcess], namespace: str
) -> None:
    first, second = two_operators
    leader_then_standby(first, second)

    apply(quickstart("before"), namespace)
    start_cluster("before", namespace)
    wait_phase("before", namespace, "Running")
    time.sleep(4)  # a few resyncs
    assert status_writes(first) > 0
    assert status_writes(second) == 0  # the standby watched, and wrote nothing
    assert holder().startswith("op-a_")

    first.kill()
    killed = time.monotonic()
    apply(quickstart("after"), namespace)
    wait_pods("after", namespace, attempt=1, count=3)  # reconciled by the new leader
    assert holder().startswith("op-b_")
    handover = time.monotonic() - killed
    print(f"killed leader -> new leader created a run's pods in {handover:.1f}s")
    assert handover < HANDOVER_SECONDS

    # The run of the old leader goes on under the new one, with its one set of pods.
    head = start_cluster("after", namespace)
    kubelet.set_terminated(namespace, head, 0)
    wait_phase("after", namespace, "Succeeded")
    assert status_writes(second) > 0
    assert status("before", namespace)["attempts"] == 1
    for run in ("before", "after"):
        pods = run_pods(run, namespace)
        assert len(pods) == 3 - (run == "after") * 2, pods  # a finished run keeps its head
        assert {p["metadata"]["labels"]["kubetrain.dev/attempt"] for p in pods} == {"1"}


def test_a_leader_that_stops_cleanly_hands_over_at_once(
    two_operators: tuple[OperatorProcess, OperatorProcess], namespace: str
) -> None:
    first, second = two_operators
    leader_then_standby(first, second)
    assert first.proc is not None
    first.proc.send_signal(signal.SIGTERM)  # an upgrade or a drain: kopf shuts down
    stopped = time.monotonic()
    wait_until(lambda: holder().startswith("op-b_"), timeout=30, message="op-b to lead")
    # Released: no waiting out the 15 s lease (a retry period, plus kopf's shutdown).
    assert time.monotonic() - stopped < 10
    first.proc.wait(timeout=30)
    apply(quickstart("next"), namespace)
    wait_pods("next", namespace, attempt=1, count=3)


def test_namespace_deletion_completes_with_the_operator_stopped(
    rbac: None, cluster: Any, namespace: str
) -> None:
    with in_process_operator(cluster.operator_kubeconfig, "--namespace", namespace):
        apply(quickstart("orphan"), namespace)
        start_cluster("orphan", namespace)
        wait_phase("orphan", namespace, "Running")
        time.sleep(3)  # several resyncs
    # The operator is gone (uninstalled); its runs must not hold their namespace.
    kubectl("delete", "namespace", namespace, "--wait=false")
    wait_until(
        lambda: kubectl("get", "namespace", namespace, check=False).returncode != 0,
        timeout=90,
        message=f"namespace {namespace} deleted",
    )
