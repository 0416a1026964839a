"""Retries that match reality, on the real local control plane: the driver's exit code
says whether the user or the infrastructure failed, retries back off exponentially, and
spec.runPolicy.failureRules override the defaults. The test plays the kubelet (exit codes,
OOM kills); the operator runs in-process with the chart's RBAC (conftest.py)."""

from __future__ import annotations

import json
import time

import pytest

from kubetrain_api import contract
from kubetrain_api.reports import parse_time
from tests.support import kubelet
from tests.support.cluster import kubectl, wait_until
from tests.support.runs import (
    apply,
    condition,
    events,
    quickstart,
    run_pods,
    start_cluster,
    status,
    wait_phase,
)

pytestmark = pytest.mark.controlplane


def run_event_messages(name: str, namespace: str) -> list[str]:
    out = kubectl(
        "get", "events", "-n", namespace, "--field-selector",
        f"involvedObject.kind=TrainingRun,involvedObject.name={name}", "-o", "json",
    ).stdout  # fmt: skip
    return [str(e.get("message", "")) for e in json.loads(out)["items"]]


def _wait_attempt(name: str, namespace: str, attempt: int) -> dict:
    return wait_until(
        lambda: (s := status(name, namespace)).get("attempts") == attempt and s,
        timeout=30,
        message=f"{name}: attempt {attempt} decided",
    )


def test_infrastructure_exit_codes_are_retried_with_exponential_backoff(
    operator: None, namespace: str
) -> None:
    policy = {"backoffLimit": 2, "backoffSeconds": 3}
    apply(quickstart("infra", runPolicy=policy), namespace)

    head = start_cluster("infra", namespace)
    failed_at = time.monotonic()
    kubelet.set_terminated(namespace, head, contract.EXIT_RAY_UNAVAILABLE)
    st = _wait_attempt("infra", namespace, 2)
    retrying = condition(st, "ClusterReady")
    assert retrying["reason"] == "Retrying"
    assert "RayUnavailable" in retrying["message"]
    assert "3s backoff" in retrying["message"]
    until = parse_time(st["nextAttemptTime"])
    assert until is not None
    # No pods for attempt 2 while the backoff lasts (the old ones go at once).
    assert run_pods("infra", namespace, attempt=2) == []
    head = start_cluster("infra", namespace, attempt=2)
    assert time.monotonic() - failed_at >= 2  # 3 s, less the timestamps' whole seconds
    wait_until(
        lambda: "nextAttemptTime" not in status("infra", namespace),
        timeout=10,
        message="nextAttemptTime cleared once the attempt's pods are seen",
    )

    # The second counted failure waits twice as long.
    failed_at = time.monotonic()
    kubelet.set_terminated(namespace, head, contract.EXIT_NETWORK)
    st = _wait_attempt("infra", namespace, 3)
    assert "6s backoff" in condition(st, "ClusterReady")["message"]
    time.sleep(3)
    assert run_pods("infra", namespace, attempt=3) == []
    head = start_cluster("infra", namespace, attempt=3)
    assert time.monotonic() - failed_at >= 5

    kubelet.set_terminated(namespace, head, 0)
    st = wait_phase("infra", namespace, "Succeeded")
    assert st["attempts"] == 3
    assert any(e["reason"] == "NetworkError" for e in events("infra", namespace))


def test_user_error_exit_codes_are_permanent(operator: None, namespace: str) -> None:
    apply(quickstart("baddata", runPolicy={"backoffLimit": 3, "backoffSeconds": 0}), namespace)
    head = start_cluster("baddata", namespace)
    kubelet.set_terminated(namespace, head, contract.EXIT_INVALID_DATA)
    st = wait_phase("baddata", namespace, "Failed")
    assert st["attempts"] == 1
    assert condition(st, "Failed")["reason"] == "InvalidData"
    time.sleep(2)
    assert status("baddata", namespace)["attempts"] == 1
    assert run_pods("baddata", namespace, attempt=2) == []


def test_failure_rules_override_the_defaults(operator: None, namespace: str) -> None:
    rules = [
        # Exit 1 is permanent by default; this team's driver exits 1 on a flaky mount.
        {"action": "Retry", "onExitCodes": {"operator": "In", "values": [1]}},
        # OOMKilled is retried by default; more memory is the only fix.
        {"action": "FailRun", "onReasons": ["OOMKilled"]},
    ]
    policy = {"backoffLimit": 3, "backoffSeconds": 0, "failureRules": rules}
    apply(quickstart("ruled", runPolicy=policy), namespace)
    head = start_cluster("ruled", namespace)
    kubelet.set_terminated(namespace, head, 1)
    _wait_attempt("ruled", namespace, 2)
    # The retry's Warning event keeps the rule (the ClusterReady condition moves on to the
    # new attempt's pods as soon as they exist).
    wait_until(
        lambda: any("failureRules[0]: Retry" in m for m in run_event_messages("ruled", namespace)),
        timeout=30,
        message="the retry's event naming the rule",
    )

    head = start_cluster("ruled", namespace, attempt=2)
    kubelet.set_terminated(namespace, head, 137, "OOMKilled")
    st = wait_phase("ruled", namespace, "Failed")
    assert st["attempts"] == 2
    failed = condition(st, "Failed")
    assert failed["reason"] == "OOMKilled"
    assert "failureRules[1]: FailRun" in failed["message"]
