"""Pytest support for hack/noderunner.py: a local node that runs the cluster's pods as
processes (network namespaces, volumes, probes, pod status, a ClusterIP proxy).

- ``node`` (module): a runner registered against the session's ``cluster``, stopped after
  the module (every process it started ends, its Node goes).
- ``running_node(cluster, state_dir)``: the same as a context manager, for tests that need
  their own runner.
- ``pytest_runtest_makereport``: import it into a conftest next to the tests (as
  tests/noderunner/conftest.py does) to attach the runner's log and the last lines of each
  pod's log to the report of a failed test (``kubectl logs`` has no kubelet to ask).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import controlplane, kubectl, wait_until

RUNNER = Path(__file__).resolve().parents[2] / "hack" / "noderunner.py"
LOG_TAIL_LINES = 40
_active: list[NodeRunner] = []


class NodeRunner:
    """hack/noderunner.py as a child process."""

    def __init__(self, kubeconfig: Path, state_dir: Path, name: str):
        self.kubeconfig = kubeconfig
        self.state_dir = state_dir
        self.name = name
        self.log_path = state_dir / "runner.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(RUNNER),
                    "--kubeconfig",
                    str(self.kubeconfig),
                    "--state-dir",
                    str(self.state_dir / "state"),
                    "--node",
                    self.name,
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # If pytest dies, the runner still gets SIGTERM and ends its pods.
                preexec_fn=controlplane._parent_death_signal(),
            )
        wait_until(
            lambda: self._alive_or_fail() and "noderunner: ready" in self.log(),
            timeout=timeout,
            message=f"node runner {self.name} to start",
        )

    def _alive_or_fail(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"node runner exited {self.proc.returncode}:\n{self.log()}")
        return True

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then wait; returns the runner's exit code (SIGKILL after timeout)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def pod_log(self, namespace: str, pod: str, container: str) -> str:
        path = self.state_dir / "state" / "logs" / f"{namespace}_{pod}_{container}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def started_pids(self) -> list[int]:
        """Pids of every container shim the runner started (each leads its pod's PIDs)."""
        path = self.state_dir / "state" / "pids"
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def log_tails(self, lines: int = LOG_TAIL_LINES) -> str:
        parts = [f"===== node runner {self.name} =====\n" + _tail(self.log(), lines)]
        for path in sorted((self.state_dir / "state" / "logs").glob("*.log")):
            text = path.read_text(errors="replace")
            parts.append(
                f"===== pod log {path.stem} (last {lines} lines) =====\n{_tail(text, lines)}"
            )
        return "\n".join(parts)


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def running_node(cluster: Any, state_dir: Path, name: str | None = None) -> Iterator[NodeRunner]:
    name = name or f"kt-node-{uuid.uuid4().hex[:6]}"
    runner = NodeRunner(Path(cluster.kubeconfig), state_dir, name)
    _active.append(runner)
    try:
        runner.start()
        yield runner
    finally:
        try:
            runner.stop()
        finally:
            _active.remove(runner)
            if not any(r.name == runner.name for r in _active):
                kubectl("delete", "node", runner.name, "--ignore-not-found", check=False)


@pytest.fixture(scope="module")
def node(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeRunner]:
    """A node runner for the module's tests; its pods run as local processes."""
    state = tmp_path_factory.mktemp("node")
    with running_node(cluster, state) as runner:
        wait_until(
            lambda: (
                "True"
                in kubectl(
                    "get",
                    "node",
                    runner.name,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                    check=False,
                ).stdout
            ),
            timeout=30,
            message=f"Node {runner.name} Ready",
        )
        yield runner


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and _active:
        for runner in _active:
            report.sections.append((f"node {runner.name}", runner.log_tails()))
    return report
