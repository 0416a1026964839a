"""Fixtures for the operator's tests: its default settings (unit tests), and the operator
itself, in-process, against the local control plane (`operator`, with `progress`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from kubetrain_operator.settings import OperatorSettings
from tests.support import kubelet
from tests.support.cluster import kubectl
from tests.support.runs import RBAC


@pytest.fixture
def settings() -> OperatorSettings:
    """The operator's defaults, as an installation without overrides runs it."""
    return OperatorSettings()


@pytest.fixture(scope="module")
def progress() -> Iterator[kubelet.FakeProgress]:
    """The heads' /progress endpoint, played by the test."""
    server = kubelet.FakeProgress()
    yield server
    server.close()


@pytest.fixture(scope="module")
def operator(cluster: Any, crd_installed: None, progress: kubelet.FakeProgress) -> Iterator[None]:
    """The operator (kopf's KopfRunner, in this process) with the chart's RBAC and the
    operator token, resyncing every second. One per test module."""
    from kopf.testing import KopfRunner

    kubectl("create", "namespace", "kubetrain-system", check=False)
    kubectl("apply", "-f", str(RBAC))
    env = {
        "KUBECONFIG": str(cluster.operator_kubeconfig),
        "KUBETRAIN_RESYNC_SECONDS": "1",
        "KUBETRAIN_PROGRESS_PORT": str(progress.port),
        "KUBETRAIN_PROGRESS_HOST": "127.0.0.1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    args = ["run", "--standalone", "--all-namespaces", "-m", "kubetrain_operator.handlers"]
    try:
        with KopfRunner(args, timeout=60) as runner:
            yield
        assert runner.exit_code == 0, runner.output
        assert runner.exception is None, runner.output
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
