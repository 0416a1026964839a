"""The run's NetworkPolicy: its own pods, the operator and the configured Prometheus get in,
with namespaces selected by labels the installer sets (Kubernetes 1.20 has no
`kubernetes.io/metadata.name`). Built (pure), read from the environment, and accepted by
the local 1.20 API server."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetrain_api import v1alpha1 as api
from kubetrain_api.validation import load_documents, parse
from kubetrain_operator import builders
from kubetrain_operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[2]
UID = "0b6a0e1c-1111-4222-8333-444455556666"
NS = "team-a"
OPERATOR = {"matchLabels": {"app.kubernetes.io/name": "kubetrain-operator"}}
TEAM_PROMETHEUS = {
    "matchExpressions": [{"key": "team", "operator": "In", "values": ["ml", "infra"]}]
}


def quickstart() -> api.TrainingRun:
    return parse(load_documents((ROOT / "examples" / "quickstart.yaml").read_text())[0])


def policy(settings: OperatorSettings) -> dict[str, Any]:
    return builders.build_network_policy(quickstart(), UID, NS, settings)


def telemetry_peers(built: dict[str, Any]) -> list[dict[str, Any]]:
    own, telemetry = built["spec"]["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": {"kubetrain.dev/run": "quickstart"}}}]}
    assert telemetry["ports"] == [{"protocol": "TCP", "port": 8080}]
    return list(telemetry["from"])


def test_defaults_admit_the_operator_and_prometheus_by_namespace_name_labels() -> None:
    built = policy(OperatorSettings())
    assert built["spec"]["podSelector"] == {"matchLabels": {"kubetrain.dev/run": "quickstart"}}
    assert built["spec"]["policyTypes"] == ["Ingress"]
    assert telemetry_peers(built) == [
        {
            "namespaceSelector": {"matchLabels": {"name": "kubetrain-system"}},
            "podSelector": OPERATOR,
        },
        {
            "namespaceSelector": {"matchLabels": {"name": "monitoring"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        },
    ]
    # Kubernetes 1.20 does not label namespaces with their name: a policy selecting by
    # that label would admit nobody there.
    assert "kubernetes.io/metadata.name" not in json.dumps(built)


def test_the_operator_namespace_label_follows_where_it_runs() -> None:
    (operator, _) = telemetry_peers(policy(OperatorSettings(operator_namespace="ops")))
    assert operator["namespaceSelector"] == {"matchLabels": {"name": "ops"}}


def test_configured_selectors_are_used_as_given() -> None:
    settings = OperatorSettings(
        operator_namespace_selector={"matchLabels": {"kubetrain.dev/operator": "true"}},
        prometheus_namespace_selector=TEAM_PROMETHEUS,
        prometheus_pod_selector={"matchLabels": {"prometheus": "k8s"}},
    )
    assert telemetry_peers(policy(settings)) == [
        {
            "namespaceSelector": {"matchLabels": {"kubetrain.dev/operator": "true"}},
            "podSelector": OPERATOR,
        },
        {
            "namespaceSelector": TEAM_PROMETHEUS,
            "podSelector": {"matchLabels": {"prometheus": "k8s"}},
        },
    ]


def test_null_selectors_mean_what_they_mean_in_a_network_policy_peer() -> None:
    defaults = OperatorSettings()
    same_namespace = dataclasses.replace(defaults, prometheus_namespace_selector=None)
    assert telemetry_peers(policy(same_namespace))[1] == {
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
    }
    whole_namespace = dataclasses.replace(defaults, prometheus_pod_selector=None)
    assert telemetry_peers(policy(whole_namespace))[1] == {
        "namespaceSelector": {"matchLabels": {"name": "monitoring"}}
    }
    nobody = dataclasses.replace(
        defaults, prometheus_namespace_selector=None, prometheus_pod_selector=None
    )
    assert len(telemetry_peers(policy(nobody))) == 1  # the operator only


def test_settings_read_the_selectors_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETRAIN_OPERATOR_NAMESPACE_SELECTOR", '{"matchLabels": {"a": "b"}}')
    monkeypatch.setenv("KUBETRAIN_PROMETHEUS_NAMESPACE_SELECTOR", json.dumps(TEAM_PROMETHEUS))
    monkeypatch.setenv("KUBETRAIN_PROMETHEUS_POD_SELECTOR", "null")
    settings = OperatorSettings.from_env()
    assert settings.operator_namespace_selector == {"matchLabels": {"a": "b"}}
    assert settings.prometheus_namespace_selector == TEAM_PROMETHEUS
    assert settings.prometheus_pod_selector is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not JSON"),
        ('{"matchLabel": {"a": "b"}}', "only matchLabels and matchExpressions"),
        ('{"matchLabels": {"a": 1}}', "string values"),
        ('{"matchExpressions": [{"key": "a", "operator": "Is"}]}', "operator"),
        ('{"matchExpressions": [{"operator": "Exists"}]}', "a key"),
        ('["name", "monitoring"]', "only matchLabels and matchExpressions"),
    ],
)
def test_bad_selectors_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    monkeypatch.setenv("KUBETRAIN_PROMETHEUS_POD_SELECTOR", text)
    with pytest.raises(ValueError, match=f"KUBETRAIN_PROMETHEUS_POD_SELECTOR: .*{message}"):
        OperatorSettings.from_env()


@pytest.mark.controlplane
def test_the_kubernetes_1_20_api_server_accepts_the_policy(cluster: Any, namespace: str) -> None:
    from tests.support.cluster import kubectl

    variants = {
        "defaults": OperatorSettings(),
        "configured": OperatorSettings(
            operator_namespace_selector={"matchLabels": {"kubetrain.dev/operator": "true"}},
            prometheus_namespace_selector=TEAM_PROMETHEUS,
            prometheus_pod_selector=None,
        ),
    }
    for variant, settings in variants.items():
        built = builders.build_network_policy(quickstart(), UID, namespace, settings)
        built["metadata"]["name"] = variant
        del built["metadata"]["ownerReferences"]  # no such run here
        kubectl("apply", "-f", "-", input=yaml.safe_dump(built))
        stored = json.loads(
            kubectl("get", "networkpolicy", variant, "-n", namespace, "-o", "json").stdout
        )
        assert stored["spec"] == built["spec"], variant  # nothing dropped or rewritten
