"""Fixtures for the operator's tests: its default settings (unit tests), its API client with
no operator running (`kube`), and the operator itself, in-process, against the local
control plane (`operator`, with `progress`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest

from kubetrain_operator.k8s import Kube
from kubetrain_operator.settings import OperatorSettings
from tests.support import kubelet
from tests.support.cluster import kubectl
from tests.support.operators import in_process_operator
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
    kubectl("create", "namespace", "kubetrain-system", check=False)
    kubectl("apply", "-f", str(RBAC))
    with in_process_operator(
        cluster.operator_kubeconfig,
        "--all-namespaces",
        KUBETRAIN_PROGRESS_PORT=str(progress.port),
        KUBETRAIN_PROGRESS_HOST="127.0.0.1",
    ):
        yield


@pytest.fixture
def kube(cluster: Any, crd_installed: None) -> Kube:
    """The operator's API client, with the operator's token and RBAC, and no operator."""
    kubectl("create", "namespace", "kubetrain-system", check=False)
    kubectl("apply", "-f", str(RBAC))
    client = kubernetes.config.new_client_from_config(config_file=str(cluster.operator_kubeconfig))
    return Kube(client)
