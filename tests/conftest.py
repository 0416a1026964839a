"""Shared fixtures. The control-plane fixtures (`cluster`, `namespace`) live in
tests/support/cluster.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetrain_api import crd

pytest_plugins = ["tests.support.cluster"]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def crd_installed(cluster: object) -> None:
    """The generated CRD applied to the session's cluster, and Established."""
    from tests.support.cluster import kubectl  # after pytest_plugins, so asserts are rewritten

    kubectl("apply", "-f", str(ROOT / "crds" / crd.CRD_FILENAME))
    kubectl("wait", "--for=condition=Established", f"crd/{crd.CRD_NAME}", "--timeout=60s")
