"""Helpers for tests that drive TrainingRuns on the local control plane: apply runs, read
their status, wait for phases and pods, and move pods like a kubelet would."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from kubetrain_api import validation
from tests.support import kubelet
from tests.support.cluster import kubectl, wait_until

ROOT = Path(__file__).resolve().parents[2]
RBAC = ROOT / "operator" / "deploy" / "rbac.yaml"


def example(stem: str, name: str | None = None, **spec_changes: Any) -> dict[str, Any]:
    """examples/<stem>.yaml as a dict, renamed when `name` is given, with `a__b=value`
    setting spec.a.b."""
    (doc,) = validation.load_documents((ROOT / "examples" / f"{stem}.yaml").read_text())
    if name is not None:
        doc["metadata"]["name"] = name
    for path, value in spec_changes.items():
        node = doc["spec"]
        *parents, leaf = path.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return dict(doc)


def quickstart(name: str, **spec_changes: Any) -> dict[str, Any]:
    return example("quickstart", name, **spec_changes)


def apply(doc: dict[str, Any], namespace: str) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))


def get_run(name: str, namespace: str) -> dict[str, Any]:
    return dict(json.loads(kubectl("get", "tr", name, "-n", namespace, "-o", "json").stdout))


def status(name: str, namespace: str) -> dict[str, Any]:
    return dict(get_run(name, namespace).get("status") or {})


def wait_phase(name: str, namespace: str, phase: str, timeout: float = 60) -> dict[str, Any]:
    return wait_until(
        lambda: (s := status(name, namespace)).get("phase") == phase and s,
        timeout=timeout,
        message=f"{name} to reach {phase}",
    )


def run_pods(name: str, namespace: str, attempt: int | None = None) -> list[dict[str, Any]]:
    selector = f"kubetrain.dev/run={name}"
    if attempt is not None:
        selector += f",kubetrain.dev/attempt={attempt}"
    return [
        p for p in kubelet.pods(namespace, selector) if not p["metadata"].get("deletionTimestamp")
    ]


def wait_pods(name: str, namespace: str, attempt: int, count: int) -> list[dict[str, Any]]:
    return wait_until(
        lambda: len(pods := run_pods(name, namespace, attempt)) == count and pods,
        timeout=60,
        message=f"{count} pods of attempt {attempt}",
    )


def head(pods: list[dict[str, Any]]) -> str:
    return next(p["metadata"]["name"] for p in pods if p["metadata"]["name"].endswith("-head"))


def start_cluster(name: str, namespace: str, attempt: int = 1, workers: int = 2) -> str:
    """Wait for the attempt's pods and move them all to Running; return the head's name."""
    pods = wait_pods(name, namespace, attempt, workers + 1)
    for pod in pods:
        kubelet.set_running(namespace, pod["metadata"]["name"])
    return head(pods)


def condition(st: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in st.get("conditions", []) if c["type"] == type_)


def events(name: str, namespace: str) -> list[dict[str, Any]]:
    out = kubectl(
        "get",
        "events",
        "-n",
        namespace,
        "--field-selector",
        f"involvedObject.name={name}",
        "-o",
        "json",
    )
    return list(json.loads(out.stdout)["items"])
