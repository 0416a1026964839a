"""The Helm chart, rendered by the real helm: lint, schema, every flag combination, the
restricted Pod Security profile, least-privilege RBAC equal to operator/deploy/rbac.yaml,
the values documentation, and API versions that exist from Kubernetes 1.20 to current."""

from __future__ import annotations

import base64
import functools
import itertools
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetrain_api import crd
from kubetrain_api import v1alpha1 as api
from kubetrain_api.contract import WEBHOOK_PATH
from kubetrain_api.validation import load_documents, parse
from kubetrain_cli.main import build_parser
from kubetrain_operator import builders, serving
from kubetrain_operator.cli import operator_identity
from kubetrain_operator.settings import OperatorSettings
from tests.helm import values_doc
from tests.helm.chart import CHART, NAMESPACE, ROOT, Doc, find, helm, template

RBAC = ROOT / "operator" / "deploy" / "rbac.yaml"
WATCHED = ["team-a", "team-b"]
MONITORING_ON = {
    "serviceMonitor": {"enabled": True, "additionalLabels": {"release": "kps"}},
    "podMonitors": {"enabled": True, "additionalLabels": {"release": "kps"}},
    "prometheusRule": {"enabled": True, "additionalLabels": {"release": "kps"}},
    "dashboards": {"enabled": True},
    "podAnnotations": True,
}
MONITORING_OFF = {
    "serviceMonitor": {"enabled": False},
    "podMonitors": {"enabled": False},
    "prometheusRule": {"enabled": False},
    "dashboards": {"enabled": False},
    "podAnnotations": False,
}


def combinations() -> Iterator[tuple[str, Doc]]:
    """The flags that interact (watch scope, RBAC, ServiceAccount) in every combination,
    each with all monitoring on or off; then each monitoring flag alone."""
    for watch, rbac, account, monitoring in itertools.product(
        [[], WATCHED], [True, False], [True, False], [MONITORING_ON, MONITORING_OFF]
    ):
        name = (
            f"watch={'some' if watch else 'all'}-rbac={rbac}-sa={account}"
            f"-monitoring={'on' if monitoring is MONITORING_ON else 'off'}"
        )
        yield (
            name,
            {
                "watchNamespaces": watch,
                "rbac": {"create": rbac},
                "serviceAccount": {"create": account},
                "monitoring": monitoring,
            },
        )
    for key, value in MONITORING_ON.items():
        if key != "dashboards" and key != "podAnnotations":
            yield f"only-{key}", {"monitoring": {key: value}}
    yield "no-dashboards", {"monitoring": {"dashboards": {"enabled": False}}}
    yield "no-pod-annotations", {"monitoring": {"podAnnotations": False}}
    yield "no-webhook", {"webhook": {"enabled": False}}
    yield (
        "everything-set",
        {
            "imagePullSecrets": [{"name": "regcred"}],
            "image": {"tag": "dev", "pullPolicy": "Always"},
            "trainer": {"image": {"repository": "registry.local/trainer", "tag": "dev"}},
            "operator": {"verbose": True, "extraEnv": [{"name": "TZ", "value": "UTC"}]},
            "serviceAccount": {"annotations": {"example.com/role": "operator"}},
            "podAnnotations": {"example.com/team": "ml"},
            "podLabels": {"team": "ml"},
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml"}],
            "affinity": {"nodeAffinity": {}},
            "priorityClassName": "system-cluster-critical",
            "nameOverride": "kt",
            "fullnameOverride": "kt-prod",
        },
    )


COMBINATIONS = dict(combinations())


@functools.cache
def _rendered(key: str) -> str:
    return json.dumps(template(COMBINATIONS[key]))


def rendered(key: str) -> list[Doc]:
    """The combination's manifests, rendered once per session."""
    return list(json.loads(_rendered(key)))


def pod_specs(docs: list[Doc]) -> list[tuple[str, Doc]]:
    workloads = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}
    specs = [
        (d["metadata"]["name"], d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] in workloads
    ]
    specs += [(d["metadata"]["name"], d["spec"]) for d in docs if d["kind"] == "Pod"]
    return specs


def operator_deployment(docs: list[Doc]) -> Doc:
    (deployment,) = find(docs, "Deployment")
    return deployment


def rbac_rules(docs: list[Doc], kind: str) -> list[Doc]:
    return [rule for d in find(docs, kind) for rule in d["rules"]]


def normalized(rules: list[Doc]) -> list[str]:
    """Rules as comparable strings: one per (group, resource), with sorted verbs."""
    grants: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                grants.setdefault((group, resource), set()).update(rule["verbs"])
    return sorted(f"{g}/{r}: {','.join(sorted(v))}" for (g, r), v in grants.items())


# ---------------------------------------------------------------------------------------
# Lint, defaults, flags
# ---------------------------------------------------------------------------------------


def test_lint() -> None:
    for values in (None, COMBINATIONS["watch=some-rbac=True-sa=True-monitoring=on"]):
        out = helm("lint", "--strict", str(CHART), "-n", NAMESPACE, values=values)
        assert "0 chart(s) failed" in out.stdout, out.stdout


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert (chart["name"], chart["version"], chart["appVersion"]) == ("kubetrain", "0.1.0", "0.1.0")
    assert chart["kubeVersion"] == ">=1.20.0-0"


def test_defaults_render_the_operator() -> None:
    docs = template()
    kinds = {d["kind"] for d in docs}
    assert {
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Service",
        "Deployment",
    } <= kinds
    assert not kinds & {"Role", "RoleBinding", "ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert find(docs, "CustomResourceDefinition", crd.CRD_NAME)

    deployment = operator_deployment(docs)
    assert deployment["metadata"]["name"] == "kubetrain-operator"
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]
    assert (
        deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    )
    # Every run's NetworkPolicy admits the operator by these labels.
    assert OperatorSettings().operator_pod_labels.items() <= pod["metadata"]["labels"].items()
    assert pod["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "8080",
        "prometheus.io/path": "/metrics",
    }
    assert pod["spec"]["serviceAccountName"] == "kubetrain-operator"
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "ghcr.io/kubetrain/operator:0.1.0"
    assert container["imagePullPolicy"] == "IfNotPresent"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 8080, "healthz": 8081, "webhook": 9443}
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    # In the Service (for the API server's webhook calls) once the webhook listens.
    assert container["readinessProbe"]["tcpSocket"] == {"port": "webhook"}
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]

    # The command line the image runs is one `kubetrain` accepts, with the chart's ports.
    args = build_parser().parse_args(container["args"])
    assert container["command"] == ["kubetrain"]
    assert (args.command, args.metrics_port, args.liveness_port) == ("operator", 8080, 8081)
    assert args.namespace is None  # every namespace

    service = find(docs, "Service", "kubetrain-operator")[0]
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"},
        {"name": "webhook", "port": 443, "targetPort": "webhook", "protocol": "TCP"},
    ]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    for doc in docs:
        if doc["kind"] != "CustomResourceDefinition":
            labels = doc["metadata"]["labels"]
            assert labels["helm.sh/chart"] == "kubetrain-0.1.0", doc["kind"]
            assert labels["app.kubernetes.io/managed-by"] == "Helm", doc["kind"]
            assert labels["app.kubernetes.io/instance"] == "kubetrain", doc["kind"]


def test_operator_settings_come_from_the_rendered_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The env the chart sets is the env OperatorSettings reads (names and values)."""
    values = {
        "trainer": {"image": {"repository": "registry.local/trainer", "tag": "t1"}},
        "operator": {"resyncSeconds": 3, "maxGpusPerRun": 64, "workers": 2},
    }
    (container,) = operator_deployment(template(values))["spec"]["template"]["spec"]["containers"]
    downward = {"metadata.namespace": "where-the-pod-runs", "metadata.name": "operator-pod-x"}
    for env in container["env"]:
        if "valueFrom" in env:
            monkeypatch.setenv(env["name"], downward[env["valueFrom"]["fieldRef"]["fieldPath"]])
        else:
            monkeypatch.setenv(env["name"], env["value"])
    settings = OperatorSettings.from_env()
    assert settings.image == "registry.local/trainer:t1"
    assert settings.operator_namespace == "where-the-pod-runs"
    # kopf's identity: the pod's name (its own guess needs a passwd entry for uid 65532).
    assert operator_identity().startswith("operator-pod-x/")
    assert settings.resync_seconds == 3
    assert settings.limits.max_gpus_per_run == 64
    assert {e["name"]: e.get("value") for e in container["env"]}["KUBETRAIN_WORKERS"] == "2"


def rendered_settings(values: Doc | None, monkeypatch: pytest.MonkeyPatch) -> OperatorSettings:
    """OperatorSettings as the operator reads them from the env the chart renders."""
    (container,) = operator_deployment(template(values))["spec"]["template"]["spec"]["containers"]
    for name in [n for n in os.environ if n.startswith("KUBETRAIN_")]:
        monkeypatch.delenv(name)  # a pod's env holds only what the chart sets
    for env in container["env"]:
        if "valueFrom" in env:
            downward = {"metadata.namespace": NAMESPACE, "metadata.name": "operator-pod"}
            monkeypatch.setenv(env["name"], downward[env["valueFrom"]["fieldRef"]["fieldPath"]])
        else:
            monkeypatch.setenv(env["name"], env["value"])
    return OperatorSettings.from_env()


def policy_peers(settings: OperatorSettings) -> list[Doc]:
    run = parse(load_documents((ROOT / "examples" / "quickstart.yaml").read_text())[0])
    policy = builders.build_network_policy(run, "uid", "team-a", settings)
    return list(policy["spec"]["ingress"][1]["from"])


OPERATOR_PODS = {"matchLabels": {"app.kubernetes.io/name": "kubetrain-operator"}}


def test_network_policy_values_reach_every_runs_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """networkPolicy values -> the operator's env -> OperatorSettings -> the run's policy."""
    assert policy_peers(rendered_settings(None, monkeypatch)) == [
        {"namespaceSelector": {"matchLabels": {"name": NAMESPACE}}, "podSelector": OPERATOR_PODS},
        {
            "namespaceSelector": {"matchLabels": {"name": "monitoring"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        },
    ]
    team = {"matchExpressions": [{"key": "team", "operator": "In", "values": ["ml"]}]}
    values = {
        "networkPolicy": {
            "operatorNamespaceSelector": {"matchLabels": {"ops": "kubetrain"}},
            # Helm merges maps with the defaults: null drops the default matchLabels.
            "prometheus": {"namespaceSelector": {"matchLabels": None, **team}, "podSelector": None},
        }
    }
    assert policy_peers(rendered_settings(values, monkeypatch)) == [
        {"namespaceSelector": {"matchLabels": {"ops": "kubetrain"}}, "podSelector": OPERATOR_PODS},
        {"namespaceSelector": team},
    ]
    off = {"networkPolicy": {"prometheus": {"enabled": False}}}
    assert policy_peers(rendered_settings(off, monkeypatch)) == [
        {"namespaceSelector": {"matchLabels": {"name": NAMESPACE}}, "podSelector": OPERATOR_PODS}
    ]


def test_more_replicas_elect_a_leader(monkeypatch: pytest.MonkeyPatch) -> None:
    """One replica: no leader election, Recreate. More: every replica campaigns for the
    release's Lease, with a Role for exactly that Lease (operator/deploy/rbac.yaml's)."""
    single = template()
    deployment = operator_deployment(single)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert (deployment["spec"]["replicas"], deployment["spec"]["strategy"]["type"]) == (
        1,
        "Recreate",
    )
    assert "KUBETRAIN_LEADER_ELECTION" not in {e["name"] for e in container["env"]}
    assert find(single, "Role") == []

    docs = template({"replicas": 2})
    deployment = operator_deployment(docs)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert (deployment["spec"]["replicas"], deployment["spec"]["strategy"]["type"]) == (
        2,
        "RollingUpdate",
    )
    env = {e["name"]: e.get("value") for e in container["env"] if "value" in e}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = OperatorSettings.from_env()
    assert settings.leader_election is True
    assert settings.lease_name == deployment["metadata"]["name"]
    (role,) = find(docs, "Role")
    (binding,) = find(docs, "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    deploy = {d["kind"]: d for d in yaml.safe_load_all(RBAC.read_text())}
    lease = OperatorSettings().lease_name
    expected = [
        {**r, "resourceNames": [settings.lease_name]} if r.get("resourceNames") == [lease] else r
        for r in deploy["Role"]["rules"]
    ]
    assert role["rules"] == expected


@pytest.mark.parametrize("key", list(COMBINATIONS))
def test_flag_combination_renders(key: str) -> None:
    values = COMBINATIONS[key]
    docs = rendered(key)
    deployment = operator_deployment(docs)
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    args = build_parser().parse_args(container["args"])
    watched = values.get("watchNamespaces", [])
    assert (args.namespace or []) == watched

    rbac = values.get("rbac", {}).get("create", True)
    assert len(find(docs, "ClusterRole")) == len(find(docs, "ClusterRoleBinding")) == int(rbac)
    roles = find(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == (watched if rbac else [])
    assert len(find(docs, "RoleBinding")) == len(roles)
    account = pod["spec"]["serviceAccountName"]
    for binding in find(docs, "ClusterRoleBinding") + find(docs, "RoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
        ]
    assert len(find(docs, "ServiceAccount")) == int(
        values.get("serviceAccount", {}).get("create", True)
    )

    monitoring = values.get("monitoring", {})
    enabled = {
        key: monitoring.get(key, {}).get("enabled", False)
        for key in ("serviceMonitor", "podMonitors", "prometheusRule")
    }
    assert len(find(docs, "ServiceMonitor")) == int(enabled["serviceMonitor"])
    assert len(find(docs, "PodMonitor")) == 2 * int(enabled["podMonitors"])
    for monitor in find(docs, "ServiceMonitor") + find(docs, "PodMonitor"):
        assert monitor["metadata"]["labels"]["release"] == "kps"
        assert monitor["metadata"]["namespace"] == NAMESPACE
    for monitor in find(docs, "PodMonitor"):
        expected = {"matchNames": watched} if watched else {"any": True}
        assert monitor["spec"]["namespaceSelector"] == expected
    annotated = monitoring.get("podAnnotations", True)
    assert ("prometheus.io/scrape" in pod["metadata"].get("annotations", {})) == annotated


def matches(selector: Doc, labels: dict[str, str]) -> bool:
    """A label selector (matchLabels, Exists and In expressions) against a pod's labels."""
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] in ("Exists", "In")
        if expression["key"] not in labels:
            return False
        if expression["operator"] == "In" and labels[expression["key"]] not in expression["values"]:
            return False
    return selector.get("matchLabels", {}).items() <= labels.items()


def modelservice_children() -> list[Doc]:
    """The children of the example ModelService, its variants' models on claims."""
    from kubetrain_api.documents import parse_document
    from kubetrain_operator.modelservice import build
    from kubetrain_operator.modelservice.sources import ModelSource

    docs = load_documents((ROOT / "examples" / "modelservice-ab.yaml").read_text())
    service = parse_document(docs[-1])
    models = {v.name: ModelSource(f"{v.name}-v1", claim="models", sub_path=v.name)
              for v in service.spec.variants}  # fmt: skip
    split = {v.name: v.weight or 0 for v in service.spec.variants}
    return build.build_children(service, "uid", "ns", OperatorSettings(), models, split)


def test_monitors_select_what_the_operator_creates() -> None:
    """The ServiceMonitor selects the operator's Service; the PodMonitors select the pods
    the operator's builders make (the head, not the workers; the model server) by port."""
    docs = rendered("only-serviceMonitor") + rendered("only-podMonitors")
    (service_monitor,) = find(docs, "ServiceMonitor")
    service = find(docs, "Service", "kubetrain-operator")[0]
    assert matches(service_monitor["spec"]["selector"], service["metadata"]["labels"])
    assert service_monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]

    run = parse(load_documents((ROOT / "examples" / "quickstart.yaml").read_text())[0])
    settings = OperatorSettings()
    pods = [
        p
        for p in builders.build_cluster(run, "uid", "ns", 1, settings, "token")
        if p["kind"] == "Pod"
    ]
    serving_pod = serving.build_deployment(run, "uid", "ns", settings)["spec"]["template"]
    # A ModelService's router and variant engines (examples/modelservice-ab.yaml).
    service_pods = [
        {**obj["spec"]["template"], "metadata": {"name": obj["metadata"]["name"],
                                                 **obj["spec"]["template"]["metadata"]}}
        for obj in modelservice_children()
        if obj["kind"] == "Deployment"
    ]  # fmt: skip
    monitors = {m["metadata"]["name"]: m["spec"] for m in find(docs, "PodMonitor")}
    for name, expected in [
        ("kubetrain-training", ["quickstart-a1-head"]),
        ("kubetrain-serving", ["serving", "chat-a", "chat-b", "chat-router"]),
    ]:
        spec = monitors[name]
        selected = [
            (p["metadata"].get("name", "serving"), p["spec"]["containers"])
            for p in [*pods, serving_pod, *service_pods]
            if matches(spec["selector"], p["metadata"]["labels"])
        ]
        assert [pod for pod, _ in selected] == expected, name
        port = spec["podMetricsEndpoints"][0]["port"]
        assert port in {p["name"] for c in selected[0][1] for p in c.get("ports", [])}, name


# Labels the Prometheus Operator puts on every target of a monitor; a scraped series with
# one of these loses its own value (renamed exported_<label>) unless honorLabels is set.
TARGET_LABELS = {"job", "instance", "namespace", "service", "pod", "container", "endpoint"}


def scraped_labels(registry: Any) -> set[str]:
    return {label for family in registry.collect() for s in family.samples for label in s.labels}


def test_scraped_labels_survive_the_monitors() -> None:
    """The dashboards and alerts select on the series' own labels (`endpoint` of the model
    server's requests, ...): every monitor whose app uses a target label's name honors it."""
    from kubetrain_operator import metrics as operator_metrics
    from kubetrain_trainer.metrics import Telemetry
    from kubetrain_trainer.serve.metrics import ServeMetrics

    telemetry = Telemetry("run", "model")
    telemetry.set_phase("Running")
    telemetry.record_eval(1, {"loss": 1.0, "validation/perplexity": 2.0})
    serve = ServeMetrics("model", "v1")
    serve.requests.labels("/v1/completions", "200").inc()
    apps = {
        "kubetrain-operator": scraped_labels(operator_metrics.REGISTRY),
        "kubetrain-training": scraped_labels(telemetry.registry),
        "kubetrain-serving": scraped_labels(serve.registry),
    }
    assert "endpoint" in apps["kubetrain-serving"]  # the case this test is about
    docs = rendered("only-serviceMonitor") + rendered("only-podMonitors")
    for monitor in find(docs, "ServiceMonitor") + find(docs, "PodMonitor"):
        name = monitor["metadata"]["name"]
        spec = monitor["spec"]
        for endpoint in spec.get("endpoints", []) + spec.get("podMetricsEndpoints", []):
            if apps[name] & TARGET_LABELS:
                assert endpoint.get("honorLabels") is True, (name, apps[name] & TARGET_LABELS)


# ---------------------------------------------------------------------------------------
# Admission webhook
# ---------------------------------------------------------------------------------------


def webhook_parts(docs: list[Doc]) -> tuple[Doc, Doc, Doc]:
    """The webhook entry, the operator container, and the TLS Secret."""
    (config,) = find(docs, "ValidatingWebhookConfiguration")
    (hook,) = config["webhooks"]
    (container,) = operator_deployment(docs)["spec"]["template"]["spec"]["containers"]
    (secret,) = find(docs, "Secret")
    return hook, container, secret


def test_webhook_reaches_the_operator_with_the_generated_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = template()
    hook, container, secret = webhook_parts(docs)
    assert (hook["failurePolicy"], hook["timeoutSeconds"]) == ("Fail", 10)
    assert (hook["sideEffects"], hook["admissionReviewVersions"]) == ("None", ["v1"])
    assert "namespaceSelector" not in hook  # every namespace
    # The main resource only: the operator's status writes never wait on the webhook.
    assert hook["rules"] == [
        {
            "apiGroups": [api.GROUP],
            "apiVersions": [api.VERSION],
            "resources": [api.PLURAL],
            "operations": ["CREATE", "UPDATE"],
            "scope": "Namespaced",
        }
    ]
    # Service -> the container's port -> the port the operator serves on.
    service = find(docs, "Service", "kubetrain-operator")[0]
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == 443]
    assert hook["clientConfig"]["service"] == {
        "name": service["metadata"]["name"],
        "namespace": NAMESPACE,
        "path": WEBHOOK_PATH,
        "port": 443,
    }
    settings = rendered_settings(None, monkeypatch)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[port["targetPort"]] == settings.webhook_port == 9443
    # The Secret, mounted where the settings read the certificate and key.
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "webhook-tls"]
    (volume,) = [
        v
        for v in operator_deployment(docs)["spec"]["template"]["spec"]["volumes"]
        if v["name"] == "webhook-tls"
    ]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert settings.webhook_cert_file == f"{mount['mountPath']}/tls.crt"
    assert settings.webhook_key_file == f"{mount['mountPath']}/tls.key"
    assert secret["type"] == "kubernetes.io/tls"
    # The API server trusts the Secret's CA, which signed a certificate for the name it
    # dials (<service>.<namespace>.svc).
    assert hook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    for key in ("ca.crt", "tls.crt", "tls.key"):
        (tmp_path / key).write_bytes(base64.b64decode(secret["data"][key]))
    openssl = functools.partial(subprocess.run, capture_output=True, text=True, check=True)
    ca, cert = str(tmp_path / "ca.crt"), str(tmp_path / "tls.crt")
    openssl(["openssl", "verify", "-purpose", "sslserver", "-CAfile", ca, cert])
    sans = openssl(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", cert]).stdout
    names = sans.splitlines()[-1].replace(" ", "").split(",")
    assert f"DNS:kubetrain-operator.{NAMESPACE}.svc" in names, sans


def test_webhook_values_reach_its_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    selector = {"matchLabels": {"kubetrain.dev/webhook": "on"}}
    values = {
        "webhook": {
            "failurePolicy": "Ignore",
            "timeoutSeconds": 3,
            "namespaceSelector": selector,
            "port": 8443,
        }
    }
    hook, container, _ = webhook_parts(template(values))
    assert (hook["failurePolicy"], hook["timeoutSeconds"]) == ("Ignore", 3)
    assert hook["namespaceSelector"] == selector
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["webhook"] == 8443
    assert rendered_settings(values, monkeypatch).webhook_port == 8443

    off = {"webhook": {"enabled": False}}
    docs = template(off)
    assert not find(docs, "ValidatingWebhookConfiguration")
    assert not find(docs, "Secret")
    (container,) = operator_deployment(docs)["spec"]["template"]["spec"]["containers"]
    assert "webhook" not in {p["name"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert rendered_settings(off, monkeypatch).webhook_port is None


def test_cert_manager_can_issue_the_webhook_certificate_instead() -> None:
    docs = template({"webhook": {"certManager": {"enabled": True}}})
    assert not find(docs, "Secret")  # cert-manager writes it
    (certificate,) = find(docs, "Certificate")
    (issuer,) = find(docs, "Issuer")
    assert issuer["spec"] == {"selfSigned": {}}
    assert certificate["spec"]["issuerRef"] == {
        "kind": "Issuer",
        "name": issuer["metadata"]["name"],
        "group": "cert-manager.io",
    }
    assert f"kubetrain-operator.{NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
    # The operator mounts what cert-manager writes; its CA injector fills in the caBundle.
    (volume,) = [
        v
        for v in operator_deployment(docs)["spec"]["template"]["spec"]["volumes"]
        if v["name"] == "webhook-tls"
    ]
    assert volume["secret"]["secretName"] == certificate["spec"]["secretName"]
    (config,) = find(docs, "ValidatingWebhookConfiguration")
    assert config["metadata"]["annotations"] == {
        "cert-manager.io/inject-ca-from": f"{NAMESPACE}/{certificate['metadata']['name']}"
    }
    assert "caBundle" not in config["webhooks"][0]["clientConfig"]

    issuer_ref = {"kind": "ClusterIssuer", "name": "internal-ca", "group": "cert-manager.io"}
    docs = template({"webhook": {"certManager": {"enabled": True, "issuerRef": issuer_ref}}})
    assert not find(docs, "Issuer")
    assert find(docs, "Certificate")[0]["spec"]["issuerRef"] == issuer_ref


# ---------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------

REJECTED = {
    "typo-at-the-top": ({"watchNamespace": ["a"]}, "watchNamespace"),
    "typo-nested": ({"monitoring": {"serviceMonitor": {"enable": True}}}, "enable"),
    "typo-in-image": ({"image": {"pullpolicy": "Always"}}, "pullpolicy"),
    "typo-in-resources": ({"resources": {"request": {"cpu": "1"}}}, "request"),
    "wrong-type-int": ({"operator": {"workers": "many"}}, "/operator/workers"),
    "wrong-type-bool": ({"monitoring": {"podAnnotations": "yes"}}, "/monitoring/podAnnotations"),
    "wrong-type-list": ({"watchNamespaces": "team-a"}, "/watchNamespaces"),
    "bad-namespace": ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
    "bad-interval": (
        {"monitoring": {"podMonitors": {"interval": "fast"}}},
        "/monitoring/podMonitors/interval",
    ),
    "ratio-over-1": (
        {"monitoring": {"prometheusRule": {"servingErrorRatio": 5}}},
        "servingErrorRatio",
    ),
    "bad-pull-policy": ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    "label-not-a-string": ({"podLabels": {"team": 1}}, "/podLabels/team"),
    "failure-policy": ({"webhook": {"failurePolicy": "Maybe"}}, "/webhook/failurePolicy"),
    "webhook-timeout-over-30": ({"webhook": {"timeoutSeconds": 31}}, "/webhook/timeoutSeconds"),
    "issuer-ref-typo": (
        {"webhook": {"certManager": {"issuerRef": {"nmae": "ca"}}}},
        "nmae",
    ),
    "selector-typo": (
        {"networkPolicy": {"prometheus": {"podSelector": {"matchLabel": {"a": "b"}}}}},
        "matchLabel",
    ),
}


@pytest.mark.parametrize("case", list(REJECTED))
def test_schema_rejects_typos_and_wrong_types(case: str) -> None:
    values, key = REJECTED[case]
    out = helm("template", "kubetrain", str(CHART), values=values, check=False)
    assert out.returncode != 0
    assert "values don't meet the specifications of the schema" in out.stderr, out.stderr
    assert key in out.stderr, out.stderr


def fixed_objects(schema: Doc, path: str = "") -> Iterator[tuple[str, Doc]]:
    """Every schema node that lists its keys (`properties`), with its dotted path."""
    if "properties" in schema:
        yield path, schema
        for key, sub in schema["properties"].items():
            yield from fixed_objects(sub, f"{path}.{key}" if path else key)
    if isinstance(schema.get("items"), dict):
        yield from fixed_objects(schema["items"], f"{path}[]")


def test_schema_lists_exactly_the_keys_of_values_yaml() -> None:
    """Where the keys are the chart's own, the schema names exactly values.yaml's keys and
    refuses others. (Kubernetes objects such as securityContext are left to the API server.)"""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for path, node in fixed_objects(schema):
        assert node.get("additionalProperties") is False, f"{path or '<root>'} accepts any key"
        if "[]" in path or path == "affinity":  # list items; affinity's default is {}
            continue
        value = values
        for key in filter(None, path.split(".")):
            value = value[key]
        assert set(value) == set(node["properties"]) - {"global"}, path or "<root>"


# ---------------------------------------------------------------------------------------
# Pod security and RBAC, in every combination
# ---------------------------------------------------------------------------------------


# Volume types the restricted profile allows (no hostPath, no other node access).
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}  # fmt: skip


@pytest.mark.parametrize("key", list(COMBINATIONS))
def test_pods_meet_the_restricted_profile(key: str) -> None:
    specs = pod_specs(rendered(key))
    assert specs
    for name, spec in specs:
        pod_ctx = spec.get("securityContext", {})
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(flag), f"{name}: {flag}"
        for volume in spec.get("volumes", []):
            assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, f"{name}: {volume}"
        assert not pod_ctx.get("sysctls"), name
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            ctx = container.get("securityContext", {})
            where = f"{name}/{container['name']}"
            assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, where
            assert ctx.get("runAsUser", pod_ctx.get("runAsUser")) != 0, where
            assert ctx.get("allowPrivilegeEscalation") is False, where
            assert not ctx.get("privileged"), where
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not ctx.get("capabilities", {}).get("add"), where
            seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {}))
            assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), where
            assert ctx.get("readOnlyRootFilesystem") is True, where
            assert not [p for p in container.get("ports", []) if "hostPort" in p], where
        assert pod_ctx.get("runAsUser") == pod_ctx.get("runAsGroup") == 65532


FORBIDDEN_VERBS = {"*", "escalate", "bind", "impersonate"}
FORBIDDEN_RESOURCES = {"*", "pods/exec", "pods/attach", "pods/portforward", "pods/log"}


@pytest.mark.parametrize("key", list(COMBINATIONS))
def test_rbac_is_least_privilege(key: str) -> None:
    docs = rendered(key)
    for doc in find(docs, "ClusterRole") + find(docs, "Role"):
        for rule in doc["rules"]:
            assert "nonResourceURLs" not in rule
            assert "*" not in rule["apiGroups"], rule
            assert not FORBIDDEN_RESOURCES & set(rule["resources"]), rule
            assert not FORBIDDEN_VERBS & set(rule["verbs"]), rule
            if "secrets" in rule["resources"]:
                assert not {"list", "watch"} & set(rule["verbs"]), rule
    for binding in find(docs, "ClusterRoleBinding") + find(docs, "RoleBinding"):
        assert binding["roleRef"]["name"] != "cluster-admin"


def test_rbac_equals_operator_deploy_rbac() -> None:
    """operator/deploy/rbac.yaml (the operator tests' RBAC) grants what the chart grants,
    cluster-wide, and the namespaced mode grants the same split over Roles."""
    deploy = {d["kind"]: d for d in yaml.safe_load_all(RBAC.read_text())}
    expected = normalized(deploy["ClusterRole"]["rules"])
    assert normalized(rbac_rules(template(), "ClusterRole")) == expected
    namespaced = template({"watchNamespaces": ["team-a"]})
    cluster_rules = rbac_rules(namespaced, "ClusterRole")
    # kopf follows named namespaces: only then does it list and watch them.
    watching = {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}
    assert watching in cluster_rules
    cluster_rules.remove(watching)
    assert normalized(cluster_rules + rbac_rules(namespaced, "Role")) == expected
    # Only rules on cluster-scoped resources stay cluster-wide.
    assert {r for rule in cluster_rules for r in rule["resources"]} == {"customresourcedefinitions"}
    account = deploy["ServiceAccount"]["metadata"]
    (chart_account,) = find(template(), "ServiceAccount")
    assert chart_account["metadata"]["name"] == account["name"]
    assert account["namespace"] == NAMESPACE


# ---------------------------------------------------------------------------------------
# Kubernetes versions, CRD copy, documentation
# ---------------------------------------------------------------------------------------

# Served by Kubernetes 1.20 and by current versions (no beta APIs that were removed).
STABLE_APIS = {
    "v1",
    "apps/v1",
    "rbac.authorization.k8s.io/v1",
    "apiextensions.k8s.io/v1",
    "monitoring.coreos.com/v1",
    "admissionregistration.k8s.io/v1",
}


@pytest.mark.parametrize("version", ["1.20.2", "1.33.0"])
def test_renders_for_old_and_current_kubernetes(version: str) -> None:
    docs = template(
        COMBINATIONS["watch=some-rbac=True-sa=True-monitoring=on"], "--kube-version", version
    )
    assert {d["apiVersion"] for d in docs} <= STABLE_APIS


def test_refuses_kubernetes_before_1_20() -> None:
    out = helm("template", "kubetrain", str(CHART), "--kube-version", "1.19.9", check=False)
    assert out.returncode != 0
    assert "requires kubeVersion: >=1.20.0-0" in out.stderr


def test_chart_crds_are_the_generated_ones() -> None:
    docs = template()
    assert len(find(docs, "CustomResourceDefinition")) == 2
    (trainingruns,) = find(docs, "CustomResourceDefinition", crd.CRD_NAME)
    assert trainingruns == crd.trainingrun_crd()
    (modelservices,) = find(docs, "CustomResourceDefinition", crd.MODELSERVICE_CRD_NAME)
    assert modelservices == crd.modelservice_crd()


def test_every_value_is_documented_and_the_readme_table_is_current() -> None:
    text = values_doc.VALUES.read_text()
    assert values_doc.undocumented(text) == []
    readme = values_doc.README.read_text()
    assert readme == values_doc.render_readme(readme, text), (
        "helm/kubetrain/README.md's values table is stale: run `python -m tests.helm.values_doc`"
    )
