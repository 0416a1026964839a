"""A ModelService against the local control plane, with the operator in-process and its
router's counts from a real `kubetrain route` process (the pods never run here: no node;
tests/e2e runs the whole thing on a real one). The router routes to two real engines on
the tiny model; a simulated population rates them; the operator reads the router's
/stats, decides, and moves the split in the router's ConfigMap.

- A/B: users like A (control) far more than B; the operator rolls back to A at the
  configured significance, keeps the decision, and writes it everywhere it shows.
- Guardrail: B's engine answers 500; the operator rolls back at once, before the
  minimum sample count.
- Children: names, owner references, restricted pods; a variant removed from the spec
  takes its objects with it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetrain_api import modelservice as ms
from kubetrain_api.contract import LABEL_MODELSERVICE
from kubetrain_api.routing import CONFIG_FILE, parse_router_config
from tests.route.conftest import (  # noqa: F401  (fixtures)
    Process,
    StubEngine,
    engines,
    free_port,
    router,
    stub_engine,
    variant,
    write_config,
)
from tests.serve.conftest import model_dir  # noqa: F401  (fixture)
from tests.support.cluster import kubectl, wait_until
from tests.support.operators import in_process_operator
from tests.support.population import Population
from tests.support.runs import RBAC, apply

pytestmark = pytest.mark.controlplane

SERVICE = "chat"  # the routers' model name (tests/route/conftest.SERVICE)


@pytest.fixture(scope="module")
def routed(
    engines: dict[str, Process],  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Process, Path]]:
    """A router in front of engines a and b at 50/50, its config file (re-read when it
    changes) and a SQLite store."""
    folder = tmp_path_factory.mktemp("router")
    config = folder / CONFIG_FILE
    write_config(
        config, [variant("a", engines["a"].base_url, 50), variant("b", engines["b"].base_url, 50)]
    )
    with router(config, str(folder / "router.db"), folder) as process:
        yield process, config


@pytest.fixture(scope="module")
def ms_operator(cluster: Any, crd_installed: None, routed: tuple[Process, Path]) -> Iterator[None]:
    """The operator, reading every router's /stats from the local router."""
    kubectl("create", "namespace", "kubetrain-system", check=False)
    kubectl("apply", "-f", str(RBAC))
    address = routed[0].base_url.removeprefix("http://")
    with in_process_operator(
        cluster.operator_kubeconfig, "--all-namespaces", KUBETRAIN_ROUTER_STATS_ADDRESS=address
    ):
        yield


def model_service(name: str, **experiment: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "ModelService",
        "metadata": {"name": name},
        "spec": {
            "variants": [
                {"name": "a", "source": {"uri": "pvc://models/a"}, "weight": 50},
                {"name": "b", "source": {"uri": "pvc://models/b"}, "weight": 50},
            ],
            "experiment": {
                "control": "a",
                "treatment": "b",
                "minSamplesPerVariant": 30,
                "minimumDetectableEffect": 0.3,
                "alpha": 0.05,
                **experiment,
            },
        },
    }


def get(kind: str, name: str, namespace: str) -> dict[str, Any]:
    return dict(json.loads(kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout))


def service_status(name: str, namespace: str) -> dict[str, Any]:
    return dict(get("modelservice", name, namespace).get("status") or {})


def router_weights(name: str, namespace: str) -> dict[str, int]:
    config_map = get("configmap", ms.router_name(name), namespace)
    return parse_router_config(config_map["data"][CONFIG_FILE]).weights()


def started(name: str, namespace: str) -> dict[str, Any]:
    """Wait for the operator to build the children and start the experiment."""
    return wait_until(
        lambda: (s := service_status(name, namespace)).get("experiment", {}).get("startTime") and s,
        timeout=60,
        message=f"{name}: the experiment started",
    )


def decided(name: str, namespace: str) -> dict[str, Any]:
    return wait_until(
        lambda: (
            (s := service_status(name, namespace)).get("experiment", {}).get("decision")
            in ("Promote", "Rollback")
            and s
        ),
        timeout=60,
        message=f"{name}: a decision",
    )


def events(name: str, namespace: str) -> list[str]:
    out = kubectl(
        "get", "events", "-n", namespace, "--field-selector",
        f"involvedObject.kind=ModelService,involvedObject.name={name}", "-o", "json",
    ).stdout  # fmt: skip
    return [e["reason"] for e in json.loads(out)["items"]]


def test_the_operator_rolls_back_a_treatment_users_dislike(
    ms_operator: None, routed: tuple[Process, Path], namespace: str
) -> None:
    # The latency guardrail is off here: on a loaded 2-core machine the two fake engines'
    # p95 can differ by 20% by chance, and this test is about the statistical decision
    # (the next test breaks a guardrail on purpose).
    apply(model_service("ab", guardrails={"maxLatencyIncrease": 100.0}), namespace)
    first = started("ab", namespace)
    assert first["traffic"] == "a=50,b=50"
    assert router_weights("ab", namespace) == {"a": 50, "b": 50}
    assert first["experiment"]["decision"] == "Collecting"

    # The children: every one the service's, labelled, restricted.
    for kind, child in (
        ("deployment", "ab-a"), ("deployment", "ab-b"), ("deployment", "ab-router"),
        ("service", "ab-router"), ("configmap", "ab-router"),
        ("persistentvolumeclaim", "ab-router-db"),
    ):  # fmt: skip
        obj = get(kind, child, namespace)
        assert obj["metadata"]["labels"][LABEL_MODELSERVICE] == "ab"
        [owner] = obj["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["controller"]) == ("ModelService", "ab", True)
    pod = get("deployment", "ab-a", namespace)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False

    population = Population(routed[0].base_url, SERVICE, {"a": 0.8, "b": 0.3}, seed=1)
    for batch in range(8):
        population.round(range(batch * 25, (batch + 1) * 25), prefix="ab")
        if service_status("ab", namespace)["experiment"].get("decision") == "Rollback":
            break
    status = decided("ab", namespace)
    experiment = status["experiment"]
    assert experiment["decision"] == "Rollback", experiment
    assert experiment["winner"] == "a"
    assert experiment.get("guardrailBreach") is None, experiment
    assert experiment["pValue"] <= 0.05, experiment
    assert experiment["applied"] is True
    assert [v["name"] for v in experiment["variants"]] == ["a", "b"]
    assert all(v["samples"] >= 30 for v in experiment["variants"])
    assert status["traffic"] == "a=100,b=0"
    assert wait_until(
        lambda: router_weights("ab", namespace) == {"a": 100, "b": 0},
        timeout=30,
        message="the router's ConfigMap moved to a",
    )
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["RolledBack"]["status"] == "True"
    assert conditions["RolledBack"]["reason"] == "ControlWon"
    assert [h["cause"] for h in status["history"]] == ["Spec", "Rollback"]
    assert "RolledBack" in wait_until(lambda: events("ab", namespace), timeout=30, message="events")

    # The decision is kept: more ratings in B's favour change nothing.
    population.rates = {"a": 0.0, "b": 1.0}
    population.round(range(300, 340), prefix="ab")
    later = service_status("ab", namespace)
    assert later["experiment"]["decision"] == "Rollback"
    assert later["experiment"]["looks"] == experiment["looks"]

    # A variant removed from the spec takes its objects with it.
    one = model_service("ab")
    del one["spec"]["experiment"]
    one["spec"]["variants"] = [{"name": "a", "source": {"uri": "pvc://models/a"}}]
    apply(one, namespace)
    wait_until(
        lambda: kubectl("get", "deployment", "ab-b", "-n", namespace, check=False).returncode != 0,
        timeout=60,
        message="variant b's Deployment deleted",
    )
    assert kubectl("get", "service", "ab-b", "-n", namespace, check=False).returncode != 0
    assert router_weights("ab", namespace) == {"a": 100}


def test_a_broken_guardrail_rolls_back_at_once(
    ms_operator: None,
    routed: tuple[Process, Path],
    engines: dict[str, Process],  # noqa: F811
    stub_engine: StubEngine,  # noqa: F811
    namespace: str,
) -> None:
    process, config = routed
    # B's engine is broken: every generation answers 500.
    write_config(
        config, [variant("a", engines["a"].base_url, 50), variant("b", stub_engine.base_url, 50)]
    )
    try:
        apply(model_service("guard", minSamplesPerVariant=1000), namespace)
        started("guard", namespace)
        population = Population(process.base_url, SERVICE, {"a": 0.5, "b": 0.5})
        codes: Counter[int] = Counter()
        for i in range(120):
            codes[population.try_ask(f"guard-{i}")] += 1
            if codes[502] >= 25:
                break
        assert set(codes) == {200, 502}, codes  # A answers, B's requests fail
        status = decided("guard", namespace)
    finally:
        write_config(
            config,
            [variant("a", engines["a"].base_url, 50), variant("b", engines["b"].base_url, 50)],
        )
    experiment = status["experiment"]
    assert experiment["decision"] == "Rollback"
    assert "5xx rate" in experiment["guardrailBreach"]
    assert status["traffic"] == "a=100,b=0"
    assert status["history"][-1]["cause"] == "Guardrail"
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["RolledBack"]["reason"] == "GuardrailBreached"
