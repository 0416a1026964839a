"""The ModelService invalid corpus (tests/api/invalid/modelservice/): every file is refused,
by the layer the table says, naming the field; the layers are those of
test_invalid_corpus.py (schema: the API server refuses it too; rules: only `kubetrain
validate` and the operator do, which the control-plane tests check so the table cannot go
stale)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kubetrain_api import documents, validation
from kubetrain_api.modelservice_validation import validate_modelservice_document
from tests.support.cluster import server_dry_run

CORPUS = Path(__file__).parent / "invalid" / "modelservice"

# file stem -> (layer, field path named in the error)
CASES: dict[str, tuple[str, str]] = {
    "missing-variants": ("schema", "spec.variants"),
    "empty-variants": ("schema", "spec.variants"),
    "too-many-variants": ("schema", "spec.variants"),
    "weight-over-100": ("schema", "spec.variants[0].weight"),
    "weight-not-integer": ("schema", "spec.variants[0].weight"),
    "unknown-engine": ("schema", "spec.variants[0].engine"),
    "uppercase-variant-name": ("schema", "spec.variants[0].name"),
    "alpha-over-half": ("schema", "spec.experiment.alpha"),
    "unknown-primary-metric": ("schema", "spec.experiment.primaryMetric"),
    "unknown-decision-action": ("schema", "spec.experiment.onDecision"),
    "bad-sticky-header-name": ("schema", "spec.router.stickyKey.header"),
    "zero-router-replicas": ("schema", "spec.router.replicas"),
    "inline-postgres-dsn": ("schema", "spec.router.database.postgres.dsnSecretRef"),
    "weights-not-100": ("rules", "spec.variants"),
    "weight-missing-with-two": ("rules", "spec.variants[1].weight"),
    "duplicate-variant-names": ("rules", "spec.variants[1].name"),
    "variant-named-router": ("rules", "spec.variants[0].name"),
    "service-name-too-long-xxxxxxxxxxxxxxxxxxxxx": ("rules", "metadata.name"),
    "child-name-too-long": ("rules", "spec.variants[0].name"),
    "experiment-unknown-control": ("rules", "spec.experiment.control"),
    "experiment-same-variant": ("rules", "spec.experiment.treatment"),
    "experiment-treatment-without-traffic": ("rules", "spec.experiment.treatment"),
    "latency-metric-without-threshold": ("rules", "spec.experiment.latencyThresholdSeconds"),
    "sqlite-with-two-router-replicas": ("rules", "spec.router.replicas"),
    "sqlite-and-postgres": ("rules", "spec.router.database"),
    "source-run-and-uri": ("rules", "spec.variants[0].source"),
    "source-empty": ("rules", "spec.variants[0].source"),
    "builtin-source": ("rules", "spec.variants[0].source.uri"),
    "source-uri-with-credentials": ("rules", "spec.variants[0].source.uri"),
    "vllm-without-gpus": ("rules", "spec.variants[0].gpus"),
    "variant-without-replicas": ("rules", "spec.variants[1].replicas"),
    "autoscaling-min-over-max": ("rules", "spec.variants[0].autoscaling.minReplicas"),
    "header-key-without-header": ("rules", "spec.router.stickyKey.header"),
    "negative-variant-cpu": ("rules", "spec.variants[0].resources.cpu"),
    "unknown-field-typo": ("rules", "spec.experiment.alpah"),
    "retraining-bad-schedule": ("schema", "spec.retraining.triggers.schedule"),
    "retraining-challenger-all-traffic": ("schema", "spec.retraining.challenger.trafficPercent"),
    "retraining-without-triggers": ("rules", "spec.retraining.triggers"),
    "retraining-challenger-is-a-variant": ("rules", "spec.retraining.challenger.name"),
    "retraining-unknown-variant": ("rules", "spec.retraining.variant"),
    "retraining-hub-destination": ("rules", "spec.retraining.feedback.destination"),
    "retraining-metric-without-evaluation": (
        "rules",
        "spec.retraining.triggers.metricBelow.metric",
    ),
    "retraining-experiment-other-treatment": ("rules", "spec.experiment.treatment"),
    "retraining-template-batch": (
        "rules",
        "spec.retraining.template.spec.hyperparameters.globalBatchSize",
    ),
    "retraining-grpo-template": ("rules", "spec.retraining.template.spec.method"),
    "retraining-name-too-long-xxxxxxxxxxxxxx": ("rules", "metadata.name"),
    "evaluation-without-data": ("rules", "spec.evaluation"),
    "evaluation-preference-set": ("rules", "spec.evaluation.datasets[0].task"),
    "evaluation-perplexity-without-held-out": ("rules", "spec.evaluation.metrics"),
}
SCHEMA_CASES = [name for name, (layer, _) in CASES.items() if layer == "schema"]
RULE_CASES = [name for name, (layer, _) in CASES.items() if layer == "rules"]


def load(name: str) -> object:
    (doc,) = validation.load_documents((CORPUS / f"{name}.yaml").read_bytes())
    return doc


def test_table_covers_the_corpus() -> None:
    assert sorted(p.stem for p in CORPUS.glob("*.yaml")) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_kubetrain_validate_refuses_naming_the_field(name: str) -> None:
    _, field = CASES[name]
    paths = [e.path for e in validate_modelservice_document(load(name))]
    assert field in paths, f"expected an error at {field}, got {paths}"
    # The same through the kind dispatch `kubetrain validate` uses.
    assert [e.path for e in documents.validate_document(load(name))] == paths


@pytest.mark.controlplane
@pytest.mark.parametrize("name", SCHEMA_CASES)
def test_api_server_refuses_naming_the_field(
    name: str, crd_installed: None, namespace: str
) -> None:
    code, stderr = server_dry_run(CORPUS / f"{name}.yaml", namespace)
    # Kubernetes 1.20 names list items without their index (spec.variants.weight).
    field = re.sub(r"\[\d+\]", "", CASES[name][1])
    assert code != 0
    assert "is invalid" in stderr, stderr  # a 422 from the schema, not another failure
    assert f"{field}:" in stderr or f"{field} in body" in stderr, stderr


@pytest.mark.controlplane
@pytest.mark.parametrize("name", RULE_CASES)
def test_api_server_leaves_rule_cases_to_the_operator(
    name: str, crd_installed: None, namespace: str
) -> None:
    code, stderr = server_dry_run(CORPUS / f"{name}.yaml", namespace)
    assert code == 0, f"the schema refused a 'rules' case; move it to 'schema': {stderr}"
