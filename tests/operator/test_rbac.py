"""The operator's RBAC (operator/deploy/rbac.yaml) is least privilege and covers its needs.

That it grants exactly what the operator calls is tests/operator/test_rbac_audit.py's job."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetrain_api.validation import load_documents, parse
from kubetrain_operator import builders
from kubetrain_operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[2]
RBAC = ROOT / "operator" / "deploy" / "rbac.yaml"
# What the builders create, by (API group, resource).
PLURALS = {
    "ConfigMap": "configmaps",
    "Secret": "secrets",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "NetworkPolicy": "networkpolicies",
    "Service": "services",
    "Pod": "pods",
}


@pytest.fixture(scope="module")
def docs() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(RBAC.read_text())}


@pytest.fixture(scope="module")
def rules(docs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return list(docs["ClusterRole"]["rules"])


def grants(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def test_objects_and_binding(docs: dict[str, dict[str, Any]]) -> None:
    assert set(docs) == {
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
    }
    account = docs["ServiceAccount"]["metadata"]
    assert (account["name"], account["namespace"]) == ("kubetrain-operator", "kubetrain-system")
    assert "namespace" not in docs["ClusterRole"]["metadata"]
    binding = docs["ClusterRoleBinding"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": docs["ClusterRole"]["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kubetrain-operator", "namespace": "kubetrain-system"}
    ]


def test_leader_election_reaches_only_its_own_lease(docs: dict[str, dict[str, Any]]) -> None:
    role, binding = docs["Role"], docs["RoleBinding"]
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "kubetrain-system"
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == docs["ClusterRoleBinding"]["subjects"]
    named = {"get", "update"}
    for rule in role["rules"]:
        assert (rule["apiGroups"], rule["resources"]) == (["coordination.k8s.io"], ["leases"])
        if set(rule["verbs"]) == named:
            assert rule["resourceNames"] == [OperatorSettings().lease_name]
        else:
            assert rule["verbs"] == ["create"]  # create cannot be limited to a name


def test_no_wildcards_or_dangerous_verbs(rules: list[dict[str, Any]]) -> None:
    for rule in rules:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no nonResourceURLs
        for field in ("apiGroups", "resources", "verbs"):
            assert not any("*" in value for value in rule[field]), rule
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule


def test_secrets_cannot_be_enumerated(rules: list[dict[str, Any]]) -> None:
    secret_verbs = grants(rules)[("", "secrets")]
    assert not {"list", "watch", "deletecollection"} & secret_verbs
    assert {"create", "get"} <= secret_verbs


def test_no_way_into_pods(rules: list[dict[str, Any]]) -> None:
    resources = {resource for rule in rules for resource in rule["resources"]}
    assert not {"pods/exec", "pods/attach", "pods/portforward", "pods/proxy"} & resources
    assert not any(r.startswith(("pods/", "nodes", "serviceaccounts")) for r in resources)


def test_only_runs_and_watched_children_can_be_enumerated(rules: list[dict[str, Any]]) -> None:
    """Runs and ModelServices, and the children whose events queue them (pods by the run
    label; Services and Deployments by the managed-by label), can be listed; every other
    child is read by name, Secrets above all.
    What the grants equal is tests/operator/test_rbac_audit.py's (the API server's audit
    log of the operator at work)."""
    enumerable = {
        (group, resource)
        for (group, resource), verbs in grants(rules).items()
        if {"list", "watch", "deletecollection"} & verbs
    }
    assert enumerable == {
        ("kubetrain.dev", "trainingruns"),
        ("kubetrain.dev", "modelservices"),
        ("", "pods"),
        ("", "services"),
        ("apps", "deployments"),
        ("batch", "jobs"),
        ("apiextensions.k8s.io", "customresourcedefinitions"),
    }


def test_every_rule_is_justified(docs: dict[str, dict[str, Any]]) -> None:
    lines = RBAC.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"^\s*- apiGroups:", line)]
    assert len(starts) == sum(len(docs[kind]["rules"]) for kind in ("ClusterRole", "Role"))
    for i in starts:
        assert lines[i - 1].strip().startswith("#"), f"rule at line {i + 1} has no comment"


def test_covers_what_the_builders_create(rules: list[dict[str, Any]]) -> None:
    granted = grants(rules)
    run = parse(load_documents((ROOT / "examples" / "quickstart.yaml").read_text())[0])
    for obj in builders.build_cluster(run, "uid", "ns", 1, OperatorSettings(), "token"):
        group = obj["apiVersion"].rpartition("/")[0]
        verbs = granted[(group, PLURALS[obj["kind"]])]
        assert {"create", "get"} <= verbs, obj["kind"]
