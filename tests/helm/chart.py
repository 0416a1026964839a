"""Run the real helm binary (hack/controlplane.py's, v4) on helm/kubetrain."""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.support.cluster import controlplane, kubectl
from tests.support.runs import RBAC

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kubetrain"
RELEASE = "kubetrain"
NAMESPACE = "kubetrain-system"

Doc = dict[str, Any]


def helm(
    *args: str, values: Doc | None = None, kubeconfig: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """helm ARGS [-f values.json]; stderr in the message when check fails."""
    cmd = [str(controlplane.fetch_tools() / "helm"), *args]
    if kubeconfig is not None:
        cmd += ["--kubeconfig", str(kubeconfig)]
    with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
        if values is not None:
            json.dump(values, file)  # JSON is YAML
            file.flush()
            cmd += ["-f", file.name]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return proc


def template(values: Doc | None = None, *extra: str) -> list[Doc]:
    """The chart's manifests as `helm install` would send them (CRDs included)."""
    out = helm(
        "template", RELEASE, str(CHART), "-n", NAMESPACE, "--include-crds", *extra, values=values
    )
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def find(docs: list[Doc], kind: str, name: str | None = None) -> list[Doc]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def install_release(cluster: Any, values: Doc | None = None) -> None:
    """`helm install` the chart as release `kubetrain` in kubetrain-system."""
    helm(
        "install",
        RELEASE,
        str(CHART),
        "-n",
        NAMESPACE,
        "--create-namespace",
        values=values,
        kubeconfig=cluster.kubeconfig,
    )


@contextlib.contextmanager
def operator_identity_from_chart(cluster: Any) -> Iterator[None]:
    """Let only the chart grant the operator token its rights, for the block.

    tests/operator applies operator/deploy/rbac.yaml: objects with the chart's names that
    Helm refuses to take over, and a binding that would grant the operator token the same
    rights whatever the chart says. They go for the block and come back after it; the
    release is uninstalled before and after."""
    helm("uninstall", RELEASE, "-n", NAMESPACE, kubeconfig=cluster.kubeconfig, check=False)
    had_static_rbac = bool(
        kubectl("get", "clusterrolebinding", "kubetrain-operator", "--ignore-not-found").stdout
    )
    kubectl("delete", "-f", str(RBAC), "--ignore-not-found")
    try:
        yield
    finally:
        helm("uninstall", RELEASE, "-n", NAMESPACE, kubeconfig=cluster.kubeconfig, check=False)
        if had_static_rbac:
            kubectl("apply", "-f", str(RBAC))
