"""Event-driven at scale (issue 13, item 8), on the real local control plane with the
operator in-process (conftest's `operator`, resync every second):

- a finished run costs nothing at steady state: the operator's API client sends no
  request about it (counted at the client, in this process);
- runs carry no finalizer (kopf adds one for any timer or daemon), and the one older
  versions left is removed;
- turning serving off removes `status.serving`, and the run then converges: a reconcile
  writes nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest

from tests.operator.test_serving_controlplane import (
    SERVING_KINDS,
    finish_training,
    get,
    served_run,
    summary,
    wait_serving_objects,
)
from tests.support import kubelet
from tests.support.cluster import kubectl, wait_until
from tests.support.runs import apply, get_run, quickstart, run_pods, start_cluster, status

pytestmark = pytest.mark.controlplane


class RequestCounter:
    """Counts the API requests of every kubernetes-client ApiClient in this process (the
    in-process operator's reconciler uses one; kopf's own watches use aiohttp), by
    namespace (the URL names it)."""

    def __init__(self, namespace: str) -> None:
        self.marker = f"/namespaces/{namespace}/"
        self.calls: list[tuple[str, str]] = []

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        original = kubernetes.client.ApiClient.call_api

        def call_api(client: Any, method: str, url: str, *args: Any, **kw: Any) -> Any:
            if self.marker in url:
                self.calls.append((method, url))
            return original(client, method, url, *args, **kw)

        kubernetes.client.ApiClient.call_api = call_api  # type: ignore[method-assign]
        try:
            yield
        finally:
            kubernetes.client.ApiClient.call_api = original  # type: ignore[method-assign]


def finalizers(name: str, namespace: str) -> list[str]:
    return list(get_run(name, namespace)["metadata"].get("finalizers") or [])


def test_a_finished_run_costs_no_requests(operator: None, namespace: str) -> None:
    apply(quickstart("quiet"), namespace)
    head = start_cluster("quiet", namespace)
    kubelet.set_terminated(namespace, head, 0)
    wait_until(
        lambda: (
            status("quiet", namespace).get("phase") == "Succeeded"
            and [p["metadata"]["name"] for p in run_pods("quiet", namespace)] == [head]
        ),
        timeout=60,
        message="Succeeded with its workers gone",
    )
    time.sleep(3)  # the last events of the clean-up are handled

    counter = RequestCounter(namespace)
    with counter.counting():
        time.sleep(10)  # ten resync periods of the test operator
    assert counter.calls == []

    # The counter does see the operator's requests: an event makes it look at the run.
    with counter.counting():
        kubectl("label", "tr", "quiet", "-n", namespace, "touched=yes")
        wait_until(lambda: counter.calls, timeout=30, message="a reconcile after the label")


def test_runs_carry_no_finalizer(operator: None, namespace: str) -> None:
    apply(quickstart("free"), namespace)
    start_cluster("free", namespace)
    wait_until(
        lambda: status("free", namespace).get("phase") == "Running", timeout=30, message="Running"
    )
    time.sleep(3)  # several resyncs of an active run
    assert finalizers("free", namespace) == []
    assert status("free", namespace)["phase"] == "Running"
    # Nor any bookkeeping of kopf's (progress, last-handled configuration).
    annotations = get_run("free", namespace)["metadata"].get("annotations") or {}
    assert not [key for key in annotations if "kopf" in key or "last-handled" in key]


def test_turning_serving_off_removes_status_serving(
    operator: None, cluster: Any, namespace: str
) -> None:
    finish_training(served_run("toggle"), namespace, summary("toggle"))
    wait_serving_objects("toggle", namespace)
    wait_until(lambda: "serving" in status("toggle", namespace), timeout=30, message="serving")

    apply(served_run("toggle", enabled=False), namespace)
    wait_until(
        lambda: all(get(kind, "toggle-serve", namespace) is None for kind in SERVING_KINDS),
        timeout=60,
        message="the serving objects deleted",
    )
    st = wait_until(
        lambda: "serving" not in (s := status("toggle", namespace)) and s,
        timeout=30,
        message="status.serving removed",
    )
    serving = next(c for c in st["conditions"] if c["type"] == "Serving")
    assert (serving["status"], serving["reason"]) == ("False", "Disabled")

    # Converged: a reconcile with the operator's identity writes nothing.
    from kubetrain_operator.k8s import Kube
    from kubetrain_operator.reconcile import reconcile
    from kubetrain_operator.settings import OperatorSettings

    client = kubernetes.config.new_client_from_config(config_file=str(cluster.operator_kubeconfig))
    kube = Kube(client)
    for _ in range(2):
        reconcile(get_run("toggle", namespace), kube, OperatorSettings.from_env())
    assert sum(kube.mutations.values()) == 0, kube.mutations


def test_the_finalizer_of_older_versions_is_removed(operator: None, namespace: str) -> None:
    """Operators that had a resync timer left kopf's finalizer on every run; after an
    upgrade it must go, or the run could never be deleted without the operator."""
    doc = quickstart("legacy")
    doc["metadata"]["finalizers"] = ["kubetrain.dev/finalizer"]
    apply(doc, namespace)
    wait_until(lambda: finalizers("legacy", namespace) == [], timeout=30, message="removed")


def test_a_pending_ttl_does_not_stop_repairs_of_a_finished_run(
    operator: None, namespace: str
) -> None:
    """A served run with a week-long TTL: its serving Deployment, deleted by hand, comes
    back at once (the TTL used to hold every reconcile of the run until it expired)."""
    doc = served_run("kept")
    doc["spec"]["runPolicy"] = {"ttlSecondsAfterFinished": 7 * 24 * 3600}
    finish_training(doc, namespace, summary("kept"))
    before = wait_serving_objects("kept", namespace)["Deployment"]
    kubectl("delete", "deployment", "kept-serve", "-n", namespace)
    wait_until(
        lambda: (
            (d := get("Deployment", "kept-serve", namespace))
            and d["metadata"]["uid"] != before["metadata"]["uid"]
        ),
        timeout=30,
        message="the serving Deployment re-created",
    )
    assert get_run("kept", namespace)["status"]["phase"] == "Succeeded"
