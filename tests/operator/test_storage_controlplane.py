"""Storage shapes through the operator, in-process, against the real local control plane:
a run that reads its model, data and evaluation set from claims (`pvc://`) and keeps its
files on an object store (`s3://`, credentials in a Secret). The API server validates the
pods and the Deployment the operator builds; the test reads back what it stored.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support import kubelet
from tests.support.cluster import kubectl, wait_until
from tests.support.runs import apply, quickstart, start_cluster, status, wait_phase, wait_pods

pytestmark = pytest.mark.controlplane

CANARY = "object-store-secret-canary-7c41d2"
STORAGE = "s3://bucket-x/runs"


def claims_on_s3(name: str) -> dict[str, Any]:
    return quickstart(
        name,
        model={"source": "pvc://models/llama", "tokenizer": "pvc://models/tokenizer"},
        data__sources=[
            {"name": "a", "uri": "pvc://datasets/a.jsonl"},
            {"name": "b", "uri": "builtin://quickstart-corpus"},
        ],
        evaluation={
            "metrics": ["loss", "perplexity", "accuracy"],
            "datasets": [{"name": "intents", "uri": "pvc://evals/x.jsonl", "labels": ["a"]}],
            "gate": [{"metric": "perplexity", "max": 200}],
        },
        checkpoint__storage={"uri": STORAGE},
        secrets={"objectStore": {"name": "s3-creds"}},
        serve={"enabled": True, "resources": {"cpu": 1, "memory": "2Gi"}},
    )


def claim_mounts(pod: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """mountPath -> (claim, read-only) for every claim a pod mounts under /mnt/pvc."""
    claims = {
        v["name"]: v["persistentVolumeClaim"]
        for v in pod["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    (container,) = pod["spec"]["containers"]
    return {
        m["mountPath"]: (claims[m["name"]]["claimName"], bool(m.get("readOnly")))
        for m in container["volumeMounts"]
        if m["mountPath"].startswith("/mnt/pvc/")
    }


def test_claims_and_object_store_reach_the_pods(operator: None, namespace: str) -> None:
    kubectl(
        "create",
        "secret",
        "generic",
        "s3-creds",
        "-n",
        namespace,
        "--from-literal=AWS_ACCESS_KEY_ID=kubetrain",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={CANARY}",
    )
    apply(claims_on_s3("stored"), namespace)
    pods = wait_pods("stored", namespace, 1, 3)
    (head,) = [p for p in pods if p["metadata"]["labels"]["kubetrain.dev/role"] == "head"]
    workers = [p for p in pods if p["metadata"]["labels"]["kubetrain.dev/role"] == "worker"]
    assert len(workers) == 2

    models = ("models", True)
    datasets = ("datasets", True)
    assert claim_mounts(head) == {"/mnt/pvc/models": models, "/mnt/pvc/datasets": datasets}
    for worker in workers:
        assert claim_mounts(worker) == {
            "/mnt/pvc/models": models,
            "/mnt/pvc/datasets": datasets,
            "/mnt/pvc/evals": ("evals", True),
        }
    for pod in (head, *workers):
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        # Object-store storage: local scratch at the storage mount, no claim for it.
        assert volumes["storage"]["emptyDir"] == {}
        for name, vol in volumes.items():
            if name.startswith("pvc-"):
                assert vol["persistentVolumeClaim"]["readOnly"] is True
        (container,) = pod["spec"]["containers"]
        assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
        assert {"name": "storage", "mountPath": "/storage"} in container["volumeMounts"]

    # The driver exports to the object store and reports the model's URL there.
    folder = f"stored-{get_uid('stored', namespace).replace('-', '')[:8]}"
    model_url = f"{STORAGE}/{folder}/model"
    start_cluster("stored", namespace)
    message = json.dumps(
        {
            "model": {"uri": model_url, "version": "stored-step200"},
            "evaluation": {"step": 200, "metrics": {"perplexity": 6.7}, "gate": {"passed": True}},
        }
    )
    kubelet.set_terminated(namespace, head["metadata"]["name"], 0, message=message)
    assert wait_phase("stored", namespace, "Succeeded")["model"]["uri"] == model_url
    deployment = wait_until(
        lambda: get("deployment", "stored-serve", namespace), timeout=60, message="Deployment"
    )
    pod_spec = deployment["spec"]["template"]["spec"]
    (server,) = pod_spec["containers"]
    assert server["command"][:5] == [
        "kubetrain",
        "serve",
        model_url,
        "--model-cache",
        "/model-cache/model",
    ]
    assert "--feedback-path" not in server["command"]
    assert server["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert {v["name"]: v for v in pod_spec["volumes"]}["model-cache"]["emptyDir"] == {}
    assert not [v for v in pod_spec["volumes"] if "persistentVolumeClaim" in v]

    # Secrets by reference only: the value is nowhere the operator writes.
    for kind in ("pods", "deployment", "configmap", "trainingrun", "events"):
        out = kubectl("get", kind, "-n", namespace, "-o", "json").stdout
        assert CANARY not in out, kind
    assert CANARY not in json.dumps(status("stored", namespace))


def get(kind: str, name: str, namespace: str) -> dict[str, Any] | None:
    proc = kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def get_uid(name: str, namespace: str) -> str:
    return kubectl("get", "tr", name, "-n", namespace, "-o", "jsonpath={.metadata.uid}").stdout
