"""The admission webhook on the real API server: the operator (in this process, with the
operator token) serves it over HTTPS with a test CA, and the API server calls it through
the chart's ValidatingWebhookConfiguration, pointed at loopback by `url` (no kubelet or
kube-proxy here to reach a Service) and scoped to this test's namespaces by a label."""

from __future__ import annotations

import base64
import contextlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetrain_api.contract import WEBHOOK_PATH
from tests.api.test_invalid_corpus import CASES, CORPUS
from tests.helm.chart import find, template
from tests.support import kubelet, tls
from tests.support.cluster import kubectl, wait_until
from tests.support.operators import free_port, in_process_operator
from tests.support.runs import (
    RBAC,
    apply,
    condition,
    get_run,
    quickstart,
    start_cluster,
    wait_phase,
)

pytestmark = pytest.mark.controlplane

LABEL = "kubetrain.dev/webhook-test"
SELECTED = uuid.uuid4().hex[:8]  # the label value this module's webhook configurations select
# The API server prunes unknown fields before any webhook sees the object; kubectl's own
# schema check refuses this one (the operator never sees the field either).
PRUNED = {"unknown-field-typo"}
RULE_CASES = sorted(
    name for name, (layer, _) in CASES.items() if layer == "rules" and name not in PRUNED
)


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tls.ServingCert:
    return tls.serving_cert(tmp_path_factory.mktemp("webhook-tls"))


@pytest.fixture(scope="module")
def webhook_url(
    cluster: Any, crd_installed: None, progress: kubelet.FakeProgress, cert: tls.ServingCert
) -> Iterator[str]:
    """The operator, serving the webhook on a loopback port; its URL."""
    kubectl("create", "namespace", "kubetrain-system", check=False)
    kubectl("apply", "-f", str(RBAC))
    port = free_port()
    with in_process_operator(
        cluster.operator_kubeconfig,
        "--all-namespaces",
        KUBETRAIN_PROGRESS_PORT=str(progress.port),
        KUBETRAIN_PROGRESS_HOST="127.0.0.1",
        KUBETRAIN_WEBHOOK_PORT=str(port),
        KUBETRAIN_WEBHOOK_CERT_FILE=str(cert.cert),
        KUBETRAIN_WEBHOOK_KEY_FILE=str(cert.key),
    ):
        yield f"https://127.0.0.1:{port}{WEBHOOK_PATH}"


@pytest.fixture
def checked(namespace: str) -> str:
    """A namespace the webhook configurations of this module select."""
    kubectl("label", "namespace", namespace, f"{LABEL}={SELECTED}")
    return namespace


def chart_webhook(url: str, ca: Path, failure_policy: str) -> dict[str, Any]:
    """The chart's ValidatingWebhookConfiguration, calling `url` instead of the Service."""
    (config,) = find(template(), "ValidatingWebhookConfiguration")
    (hook,) = config["webhooks"]
    hook["clientConfig"] = {"url": url, "caBundle": base64.b64encode(ca.read_bytes()).decode()}
    hook["namespaceSelector"] = {"matchLabels": {LABEL: SELECTED}}
    hook["failurePolicy"] = failure_policy
    config["metadata"] = {"name": f"kubetrain-test-{SELECTED}"}
    return dict(config)


def dry_run(doc: dict[str, Any], namespace: str) -> tuple[int, str]:
    out = kubectl(
        "create", "--dry-run=server", "-n", namespace, "-f", "-",
        input=yaml.safe_dump(doc), check=False,
    )  # fmt: skip
    return out.returncode, out.stderr


@contextlib.contextmanager
def registered(config: dict[str, Any], namespace: str, active: str) -> Iterator[None]:
    """The configuration in the API server for the block; it takes effect once a dry run
    of an invalid run answers with `active` (the API server loads configurations
    asynchronously)."""
    kubectl("apply", "-f", "-", input=json.dumps(config))
    invalid = quickstart("probe", hyperparameters__globalBatchSize=7)
    try:
        wait_until(
            lambda: active in dry_run(invalid, namespace)[1],
            timeout=30,
            message=f"the webhook configuration to answer {active!r}",
        )
        yield
    finally:
        kubectl("delete", "validatingwebhookconfiguration", config["metadata"]["name"])


def test_an_invalid_apply_is_refused_naming_the_field(
    webhook_url: str, cert: tls.ServingCert, checked: str
) -> None:
    with registered(chart_webhook(webhook_url, cert.ca, "Fail"), checked, "denied the request"):
        out = kubectl(
            "apply", "-n", checked, *(f"--filename={CORPUS / f'{n}.yaml'}" for n in RULE_CASES),
            check=False,
        )  # fmt: skip
        assert out.returncode != 0
        # kubectl reports each file on its own line: `error when creating "<file>": ...`.
        for name in RULE_CASES:
            (line,) = [line for line in out.stderr.splitlines() if f"/{name}.yaml" in line]
            assert "denied the request" in line, line
            assert f"{CASES[name][1]}:" in line, line
        assert kubectl("get", "tr", "-n", checked, "-o", "name").stdout.strip() == ""

        code, stderr = dry_run(quickstart("good"), checked)
        assert code == 0, stderr


def test_an_immutable_edit_of_an_active_run_is_refused_and_the_run_succeeds(
    webhook_url: str, cert: tls.ServingCert, checked: str, progress: kubelet.FakeProgress
) -> None:
    with registered(chart_webhook(webhook_url, cert.ca, "Fail"), checked, "denied the request"):
        apply(quickstart("steady"), checked)
        head = start_cluster("steady", checked)
        progress.document = {"phase": "Running", "step": 10, "totalSteps": 200, "loss": 2.0}
        wait_phase("steady", checked, "Running")
        before = get_run("steady", checked)

        edit = {"spec": {"hyperparameters": {"learningRate": 0.5}}}
        out = kubectl(
            "patch", "tr", "steady", "-n", checked, "--type=merge", "-p", json.dumps(edit),
            check=False,
        )  # fmt: skip
        assert out.returncode != 0
        assert "spec.hyperparameters.learningRate: cannot change while the run is active" in (
            out.stderr
        ), out.stderr
        after = get_run("steady", checked)
        assert after["spec"] == before["spec"]
        assert after["metadata"]["generation"] == before["metadata"]["generation"]

        # What may change while it runs still can; the operator's status writes (the
        # status subresource) went through all along.
        kubectl(
            "patch", "tr", "steady", "-n", checked, "--type=merge",
            "-p", json.dumps({"spec": {"runPolicy": {"backoffLimit": 5}}}),
        )  # fmt: skip
        progress.document = {"phase": "Running", "step": 200, "totalSteps": 200, "loss": 1.0}
        kubelet.set_terminated(checked, head, 0)
        st = wait_phase("steady", checked, "Succeeded")
        assert st["attempts"] == 1


def test_webhook_down_fail_refuses_and_ignore_admits(
    webhook_url: str, cert: tls.ServingCert, checked: str
) -> None:
    # Nothing listens on this port: the operator is down (the in-process one still
    # reconciles, as the operator would once back).
    down = f"https://127.0.0.1:{free_port()}{WEBHOOK_PATH}"
    config = chart_webhook(down, cert.ca, "Fail")
    with registered(config, checked, "failed calling webhook"):
        code, stderr = dry_run(quickstart("while-down"), checked)
        assert code != 0
        assert 'failed calling webhook "validate.trainingruns.kubetrain.dev"' in stderr, stderr

    config = chart_webhook(down, cert.ca, "Ignore")
    kubectl("apply", "-f", "-", input=json.dumps(config))
    try:
        # Admitted unchecked; the operator's own validation fails the run.
        invalid = quickstart("unchecked", hyperparameters__globalBatchSize=7)
        wait_until(lambda: dry_run(invalid, checked)[0] == 0, message="Ignore to take effect")
        apply(invalid, checked)
        st = wait_phase("unchecked", checked, "Failed")
        assert "spec.hyperparameters.globalBatchSize" in condition(st, "Validated")["message"]
    finally:
        kubectl("delete", "validatingwebhookconfiguration", config["metadata"]["name"])
