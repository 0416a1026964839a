"""The generated ModelService CRD on the real kube-apiserver (1.20): installs with its short
name, accepts the A/B example, refuses a schema-invalid service naming the fields, keeps
status to the subresource, stores the status the models describe, and shows the printer
columns."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetrain_api import crd, validation
from kubetrain_api import modelservice as ms
from tests.support.cluster import kubectl

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "modelservice-ab.yaml"

pytestmark = pytest.mark.controlplane


def service_doc() -> dict[str, Any]:
    (doc,) = [d for d in validation.load_documents(EXAMPLE.read_text()) if d["kind"] == ms.KIND]
    return dict(doc)


def apply(doc: dict[str, Any], namespace: str, *args: str) -> None:
    kubectl("apply", "-n", namespace, *args, "-f", "-", input=yaml.safe_dump(doc))


def get(namespace: str) -> dict[str, Any]:
    out = kubectl("get", "ms", "chat", "-n", namespace, "-o", "json")
    return dict(json.loads(out.stdout))


def patch_status(namespace: str, status: dict[str, Any]) -> None:
    """Play the operator: write status through the status subresource."""
    kubectl(
        "patch",
        "ms",
        "chat",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )


def test_crd_is_established_with_its_short_name(crd_installed: None) -> None:
    out = kubectl("get", "crd", crd.MODELSERVICE_CRD_NAME, "-o", "json")
    status = json.loads(out.stdout)["status"]
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions["Established"] == "True"
    assert conditions.get("NonStructuralSchema", "False") == "False"
    assert status["acceptedNames"]["shortNames"] == ["ms"]
    assert status["acceptedNames"]["kind"] == "ModelService"


def test_example_with_both_kinds_is_accepted(crd_installed: None, namespace: str) -> None:
    out = kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(EXAMPLE))
    assert "trainingrun.kubetrain.dev/chat-a created (server dry run)" in out.stdout
    assert "trainingrun.kubetrain.dev/chat-b created (server dry run)" in out.stdout
    assert "modelservice.kubetrain.dev/chat created (server dry run)" in out.stdout


def test_schema_invalid_service_is_refused_naming_the_fields(
    crd_installed: None, namespace: str
) -> None:
    doc = service_doc()
    doc["spec"]["variants"][0]["weight"] = 150
    doc["spec"]["experiment"]["alpha"] = 0.9
    doc["spec"]["router"]["database"] = {"postgres": {"dsn": "postgresql://u:p@db/x"}}
    out = kubectl(
        "create",
        "--dry-run=server",
        "--validate=false",
        "-n",
        namespace,
        "-f",
        "-",
        input=yaml.safe_dump(doc),
        check=False,
    )
    assert out.returncode != 0
    assert "is invalid" in out.stderr, out.stderr
    for field in (
        "spec.variants.weight",
        "spec.experiment.alpha",
        "spec.router.database.postgres.dsnSecretRef",
    ):
        assert field in out.stderr, out.stderr


def test_status_is_a_subresource(crd_installed: None, namespace: str) -> None:
    """A status in the main resource is ignored: only the operator writes it."""
    doc = service_doc()
    doc["status"] = {"traffic": "a=100"}
    apply(doc, namespace)
    assert not get(namespace).get("status")


def test_the_status_the_models_describe_is_stored_whole(
    crd_installed: None, namespace: str
) -> None:
    apply(service_doc(), namespace)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    status = ms.ModelServiceStatus(
        observed_generation=1,
        conditions=[
            {
                "type": "Promoted",
                "status": "True",
                "reason": "TreatmentWon",
                "message": "b beats a",
                "lastTransitionTime": now,
                "observedGeneration": 1,
            }
        ],
        variants_ready="2/2",
        traffic="a=0,b=100",
        variants=[
            ms.VariantStatus(name="a", weight=0, ready=True, replicas=1, ready_replicas=1),
            ms.VariantStatus(name="b", weight=100, ready=True, requests=812, errors=1),
        ],
        router=ms.RouterStatus(service="chat", url="http://chat.ns.svc:8000/v1"),
        experiment=ms.ExperimentStatus(
            control="a",
            treatment="b",
            variants=[
                ms.VariantResult(
                    name="a",
                    samples=790,
                    successes=316,
                    rate=0.4,
                    interval=ms.Interval(lower=0.36, upper=0.44),
                    latency_p95_seconds=0.21,
                ),
                ms.VariantResult(name="b", samples=812, successes=495, rate=0.61),
            ],
            difference=0.21,
            difference_interval=ms.Interval(lower=0.12, upper=0.3),
            p_value=1e-9,
            decision="Promote",
            winner="b",
            reason="b beats a: rate 0.61 vs 0.40",
            applied=True,
            decision_time=now,
            looks=42,
        ),
        history=[
            ms.TrafficChange(
                time=now,
                weights=[
                    ms.VariantWeight(name="a", weight=0),
                    ms.VariantWeight(name="b", weight=100),
                ],
                cause="Promote",
                reason="b beats a",
            )
        ],
    )
    wire = status.model_dump(by_alias=True, exclude_none=True, mode="json")
    patch_status(namespace, wire)
    stored = get(namespace)["status"]
    assert ms.ModelServiceStatus.model_validate(stored) == status


def test_get_ms_shows_printer_columns(crd_installed: None, namespace: str) -> None:
    apply(service_doc(), namespace)
    patch_status(
        namespace,
        {
            "variantsReady": "2/2",
            "traffic": "a=50,b=50",
            "experiment": {"decision": "Undecided", "pValue": 0.42},
            "router": {"url": "http://chat.example:8000/v1"},
            "generation": 2,
        },
    )
    header, row = kubectl("get", "ms", "-n", namespace).stdout.strip().splitlines()
    assert header.split() == ["NAME", "VARIANTS", "TRAFFIC", "DECISION", "GEN", "AGE"]
    assert row.split()[:5] == ["chat", "2/2", "a=50,b=50", "Undecided", "2"]
    wide = kubectl("get", "modelservices.kubetrain.dev", "-n", namespace, "-o", "wide").stdout
    assert wide.splitlines()[0].split()[6:] == ["WINNER", "P", "URL"]
    assert "http://chat.example:8000/v1" in wide
