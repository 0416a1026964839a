"""The API server refusing a run's children, on the real local control plane, with the
operator in-process (the `operator` fixture, conftest.py): a ResourceQuota that leaves no
room for the attempt's pods, a PriorityClass that does not exist, a pod field the server
finds invalid. Each must show as a condition and a Warning event with the server's words,
leave no pods of the attempt behind, and (when the cause clears) proceed.

Before create_errors.py the ApiException went to kopf, which retried it without a word:
the run sat in Provisioning with ClusterReady `Creating`, the pods created before the
refusal held the quota, and these tests timed out waiting for the condition."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.cluster import kubectl, wait_until
from tests.support.runs import (
    apply,
    condition,
    events,
    quickstart,
    run_pods,
    status,
    wait_phase,
    wait_pods,
)

pytestmark = pytest.mark.controlplane


def wait_reason(name: str, namespace: str, type_: str, reason: str) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        st = status(name, namespace)
        found = [c for c in st.get("conditions", []) if c["type"] == type_]
        return st if found and found[0]["reason"] == reason else None

    return wait_until(reached, timeout=60, message=f"{name}: {type_} {reason}")


def warnings(name: str, namespace: str, reason: str) -> list[dict[str, Any]]:
    return [e for e in events(name, namespace) if e["type"] == "Warning" and e["reason"] == reason]


def test_quota_exceeded_is_visible_releases_the_pods_and_proceeds_once_freed(
    operator: None, namespace: str
) -> None:
    # Room for two pods: the head and one worker are created, the second worker refused.
    kubectl("create", "quota", "pods", "--hard=pods=2", "-n", namespace)
    wait_until(
        lambda: (
            json.loads(kubectl("get", "quota", "pods", "-n", namespace, "-o", "json").stdout)
            .get("status", {})
            .get("hard")
        ),
        message="the quota controller to fill in the quota's status",
    )
    apply(quickstart("quota"), namespace)

    st = wait_reason("quota", namespace, "ClusterReady", "QuotaExceeded")
    assert st["phase"] == "Provisioning"
    message = condition(st, "ClusterReady")["message"]
    assert "exceeded quota: pods" in message
    assert "quota-a1-worker-1" in message
    assert st["createFailures"] >= 1
    assert "nextCreateTime" in st
    wait_until(lambda: warnings("quota", namespace, "QuotaExceeded"), message="a Warning")
    # The head and worker 0 were released: nothing holds the quota or sits Pending.
    wait_until(lambda: not run_pods("quota", namespace, 1), message="no pods of attempt 1")
    assert status("quota", namespace)["attempts"] == 1  # a refusal is no attempt

    kubectl("patch", "quota", "pods", "-n", namespace, "-p", '{"spec":{"hard":{"pods":"10"}}}')
    wait_pods("quota", namespace, 1, 3)  # within the backoff (5 s, 10 s, ...)
    st = wait_until(
        lambda: (
            (s := status("quota", namespace)).get("conditions")
            and condition(s, "ClusterReady")["reason"] != "QuotaExceeded"
            and s
        ),
        message="ClusterReady past QuotaExceeded",
    )
    assert st["phase"] == "Provisioning"
    assert st["attempts"] == 1
    wait_until(
        lambda: (
            "createFailures" not in (s := status("quota", namespace)) and "nextCreateTime" not in s
        ),
        message="the refusal's backoff fields removed",
    )


@pytest.fixture
def priority_class(namespace: str) -> Iterator[str]:
    """A PriorityClass name (cluster-wide) that no one has created yet; deleted after."""
    name = f"pc-{namespace[-8:]}"
    yield name
    kubectl("delete", "priorityclass", name, "--ignore-not-found", check=False)


def test_a_missing_priority_class_is_visible_and_retried_until_it_exists(
    operator: None, namespace: str, priority_class: str
) -> None:
    apply(quickstart("prio", resources__priorityClassName=priority_class), namespace)
    st = wait_reason("prio", namespace, "ClusterReady", "CreateFailed")
    # The API server answers 403: the Priority admission plugin refuses the pod.
    assert (
        f"no PriorityClass with name {priority_class} was found"
        in (condition(st, "ClusterReady")["message"])
    )
    assert st["phase"] == "Provisioning"
    wait_until(lambda: warnings("prio", namespace, "CreateFailed"), message="a Warning")
    assert not run_pods("prio", namespace, 1)

    kubectl("create", "priorityclass", priority_class, "--value=1000")
    pods = wait_pods("prio", namespace, 1, 3)
    assert {p["spec"]["priorityClassName"] for p in pods} == {priority_class}


def test_a_pod_field_the_server_finds_invalid_fails_the_run(operator: None, namespace: str) -> None:
    # Accepted by our validation, refused by the API server (422): the pod template
    # overrides are core/v1 objects that only the API server checks in depth.
    init = {"name": "prep", "command": ["true"], "ports": [{"containerPort": 70000}]}
    apply(quickstart("badsel", podOverrides={"head": {"initContainers": [init]}}), namespace)
    st = wait_phase("badsel", namespace, "Failed")
    failed = condition(st, "Failed")
    assert failed["reason"] == "CreateRejected"
    assert "spec.initContainers[0].ports[0].containerPort" in failed["message"]
    assert "badsel-a1-head" in failed["message"]
    wait_until(lambda: warnings("badsel", namespace, "CreateRejected"), message="a Warning")
    assert not run_pods("badsel", namespace)


def test_an_admission_denial_is_visible_and_retried_until_lifted(
    operator: None, namespace: str
) -> None:
    # The LimitRanger admission plugin denies pods above a LimitRange's max (403), as a
    # webhook's denial would: the administrator may lift it without a change to the run.
    limits = {
        "apiVersion": "v1",
        "kind": "LimitRange",
        "metadata": {"name": "small"},
        "spec": {"limits": [{"type": "Container", "max": {"cpu": "500m"}}]},
    }
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(limits))
    apply(quickstart("denied"), namespace)
    st = wait_reason("denied", namespace, "ClusterReady", "CreateFailed")
    assert "maximum cpu usage per Container is 500m" in condition(st, "ClusterReady")["message"]
    wait_until(lambda: warnings("denied", namespace, "CreateFailed"), message="a Warning")
    assert not run_pods("denied", namespace, 1)

    kubectl("delete", "limitrange", "small", "-n", namespace)
    wait_pods("denied", namespace, 1, 3)
