"""Pytest support for hack/node.py: a real Kubernetes node (containerd, kubelet, kube-proxy,
cluster DNS, hostPath volumes) joined to the session's control plane.

- ``real_node`` (module): a node started against ``cluster``, Ready before the module's
  first test, torn down after its last (or the node `make cluster-up` started for the
  cluster KUBETRAIN_KUBECONFIG names, left running). It yields a ``RealNode``:

  - ``name``: the Node's name; ``dir``: its state directory; ``ip``: node/bridge address;
    ``subnet``: the pod CIDR; ``node``: hack/node.py's ``Node``
  - ``import_image(archive) -> list[str]``: import a docker-archive tarball into containerd
  - ``busybox_image() -> str``: a tiny busybox image (built once, cached), imported
  - ``pod_logs(namespace, pod) -> str``: every container's log, current and previous
  - ``diagnostics(namespace) -> str``: pods, events and the node's log tails
  - ``log_tails(lines) -> str``: the last lines of kubelet, containerd, kube-proxy, ...

- ``pytest_runtest_makereport``: a failed test that used ``real_node`` gets the node's log
  tails in its report.
- ``start_node(cluster, state_dir)``: the same as a context manager (e.g. for a teardown
  test that needs its own node); ``existing_node(cluster)``: the node already serving the
  cluster, if any (one node per machine: see hack/node.py).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import controlplane, kubectl, load_hack_script

LOG_TAIL_LINES = 40
_active: list[RealNode] = []
_failed: list[str] = []


nodelib = load_hack_script("node.py")


class RealNode:
    """A running hack/node.py node, with helpers for tests."""

    def __init__(self, node: Any, cluster: Any):
        self.node = node
        self.cluster = cluster
        self.name: str = node.name
        self.dir: Path = node.dir
        self.ip: str = node.ip
        self.subnet: str = node.subnet
        self._busybox: str | None = None

    def import_image(self, archive: Path | str) -> list[str]:
        return list(nodelib.import_image(self.node, archive))

    def busybox_image(self) -> str:
        if self._busybox is None:
            archive, ref = nodelib.busybox_archive()
            self.import_image(archive)
            self._busybox = ref
        return self._busybox

    def log_tails(self, lines: int = LOG_TAIL_LINES) -> str:
        return str(self.node.log_tails(lines))

    def pod_logs(self, namespace: str, pod: str, tail: int = 200) -> str:
        """The logs of every container of the pod (and of its previous instance, if any)."""
        out = kubectl(
            "get", "pod", pod, "-n", namespace, "-o",
            "jsonpath={range .spec.initContainers[*]}{.name} {end}"
            "{range .spec.containers[*]}{.name} {end}",
            kubeconfig=self.cluster.kubeconfig, check=False,
        )  # fmt: skip
        parts = []
        for container in out.stdout.split():
            for previous in (False, True):
                args = ["logs", pod, "-n", namespace, "-c", container, f"--tail={tail}"]
                proc = kubectl(
                    *args,
                    *(["--previous"] if previous else []),
                    kubeconfig=self.cluster.kubeconfig,
                    check=False,
                )
                if proc.returncode == 0 and (proc.stdout or not previous):
                    label = f"{container}{' (previous)' if previous else ''}"
                    parts.append(f"----- {namespace}/{pod} {label} -----\n{proc.stdout}")
        return "\n".join(parts) or f"<no logs for {namespace}/{pod}: {out.stderr.strip()}>"

    def diagnostics(self, namespace: str | None = None) -> str:
        """Pods (wide), recent events, every pod's logs in namespace, and the node's logs."""
        kc = self.cluster.kubeconfig
        ns_args = ["-n", namespace] if namespace else ["-A"]
        parts = [
            kubectl("get", "pods", "-o", "wide", *ns_args, kubeconfig=kc, check=False).stdout,
            kubectl(
                "get", "events", "--sort-by=.lastTimestamp", *ns_args, kubeconfig=kc, check=False
            ).stdout,
        ]  # fmt: skip
        if namespace:
            pods = kubectl(
                "get", "pods", "-n", namespace, "-o", "name", kubeconfig=kc, check=False
            ).stdout.split()
            parts += [self.pod_logs(namespace, p.split("/", 1)[1]) for p in pods]
        parts.append(self.log_tails())
        parts.append(_machine_load())
        return "\n".join(parts)


def _machine_load() -> str:
    """Load average and the busiest processes: a slow run on a starved machine says so."""
    ps = subprocess.run(
        ["ps", "-eo", "pcpu,rss,etime,args", "--sort=-pcpu"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    top = "\n".join(line[:160] for line in ps.stdout.splitlines()[:12])
    return f"----- load average {os.getloadavg()} -----\n{top}\n"


def existing_node(cluster: Any) -> RealNode | None:
    """A node already serving cluster: this session's, or the one `make cluster-up` runs."""
    if _active:
        return _active[0]
    running = nodelib.running_node_dir()
    if running is None or not (Path(running) / "node.json").is_file():
        return None
    node = nodelib.load(running)
    if node.kubeconfig != Path(cluster.kubeconfig).resolve():
        return None
    return RealNode(node, cluster)


@contextlib.contextmanager
def start_node(cluster: Any, state_dir: Path) -> Iterator[RealNode]:
    """A node for the duration of the block; its logs are kept if the block fails."""
    try:
        node = nodelib.up(state_dir, cluster, die_with_parent=True)
    except BaseException:
        sys.stderr.write(f"\nnode logs kept in {state_dir / 'logs'}\n")
        nodelib.down(state_dir, keep_logs=True)
        raise
    real = RealNode(node, cluster)
    _active.append(real)
    ok = False
    try:
        yield real
        ok = True
    finally:
        _active.remove(real)
        keep = not ok or bool(_failed)
        nodelib.down(state_dir, keep_logs=keep)
        if keep:
            sys.stderr.write(f"\nnode logs kept in {state_dir / 'logs'}\n")


# Module scope: a node runs only while a module that asks for it does, so the pods that other
# tests leave Pending (no kubelet) stay Pending, and tests/realnode's teardown test has the
# machine to itself. Starting one takes about 20 s.
@pytest.fixture(scope="module")
def real_node(
    cluster: Any, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RealNode]:
    """A real node joined to the session's control plane, Ready; torn down after the module.

    With KUBETRAIN_KUBECONFIG naming a `make cluster-up` cluster whose node runs, that node
    is used and left running.
    """
    existing = existing_node(cluster)
    if existing is not None:
        yield existing
        return
    state = tmp_path_factory.mktemp("realnode")
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        controlplane.build()  # kubelet, kube-proxy and pause come with the control plane
    with start_node(cluster, state) as node:
        yield node


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "realnode: runs pods on a real node (hack/node.py)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and _active and "real_node" in getattr(item, "fixturenames", ()):
        _failed.append(item.nodeid)
        for node in _active:
            report.sections.append((f"node {node.name}", node.log_tails()))
    return report
