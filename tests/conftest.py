"""Shared fixtures. The control-plane fixtures (`cluster`, `namespace`) live in
tests/support/cluster.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import settings

from kubetrain_api import crd

pytest_plugins = [
    "tests.support.cluster",
    "tests.support.postgres",
    "tests.support.realnode",
    "tests.support.s3",
]

# Property tests draw the same examples on every run, so CI is repeatable and a failure
# reproduces; explore more locally with --hypothesis-profile=explore.
settings.register_profile("repeatable", derandomize=True, deadline=None)
settings.register_profile("explore", max_examples=500, deadline=None)
settings.load_profile("repeatable")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def crd_installed(cluster: object) -> None:
    """The generated CRDs (TrainingRun, ModelService) applied to the session's cluster, and
    Established."""
    # Imported here, after pytest_plugins, so its asserts are rewritten.
    from tests.support.cluster import kubectl, wait_until

    for filename, name in (
        (crd.CRD_FILENAME, crd.CRD_NAME),
        (crd.MODELSERVICE_CRD_FILENAME, crd.MODELSERVICE_CRD_NAME),
    ):
        kubectl("apply", "-f", str(ROOT / "crds" / filename))
        # Not `kubectl wait` at once: right after the apply the CRD may have no conditions yet.
        wait_until(
            lambda name=name: (
                '"Established"' in kubectl("get", "crd", name, "-o", "json").stdout
                and kubectl(
                    "wait",
                    "--for=condition=Established",
                    f"crd/{name}",
                    "--timeout=30s",
                    check=False,
                ).returncode
                == 0
            ),
            timeout=60,
            message=f"the CRD {name} to be Established",
        )
