"""Edits of an active run, and a run stored by an older operator, on the real control plane
with the operator in-process (the test plays the kubelet, tests/support/kubelet.py).

- An edit the active run may not take (an immutable field, or a spec made invalid) is
  refused (SpecChangeRefused and a Warning), never the end of the run: it goes on, and
  retries, with the spec it started with.
- A suspended run may move (placement, as Kueue changes it when it admits a run).
- A spec stored by kubetrain 0.1.0 (tests/operator/fixtures/stored-spec-v0.1.0.json), with
  a field since removed and a default since changed, keeps the run going under this one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

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
    wait_pods,
)

pytestmark = pytest.mark.controlplane

FIXTURE = Path(__file__).parent / "fixtures" / "stored-spec-v0.1.0.json"

REFUSED = "SpecChangeRefused"
FAST_RETRY = {"backoffSeconds": 0}


def stored_run(name: str, namespace: str) -> dict[str, Any]:
    """The run document in the run's ConfigMap: what its cluster was built from."""
    cm = json.loads(kubectl("get", "cm", f"{name}-config", "-n", namespace, "-o", "json").stdout)
    return dict(yaml.safe_load(cm["data"]["run.yaml"]))


def refused(name: str, namespace: str, want: str) -> dict[str, Any]:
    return wait_until(
        lambda: (
            (s := status(name, namespace))
            and any(c["type"] == REFUSED and c["status"] == want for c in s.get("conditions", []))
            and s
        ),
        timeout=30,
        message=f"{REFUSED}={want}",
    )


def test_an_immutable_edit_is_refused_and_the_run_goes_on_with_its_spec(
    operator: None, namespace: str
) -> None:
    apply(quickstart("edit", runPolicy=FAST_RETRY), namespace)
    head = start_cluster("edit", namespace)
    wait_phase("edit", namespace, "Running")

    apply(quickstart("edit", runPolicy=FAST_RETRY, hyperparameters__learningRate=0.5), namespace)

    st = refused("edit", namespace, "True")
    found = condition(st, REFUSED)
    assert found["reason"] == "ImmutableFieldChanged"
    assert found["message"].startswith("spec.hyperparameters.learningRate: cannot change")
    assert found["observedGeneration"] == get_run("edit", namespace)["metadata"]["generation"]
    assert st["phase"] == "Running"
    assert len(run_pods("edit", namespace, attempt=1)) == 3
    warnings = [e for e in events("edit", namespace) if e["reason"] == REFUSED]
    assert [e["type"] for e in warnings] == ["Warning"]
    assert "spec.hyperparameters.learningRate" in warnings[0]["message"]

    # A retry builds the next attempt from the spec the run started with.
    kubelet.set_terminated(namespace, head, 137, "OOMKilled")
    start_cluster("edit", namespace, attempt=2)
    assert stored_run("edit", namespace)["spec"]["hyperparameters"]["learningRate"] == 0.003

    apply(quickstart("edit", runPolicy=FAST_RETRY), namespace)  # reverted
    st = refused("edit", namespace, "False")
    assert st["phase"] == "Running"
    assert st["attempts"] == 2

    # An edit that makes the spec invalid is refused the same way (the run started valid).
    apply(quickstart("edit", runPolicy=FAST_RETRY, env=[{"name": "RANK", "value": "0"}]), namespace)
    st = refused("edit", namespace, "True")
    assert condition(st, REFUSED)["reason"] == "InvalidSpec"
    assert condition(st, REFUSED)["message"].startswith("spec.env[0].name: RANK is reserved")
    assert st["phase"] == "Running"
    assert len(run_pods("edit", namespace, attempt=2)) == 3


def test_a_suspended_run_may_move_and_its_next_attempt_does(operator: None, namespace: str) -> None:
    apply(quickstart("move"), namespace)
    start_cluster("move", namespace)
    apply(quickstart("move", runPolicy={"suspend": True}), namespace)
    wait_phase("move", namespace, "Suspended")
    wait_until(lambda: run_pods("move", namespace) == [], timeout=30, message="pods removed")

    # Kueue admits the run: new placement and resume in one update.
    apply(quickstart("move", resources__nodeSelector={"pool": "b"}), namespace)

    pods = wait_pods("move", namespace, 1, 3)
    assert [p["spec"].get("nodeSelector") for p in pods] == [{"pool": "b"}] * 3
    assert stored_run("move", namespace)["spec"]["resources"]["nodeSelector"] == {"pool": "b"}
    # While it runs, placement is fixed again.
    apply(quickstart("move", resources__nodeSelector={"pool": "c"}), namespace)
    st = refused("move", namespace, "True")
    assert condition(st, REFUSED)["message"].startswith("spec.resources.nodeSelector.pool:")
    assert not any(c["type"] == "Failed" for c in st.get("conditions", []))


def test_a_run_stored_by_kubetrain_0_1_0_keeps_running_and_its_defaults(
    operator: None, namespace: str
) -> None:
    apply(quickstart("old", runPolicy=FAST_RETRY), namespace)
    head = start_cluster("old", namespace)
    wait_phase("old", namespace, "Running")
    # What 0.1.0 stored for this run, as a later version's API would read it: a field
    # since removed, and a default since changed (sharedMemory, which the user never set).
    doc = json.loads(FIXTURE.read_text())["runs"]["quickstart"]
    doc["metadata"] = {"name": "old", "namespace": namespace}
    doc["spec"]["resources"]["gpuType"] = "none"
    doc["spec"]["resources"]["sharedMemory"] = "1Gi"
    patch = {"data": {"run.yaml": yaml.safe_dump(doc, sort_keys=False)}}
    kubectl("patch", "cm", "old-config", "-n", namespace, "-p", json.dumps(patch))

    # A retry (the reconcile that reads the stored spec to build it) keeps the old default.
    kubelet.set_terminated(namespace, head, 137, "OOMKilled")
    pods = wait_pods("old", namespace, 2, 3)
    volumes = [v for p in pods for v in p["spec"]["volumes"] if v["name"] == "dshm"]
    assert [v["emptyDir"]["sizeLimit"] for v in volumes] == ["1Gi"] * 3
    st = status("old", namespace)
    assert st["phase"] != "Failed", st
    assert not any(c["type"] == REFUSED for c in st.get("conditions", [])), st
