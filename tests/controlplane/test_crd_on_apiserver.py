"""The generated CRD on the real kube-apiserver (1.20): installs, accepts the examples,
shows the printer columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetrain_api import crd
from tests.support.cluster import kubectl

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

pytestmark = pytest.mark.controlplane


def test_crd_is_established(crd_installed: None) -> None:
    out = kubectl("get", "crd", crd.CRD_NAME, "-o", "json")
    status = json.loads(out.stdout)["status"]
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions["Established"] == "True"
    assert conditions.get("NonStructuralSchema", "False") == "False"
    assert status["acceptedNames"]["shortNames"] == ["tr"]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_pass_server_dry_run(example: Path, crd_installed: None, namespace: str) -> None:
    out = kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(example))
    assert "created (server dry run)" in out.stdout


def test_get_tr_shows_printer_columns(crd_installed: None, namespace: str) -> None:
    kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples" / "quickstart.yaml"))
    # Play the operator: write a status through the status subresource.
    status = {
        "status": {
            "phase": "Running",
            "progress": {"percent": 42, "loss": 2.5},
            "model": {"generation": 3},
        }
    }
    kubectl(
        "patch",
        "tr",
        "quickstart",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )
    out = kubectl("get", "tr", "-n", namespace).stdout
    header, row = out.strip().splitlines()
    assert header.split() == ["NAME", "PHASE", "PROGRESS", "LOSS", "GEN", "AGE"]
    assert row.split()[:5] == ["quickstart", "Running", "42", "2.5", "3"]
    wide = kubectl("get", "trainingruns.kubetrain.dev", "-n", namespace, "-o", "wide").stdout
    assert "builtin://tiny-llama" in wide
    assert wide.splitlines()[0].split()[6:] == ["METHOD", "MODEL", "WORKERS", "ATTEMPTS"]


def test_status_is_a_subresource(crd_installed: None, namespace: str) -> None:
    """A status in the main resource is ignored: only the operator writes it."""
    doc = (ROOT / "examples" / "quickstart.yaml").read_text()
    doc += "status:\n  phase: Succeeded\n"
    kubectl("apply", "-n", namespace, "-f", "-", input=doc)
    out = kubectl("get", "tr", "quickstart", "-n", namespace, "-o", "json")
    assert "status" not in json.loads(out.stdout) or not json.loads(out.stdout)["status"]


def test_unknown_fields_are_pruned_not_stored(crd_installed: None, namespace: str) -> None:
    """Why `kubetrain validate` must catch typos: Kubernetes 1.20 drops them silently."""
    doc = (ROOT / "examples" / "quickstart.yaml").read_text()
    doc = doc.replace("  method: pretrain\n", "  method: pretrain\n  methd: sft\n")
    kubectl("apply", "--validate=false", "-n", namespace, "-f", "-", input=doc)
    spec = json.loads(kubectl("get", "tr", "quickstart", "-n", namespace, "-o", "json").stdout)
    assert "methd" not in spec["spec"]
