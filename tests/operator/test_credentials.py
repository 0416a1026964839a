"""The operator starts and authenticates the way it does in a pod: in-cluster credentials
(the client stores that token as `bearer <token>`) and a uid with no passwd entry."""

from __future__ import annotations

import getpass
import os
import socket
from pathlib import Path

import kubernetes
import pytest
from kopf._core.engines import peering
from kubernetes.config.incluster_config import InClusterConfigLoader

from kubetrain_operator.cli import operator_identity
from kubetrain_operator.handlers import bearer_token, connection_info


def test_in_cluster_token_reaches_kopf_without_its_scheme(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The files a pod's projected service-account volume holds, read by the real loader.
    (tmp_path / "token").write_text("eyJhbGciOi.in-cluster.token")
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    config = kubernetes.client.Configuration()
    InClusterConfigLoader(
        token_filename=str(tmp_path / "token"), cert_filename=str(tmp_path / "ca.crt")
    ).load_and_set(config)
    assert config.api_key["BearerToken"].startswith("bearer ")  # the client's spelling

    info = connection_info(config)
    assert info.token == "eyJhbGciOi.in-cluster.token"
    assert info.server == "https://10.0.0.1:443"
    assert info.ca_path == str(tmp_path / "ca.crt")


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER  abc ", "abc"),
        ("abc", "abc"),  # a bare token stays as it is
        ("", None),
        ("Bearer ", None),
    ],
)
def test_bearer_token(header: str, token: str | None) -> None:
    assert bearer_token(header) == token


def test_operator_identity_needs_no_passwd_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """As uid 65532 in the operator image, getpass.getuser() raises; kopf's own guess of
    its identity calls it, ours does not. (The image test and the real-node e2e run the
    operator as that uid for real.)"""

    def no_passwd_entry() -> str:
        raise KeyError("getpwuid(): uid not found: 65532")

    monkeypatch.setattr(getpass, "getuser", no_passwd_entry)
    with pytest.raises(KeyError):
        peering.detect_own_id(manual=False)  # what kopf does without an identity

    monkeypatch.delenv("POD_NAME", raising=False)
    assert operator_identity().startswith(f"{socket.gethostname()}/")
    monkeypatch.setenv("POD_NAME", "kubetrain-operator-7d4f9-x2x")
    assert operator_identity() == f"kubetrain-operator-7d4f9-x2x/{os.getpid()}"
