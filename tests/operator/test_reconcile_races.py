"""Races the operator must survive, produced for real on the local control plane with no
operator running: the test drives the controller itself, with the operator's credentials.

- A run is queued by an event (controller.py); by the time a worker takes it, another
  reconcile may have written status, or the user changed the spec. The worker must
  decide on the run as stored now.
- Creating a child that already exists answers 409; it is adopted at once, never asked
  again (each retry would cost seconds of backoff per child on every resume).
"""

from __future__ import annotations

import json

import pytest

from kubetrain_operator import builders, metrics
from kubetrain_operator.controller import Controller
from kubetrain_operator.k8s import Kube
from kubetrain_operator.settings import OperatorSettings
from tests.support.cluster import kubectl
from tests.support.runs import apply, get_run, quickstart, run_pods

pytestmark = pytest.mark.controlplane


def _controller(kube: Kube) -> Controller:
    return Controller(kube, OperatorSettings())


def test_a_stale_body_is_decided_on_the_stored_run(kube: Kube, namespace: str) -> None:
    apply(quickstart("late"), namespace)
    controller = _controller(kube)
    controller.run_event("ADDED", get_run("late", namespace))  # queued as it was then
    apply(quickstart("late", runPolicy={"suspend": True}), namespace)

    controller.reconcile(controller.queue.get() or ("", "", ""))

    stored = get_run("late", namespace)
    assert stored["status"]["phase"] == "Suspended", stored["status"]
    assert run_pods("late", namespace) == []


def test_a_deleted_run_is_left_alone(kube: Kube, namespace: str) -> None:
    apply(quickstart("gone"), namespace)
    controller = _controller(kube)
    controller.run_event("ADDED", get_run("gone", namespace))
    kubectl("delete", "tr", "gone", "-n", namespace)

    assert controller.reconcile(controller.queue.get() or ("", "", "")) is None

    assert run_pods("gone", namespace) == []
    assert kube.mutations == {}


def test_a_run_deleted_during_its_reconcile_leaves_the_metrics(
    kube: Kube, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The watch's DELETED event can arrive while a worker reconciles the run, after its
    # status write; the worker's last step sets the run's phase gauge, which must not bring
    # the deleted run back (nothing would ever forget it again).
    apply(quickstart("midway"), namespace)
    controller = _controller(kube)
    body = get_run("midway", namespace)
    controller.run_event("ADDED", body)
    patch_status = kube.patch_status

    def patch_then_delete(ns: str, name: str, *args: object, **kwargs: object) -> object:
        written = patch_status(ns, name, *args, **kwargs)
        kubectl("delete", "tr", name, "-n", ns)
        controller.run_event("DELETED", body)
        return written

    monkeypatch.setattr(kube, "patch_status", patch_then_delete)
    controller.reconcile(controller.queue.get() or ("", "", ""))

    assert body["metadata"]["uid"] not in metrics.RUNS


def conflicts() -> float:
    """409 answers the operator's client has counted in this process."""
    value = metrics.REGISTRY.get_sample_value(
        "kubetrain_operator_api_errors_total", {"code": "409"}
    )
    return value or 0.0


def test_creating_an_existing_child_adopts_it_without_retrying(kube: Kube, namespace: str) -> None:
    apply(quickstart("owner"), namespace)
    owner = builders.owner_reference("owner", get_run("owner", namespace)["metadata"]["uid"])
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "twice", "namespace": namespace, "ownerReferences": [owner]},
        "data": {"k": "v"},
    }
    kube.ensure(config_map)
    before = conflicts()

    adopted = kube.ensure(config_map)

    assert adopted["metadata"]["name"] == "twice"
    assert conflicts() - before == 1  # one 409, then adopted: no retries


@pytest.mark.parametrize("kind", ["Service", "Deployment"])  # what the operator deletes
def test_deleting_a_child_reports_it_gone_whatever_the_server_answers(
    kube: Kube, namespace: str, kind: str
) -> None:
    """Kubernetes 1.20 answers a Service delete with a Status, which the client cannot read
    as a Service: the delete must still count as done (serving removal stopped there)."""
    name = "child"
    manifests = {
        "Service": {"spec": {"ports": [{"port": 80}]}},
        "Deployment": {
            "spec": {
                "selector": {"matchLabels": {"a": "b"}},
                "template": {
                    "metadata": {"labels": {"a": "b"}},
                    "spec": {"containers": [{"name": "c", "image": "busybox"}]},
                },
            }
        },
    }
    api_version = "apps/v1" if kind == "Deployment" else "v1"
    body = {"apiVersion": api_version, "kind": kind, "metadata": {"name": name}}
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps({**body, **manifests[kind]}))
    assert kube.delete(kind, namespace, name) is True
    assert kube.delete(kind, namespace, name) is False  # already gone
