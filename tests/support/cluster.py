"""Pytest fixtures for a real local Kubernetes control plane (see hack/controlplane.py).

Register with ``pytest_plugins = ["tests.support.cluster"]`` and mark tests that use these
fixtures with ``@pytest.mark.controlplane``.

- ``cluster`` (session): a private control plane in a tmp dir, torn down at the end; or, if
  ``KUBETRAIN_KUBECONFIG`` names an admin kubeconfig (e.g. from ``make cluster-up``), that
  cluster, left running.
- ``namespace`` (function): a fresh namespace, deleted (without waiting) after the test.
- ``kubectl(...)``: the wheel's kubectl, with the admin kubeconfig unless told otherwise.

When a test that uses the cluster fails, the tails of the component logs are attached to its
report, and the logs of a private cluster are kept in pytest's tmp dir.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, TypeVar

import pytest

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[2]
LOG_TAIL_LINES = 30


def load_hack_script(filename: str) -> ModuleType:
    """Import a script of hack/ (not a package) once, as `kubetrain_hack_<stem>`."""
    name = f"kubetrain_hack_{Path(filename).stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "hack" / filename)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load hack/{filename}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


controlplane = load_hack_script("controlplane.py")
if TYPE_CHECKING:
    from hack.controlplane import Cluster as Cluster
else:
    Cluster = controlplane.Cluster

# The cluster of this session, so kubectl() knows its default kubeconfig.
_active: Cluster | None = None
_failed_with_cluster: list[str] = []


class KubectlError(subprocess.CalledProcessError):
    """CalledProcessError whose message includes kubectl's stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


def kubectl(
    *args: str,
    kubeconfig: str | os.PathLike[str] | None = None,
    input: str | None = None,  # same name as subprocess.run's
    check: bool = True,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run kubectl against the session's cluster (admin kubeconfig by default)."""
    if kubeconfig is None:
        if _active is not None:
            kubeconfig = _active.kubeconfig
        elif os.environ.get("KUBETRAIN_KUBECONFIG"):
            kubeconfig = os.environ["KUBETRAIN_KUBECONFIG"]
        else:
            raise RuntimeError("no cluster: use the `cluster` fixture or pass kubeconfig=")
    binary = controlplane.fetch_tools() / "kubectl"
    cmd = [str(binary), "--kubeconfig", str(kubeconfig), *args]
    proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise KubectlError(proc.returncode, cmd, proc.stdout, proc.stderr)
    return proc


def wait_until(
    condition: Callable[[], T],
    timeout: float = 60,
    interval: float = 0.5,
    message: str = "condition",
) -> T:
    """Poll condition() until it returns something truthy; return that, or fail the test."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {message} (last: {last!r})")


def pytest_configure(config: pytest.Config) -> None:
    # Harmless if pyproject registers it as well; avoids the unknown-marker warning otherwise.
    config.addinivalue_line("markers", "controlplane: needs the local Kubernetes control plane")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and _active is not None and "cluster" in getattr(item, "fixturenames", ()):
        _failed_with_cluster.append(item.nodeid)
        report.sections.append(
            ("control plane logs", _active.log_tails(LOG_TAIL_LINES) or "<no logs>")
        )
    return report


@pytest.fixture(scope="session")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """A running control plane for the whole test session."""
    global _active
    existing = os.environ.get("KUBETRAIN_KUBECONFIG")
    if existing:
        _active = controlplane.attach(Path(existing))
        try:
            yield _active
        finally:
            _active = None
        return

    state = tmp_path_factory.mktemp("controlplane")
    # The first build takes minutes: show its progress instead of capturing it.
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        controlplane.build()
        controlplane.fetch_tools()
        try:
            _active = controlplane.up(state, die_with_parent=True)
        except controlplane.ControlPlaneError:
            controlplane.down(state, keep_logs=True)
            raise
    try:
        yield _active
    finally:
        keep = bool(_failed_with_cluster)
        _active = None
        controlplane.down(state, keep_logs=keep)
        if keep:
            sys.stderr.write(f"\ncontrol plane logs kept in {state / 'logs'}\n")


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace named after the test; deleted afterwards without waiting."""
    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{stem or 't'}-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name, kubeconfig=cluster.kubeconfig)
    # Pods are rejected until the ServiceAccount controller has made `default` and its token.
    wait_until(
        lambda: kubectl(
            "get",
            "serviceaccount",
            "default",
            "-n",
            name,
            "-o",
            "jsonpath={.secrets[0].name}",
            kubeconfig=cluster.kubeconfig,
            check=False,
        ).stdout.strip(),
        timeout=60,
        message=f"ServiceAccount {name}/default",
    )
    try:
        yield name
    finally:
        kubectl(
            "delete",
            "namespace",
            name,
            "--wait=false",
            "--ignore-not-found",
            kubeconfig=cluster.kubeconfig,
            check=False,
        )


def server_dry_run(path: Path, namespace: str) -> tuple[int, str]:
    """(exit code, stderr) of creating the objects in `path` with --dry-run=server: what the
    API server alone says of them (--validate=false: not kubectl's client-side checks)."""
    out = kubectl(
        "create", "--dry-run=server", "--validate=false", "-n", namespace, "-f", str(path),
        check=False,
    )  # fmt: skip
    return out.returncode, out.stderr


@contextlib.contextmanager
def scratch_namespace(prefix: str) -> Iterator[str]:
    """A new namespace whose `default` ServiceAccount exists (the API server refuses pods,
    even in a dry run, until the ServiceAccount controller made it); deleted afterwards
    without waiting."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name)
    wait_until(
        lambda: (
            kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0
        ),
        timeout=60,
        message=f"ServiceAccount {name}/default",
    )
    try:
        yield name
    finally:
        kubectl("delete", "namespace", name, "--wait=false", check=False)
