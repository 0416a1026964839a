"""Helpers for tests that drive TrainingRuns on the local control plane: apply runs, read
their status, wait for phases and pods, and move pods like a kubelet would."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
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
    """The run's status once it reaches phase. On a timeout the failure names the run's last
    phase, attempts, step and conditions: CI shows the summary line, not the logs."""
    last: dict[str, Any] = {}

    def reached() -> dict[str, Any] | bool:
        last.clear()
        last.update(status(name, namespace))
        return last.get("phase") == phase and dict(last)

    try:
        return wait_until(reached, timeout=timeout, message=f"{name} to reach {phase}")
    except pytest.fail.Exception:
        pytest.fail(f"{name} did not reach {phase} in {timeout}s; {describe(last)}")


def describe(status_: dict[str, Any]) -> str:
    """One line of a run's status: phase, attempts, step and its conditions' reasons."""
    conditions = "; ".join(
        f"{c.get('type')}={c.get('status')} {c.get('reason', '')}: {c.get('message', '')}"
        for c in status_.get("conditions") or []
    )
    step = (status_.get("progress") or {}).get("step")
    return (
        f"phase={status_.get('phase')} attempts={status_.get('attempts')} step={step} "
        f"message={status_.get('message')!r} conditions=[{conditions}]"
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
