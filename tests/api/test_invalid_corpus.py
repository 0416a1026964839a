"""The invalid-spec corpus: every file is refused, by the layer the table says, naming the field.

Layers:
- schema: the CRD's OpenAPI schema; the real kube-apiserver answers 422 naming the field
  (and `kubetrain validate` refuses it too, from the same models).
- rules: what Kubernetes 1.20's schema cannot express (no CEL there): cross-field rules,
  caps, reserved names, secrets, URI shapes, unknown fields (which the API server silently
  prunes). `kubetrain validate` and the operator refuse them; the API server accepts them,
  which the control-plane test below checks so this table cannot go stale.
- reader: the file never becomes a document: `validation.load_documents` (the CLI's and
  the webhook's YAML reader) refuses it with a one-line reason, the table's second column
  (a part of that reason). The size limit has no file here (it would be a megabyte); the
  CLI test in tests/api/test_yaml_reader.py covers it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kubetrain_api import validation
from tests.support.cluster import server_dry_run

CORPUS = Path(__file__).parent / "invalid"

# file stem -> (layer, field path named in the error)
CASES: dict[str, tuple[str, str]] = {
    "missing-spec": ("schema", "spec"),
    "missing-model": ("schema", "spec.model"),
    "missing-data-sources": ("schema", "spec.data.sources"),
    "empty-data-sources": ("schema", "spec.data.sources"),
    "too-many-sources": ("schema", "spec.data.sources"),
    "negative-learning-rate": ("schema", "spec.hyperparameters.learningRate"),
    "zero-workers": ("schema", "spec.resources.workers"),
    "string-for-integer": ("schema", "spec.hyperparameters.maxSteps"),
    "boolean-as-string": ("schema", "spec.data.packing"),
    "unknown-method": ("schema", "spec.method"),
    "unknown-data-format": ("schema", "spec.data.sources[0].format"),
    "unknown-precision": ("schema", "spec.hyperparameters.precision"),
    "bad-uri-scheme": ("schema", "spec.data.sources[0].uri"),
    "gpus-per-worker-over-cap": ("schema", "spec.resources.gpusPerWorker"),
    "negative-sequence-length": ("schema", "spec.data.sequenceLength"),
    "dropout-one": ("schema", "spec.hyperparameters.dropout"),
    "bad-memory-quantity": ("schema", "spec.resources.memoryPerWorker"),
    "uppercase-source-name": ("schema", "spec.data.sources[0].name"),
    "oversized-revision": ("schema", "spec.model.revision"),
    "bad-env-name": ("schema", "spec.env[0].name"),
    "negative-backoff-limit": ("schema", "spec.runPolicy.backoffLimit"),
    "bad-toleration-operator": ("schema", "spec.resources.tolerations[0].operator"),
    "lora-rank-zero": ("schema", "spec.lora.rank"),
    "reserved-env-rank": ("rules", "spec.env[0].name"),
    "reserved-env-ray": ("rules", "spec.env[0].name"),
    "inline-secret-env": ("rules", "spec.env[0].value"),
    "credentials-in-uri": ("rules", "spec.data.sources[0].uri"),
    "total-gpus-over-cap": ("rules", "spec.resources.gpusPerWorker"),
    "batch-not-divisible": ("rules", "spec.hyperparameters.globalBatchSize"),
    "no-steps-or-epochs": ("rules", "spec.hyperparameters.maxSteps"),
    "warmup-longer-than-run": ("rules", "spec.hyperparameters.schedule.warmupSteps"),
    "gate-metric-not-computed": ("rules", "spec.evaluation.gate[0].metric"),
    "accuracy-without-dataset": ("rules", "spec.evaluation.metrics[2]"),
    "instruction-on-plain-text": ("rules", "spec.data.sources[0].format"),
    "duplicate-source-names": ("rules", "spec.data.sources[1].name"),
    "malformed-hf-uri": ("rules", "spec.model.source"),
    "unknown-builtin-model": ("rules", "spec.model.source"),
    "relative-file-uri": ("rules", "spec.data.sources[0].uri"),
    "pvc-path-leaves-claim": ("rules", "spec.data.sources[0].uri"),
    "storage-pvc-and-uri": ("rules", "spec.checkpoint.storage"),
    "name-too-long-for-children-xxxxxxxxxxxxxxxxxx": ("rules", "metadata.name"),
    "unknown-field-typo": ("rules", "spec.hyperparameter"),
    "fp16-on-cpu": ("rules", "spec.hyperparameters.precision"),
    "processes-per-worker-not-gpus": ("rules", "spec.resources.processesPerWorker"),
    # Fields that end up in pod specs, checked with the API server's pod rules
    # (tests/api/test_pod_fields.py checks that the API server refuses such pods too).
    "toleration-bad-effect": ("schema", "spec.resources.tolerations[0].effect"),
    "bad-secret-name": ("schema", "spec.env[0].valueFrom.secretKeyRef.name"),
    "bad-priority-class-name": ("schema", "spec.resources.priorityClassName"),
    "bad-label-key": ("schema", "metadata.labels"),
    "node-selector-bad-key": ("rules", "spec.resources.nodeSelector.example.com/gpu/product"),
    "node-selector-bad-value": ("rules", "spec.resources.nodeSelector.gpu"),
    "toleration-exists-with-value": ("rules", "spec.resources.tolerations[0].value"),
    "toleration-seconds-without-noexecute": ("rules", "spec.resources.tolerations[0].effect"),
    "toleration-equal-without-key": ("rules", "spec.resources.tolerations[0].operator"),
    "negative-cpu-quantity": ("rules", "spec.resources.cpuPerWorker"),
    "zero-gpu-memory": ("rules", "spec.resources.gpuMemory"),
    "fractional-exponent-quantity": ("rules", "spec.resources.memoryPerWorker"),
    "zero-claim-size": ("rules", "spec.checkpoint.storage.pvc.size"),
    "env-name-dot-dot": ("rules", "spec.env[0].name"),
    "bad-secret-key": ("rules", "spec.env[0].valueFrom.secretKeyRef.key"),
    "bad-image-reference": ("rules", "spec.image"),
    # model.configOverrides: model-shape fields only.
    "config-overrides-trust-remote-code": ("rules", "spec.model.configOverrides.trust_remote_code"),
    "config-overrides-name-or-path": ("rules", "spec.model.configOverrides.tokenizer_name_or_path"),
    "config-overrides-not-model-shape": (
        "rules",
        "spec.model.configOverrides.output_hidden_states",
    ),
    # URIs stay inside their claim or bucket.
    "uri-dot-dot-leaves-bucket": ("rules", "spec.data.sources[0].uri"),
    "uri-percent-encoded-dot-dot": ("rules", "spec.data.sources[0].uri"),
    "checkpoint-uri-double-encoded-dot-dot": ("rules", "spec.checkpoint.storage.uri"),
    # Preference and RL methods: their data, settings and rewards.
    "dpo-on-chat-data": ("rules", "spec.data.sources[0].format"),
    "preference-data-under-sft": ("rules", "spec.data.sources[0].format"),
    "grpo-without-rewards": ("rules", "spec.grpo"),
    "grpo-regex-without-pattern": ("rules", "spec.grpo.rewards[0].pattern"),
    "grpo-reward-bad-regex": ("rules", "spec.grpo.rewards[0].pattern"),
    "grpo-reward-field-of-other-type": ("rules", "spec.grpo.rewards[0].pattern"),
    "grpo-validation-loss": ("rules", "spec.evaluation.metrics[0]"),
    "reward-metric-under-dpo": ("rules", "spec.evaluation.metrics[1]"),
    "kto-settings-under-dpo": ("rules", "spec.kto"),
    "grpo-one-generation": ("schema", "spec.grpo.generations"),
    "unknown-reward-type": ("schema", "spec.grpo.rewards[0].type"),
    "preference-eval-set-with-labels": ("rules", "spec.evaluation.datasets[0].labels"),
    # The YAML reader's bounds.
    "yaml-alias-bomb": ("reader", "expands to more than"),
    "yaml-too-deep": ("reader", "nests deeper than 64 levels"),
    "yaml-too-many-documents": ("reader", "has more than 100 documents"),
    "yaml-binary": ("reader", "is binary"),
    "yaml-not-utf8": ("reader", "is not UTF-8 text"),
    "yaml-control-character": ("reader", "control character #x001b"),
}
SCHEMA_CASES = [name for name, (layer, _) in CASES.items() if layer == "schema"]
RULE_CASES = [name for name, (layer, _) in CASES.items() if layer == "rules"]
READER_CASES = [name for name, (layer, _) in CASES.items() if layer == "reader"]
DOCUMENT_CASES = sorted(SCHEMA_CASES + RULE_CASES)


def load(name: str) -> object:
    (doc,) = validation.load_documents((CORPUS / f"{name}.yaml").read_bytes())
    return doc


def test_table_covers_the_corpus() -> None:
    assert sorted(p.stem for p in CORPUS.glob("*.yaml")) == sorted(CASES)
    assert len(CASES) >= 25


@pytest.mark.parametrize("name", DOCUMENT_CASES)
def test_kubetrain_validate_refuses_naming_the_field(name: str) -> None:
    _, field = CASES[name]
    paths = [e.path for e in validation.validate_document(load(name))]
    assert field in paths, f"expected an error at {field}, got {paths}"


@pytest.mark.parametrize("name", READER_CASES)
def test_yaml_reader_refuses_with_its_reason(name: str) -> None:
    _, reason = CASES[name]
    with pytest.raises(validation.InvalidYaml, match=re.escape(reason)):
        validation.load_documents((CORPUS / f"{name}.yaml").read_bytes())


@pytest.mark.controlplane
@pytest.mark.parametrize("name", SCHEMA_CASES)
def test_api_server_refuses_naming_the_field(
    name: str, crd_installed: None, namespace: str
) -> None:
    code, stderr = server_dry_run(CORPUS / f"{name}.yaml", namespace)
    # Kubernetes 1.20 names list items without their index (spec.data.sources.format).
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
