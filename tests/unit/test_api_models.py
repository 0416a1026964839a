"""The API models: defaults, wire names, YAML parsing and the validation rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetrain_api import documents, validation
from kubetrain_api import v1alpha1 as api
from kubetrain_api.validation import FieldError, InvalidSpec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def quickstart() -> dict:
    # Not yaml.safe_load: it would read `learningRate: 3e-3` as a string, kubectl does not.
    (doc,) = validation.load_documents((ROOT / "examples" / "quickstart.yaml").read_text())
    return doc


def errors_of(doc: dict) -> list[str]:
    return [str(e) for e in validation.validate_document(doc)]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(path: Path) -> None:
    """Every document of every example, of either kind (modelservice-ab.yaml has both)."""
    docs = validation.load_documents(path.read_text())
    assert docs
    for doc in docs:
        assert documents.validate_document(doc) == []


def test_there_are_three_documented_examples() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"quickstart.yaml", "finetune-lora-gpu.yaml", "pretrain-gpu.yaml"} <= names
    for path in EXAMPLES:
        assert path.read_text().startswith("# "), f"{path.name} needs a one-line description"


def test_defaults_are_applied_and_wire_names_are_camel_case() -> None:
    run = validation.parse(quickstart())
    assert run.spec.distributed.strategy == "fsdp"
    assert run.spec.run_policy.backoff_limit == 3
    wire = run.model_dump(by_alias=True, exclude_none=True)
    assert "runPolicy" in wire["spec"]
    assert wire["spec"]["hyperparameters"]["globalBatchSize"] == 16
    # The resolved run parses back to itself.
    again = validation.parse(run.model_dump(by_alias=True, exclude_none=True, mode="json"))
    assert again == run


def test_yaml_reads_exponent_floats_like_kubectl() -> None:
    (doc,) = validation.load_documents("a: 3e-4\nb: 1.5E+2\nc: '3e-4'\nd: 12\n")
    assert doc == {"a": 3e-4, "b": 150.0, "c": "3e-4", "d": 12}


def test_strings_are_not_coerced_to_numbers() -> None:
    doc = quickstart()
    doc["spec"]["hyperparameters"]["learningRate"] = "0.1"
    assert errors_of(doc) == ["spec.hyperparameters.learningRate: must be a number"]


def test_quantities_accept_integers_and_strings() -> None:
    doc = quickstart()
    doc["spec"]["resources"]["cpuPerWorker"] = 8
    doc["spec"]["resources"]["memoryPerWorker"] = "500Mi"
    assert errors_of(doc) == []
    doc["spec"]["resources"]["cpuPerWorker"] = 1.5
    assert errors_of(doc) == [
        "spec.resources.cpuPerWorker: must be an integer or a quantity string such as 16Gi"
    ]


def test_every_error_is_reported_at_once() -> None:
    doc = quickstart()
    doc["spec"]["hyperparameters"]["learningRate"] = 0
    doc["spec"]["resources"]["workers"] = 0
    doc["spec"]["bogus"] = True
    assert sorted(errors_of(doc)) == [
        "spec.bogus: unknown field",
        "spec.hyperparameters.learningRate: must be > 0.0",
        "spec.resources.workers: must be >= 1",
    ]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ({"apiVersion": "kubetrain.dev/v1"}, "apiVersion: must be kubetrain.dev/v1alpha1"),
        ({"kind": "TrainingJob"}, "kind: must be TrainingRun"),
    ],
)
def test_wrong_header_is_named(header: dict, expected: str) -> None:
    assert errors_of({**quickstart(), **header}) == [expected]


def test_non_mapping_document() -> None:
    assert errors_of(["not", "a", "run"]) == ["(document): must be a YAML mapping"]  # type: ignore[arg-type]


def test_rules_only_run_on_structurally_valid_documents() -> None:
    doc = quickstart()
    doc["spec"]["hyperparameters"]["maxSteps"] = -1  # schema error
    doc["spec"]["env"] = [{"name": "RANK", "value": "0"}]  # rule error, not reached
    assert errors_of(doc) == ["spec.hyperparameters.maxSteps: must be >= 1"]


def test_batch_rule_counts_gpus_as_processes() -> None:
    doc = quickstart()
    doc["spec"]["resources"].update(workers=2, gpusPerWorker=8)
    doc["spec"]["hyperparameters"].update(globalBatchSize=64, microBatchSize=4)
    assert errors_of(doc) == []  # 2 x 8 processes x 4 = 64
    doc["spec"]["hyperparameters"]["globalBatchSize"] = 96
    assert errors_of(doc) == [
        "spec.hyperparameters.globalBatchSize: must be a multiple of microBatchSize x "
        "data-parallel processes (4 x 16 = 64)"
    ]


def test_gpu_cap_comes_from_the_installation_limits() -> None:
    doc = quickstart()
    doc["spec"]["resources"].update(workers=2, gpusPerWorker=8)
    doc["spec"]["hyperparameters"].update(globalBatchSize=128, microBatchSize=4)
    assert validation.validate_document(doc) == []
    errors = validation.validate_document(doc, validation.Limits(max_gpus_per_run=8))
    assert [e.path for e in errors] == ["spec.resources.gpusPerWorker"]


def test_inline_secret_is_refused_without_echoing_it() -> None:
    token = "hf_" + "x1Y2z3" * 6
    doc = quickstart()
    doc["spec"]["env"] = [{"name": "SOME_VAR", "value": token}]
    doc["spec"]["model"]["revision"] = token
    errors = errors_of(doc)
    assert [e.split(":")[0] for e in errors] == ["spec.env[0].value", "spec.model.revision"]
    assert not any(token in e for e in errors)


def test_secret_references_are_fine() -> None:
    doc = quickstart()
    doc["spec"]["env"] = [
        {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "k"}}},
        {"name": "NCCL_DEBUG", "value": "INFO"},
    ]
    doc["spec"]["secrets"] = {"huggingFaceToken": {"name": "hf", "key": "token"}}
    assert errors_of(doc) == []


def test_env_needs_exactly_one_source() -> None:
    doc = quickstart()
    doc["spec"]["env"] = [{"name": "A"}, {"name": "B", "value": "1", "valueFrom": {}}]
    assert errors_of(doc) == [
        "spec.env[0]: set exactly one of value and valueFrom",
        "spec.env[1]: set exactly one of value and valueFrom",
        "spec.env[1].valueFrom: set exactly one of secretKeyRef and configMapKeyRef",
    ]


def test_oversized_spec_is_refused() -> None:
    doc = quickstart()
    doc["spec"]["env"] = [{"name": f"E{i}", "value": "v" * 4096} for i in range(64)]
    errors = validation.validate_document(doc)
    assert [e.path for e in errors] == ["spec"]
    assert "limit is 262144" in errors[0].message


def test_gate_thresholds_need_a_bound() -> None:
    doc = quickstart()
    doc["spec"]["evaluation"]["gate"] = [{"metric": "loss"}, {"metric": "loss", "min": 2, "max": 1}]
    assert errors_of(doc) == [
        "spec.evaluation.gate[0]: set min, max or both",
        "spec.evaluation.gate[1].min: must be <= max",
    ]


def _with_datasets(doc: dict, metrics: list[str]) -> dict:
    doc["spec"]["evaluation"]["metrics"] = metrics
    doc["spec"]["evaluation"]["datasets"] = [
        {"name": "intents", "uri": "file:///data/intents.jsonl", "labels": ["a", "b"]},
        {"name": "qa", "uri": "file:///data/qa.jsonl", "task": "exact-match"},
    ]
    return doc


def test_gate_can_name_one_datasets_metric() -> None:
    doc = _with_datasets(quickstart(), ["loss", "perplexity", "f1", "accuracy"])
    doc["spec"]["evaluation"]["gate"] = [
        {"metric": "qa/accuracy", "min": 0.5},
        {"metric": "intents/f1", "min": 0.7},
        {"metric": "loss", "max": 3},
    ]
    assert errors_of(doc) == []
    run = validation.parse(doc)
    assert [g.metric for g in run.spec.evaluation.gate] == ["qa/accuracy", "intents/f1", "loss"]


def test_gate_dataset_metrics_are_checked() -> None:
    doc = _with_datasets(quickstart(), ["loss", "perplexity", "f1"])
    doc["spec"]["evaluation"]["gate"] = [
        {"metric": "sentiment/f1", "min": 0.5},
        {"metric": "intents/recall", "min": 0.5},
        {"metric": "intents/loss", "max": 2},
    ]
    assert errors_of(doc) == [
        "spec.evaluation.gate[0].metric: no evaluation dataset named 'sentiment' "
        "(spec.evaluation.datasets: intents, qa)",
        "spec.evaluation.gate[1].metric: recall is not in spec.evaluation.metrics",
        "spec.evaluation.gate[2].metric: loss is computed on the validation split, not per "
        "dataset; write 'loss'",
    ]
    doc["spec"]["evaluation"]["gate"] = [{"metric": "intents/f2", "min": 0.5}]
    [error] = validation.validate_document(doc)
    assert error.path == "spec.evaluation.gate[0].metric"


def test_scoring_by_likelihood_needs_labels() -> None:
    doc = _with_datasets(quickstart(), ["loss", "perplexity", "f1"])
    doc["spec"]["evaluation"]["datasets"][0]["scoring"] = "loglikelihood-normalized"
    doc["spec"]["evaluation"]["datasets"][1]["scoring"] = "loglikelihood"
    assert errors_of(doc) == [
        "spec.evaluation.datasets[1].scoring: loglikelihood scores each of the dataset's "
        "labels; list them in labels or use generate",
    ]
    doc["spec"]["evaluation"]["datasets"][1]["scoring"] = "sampling"
    [error] = validation.validate_document(doc)
    assert error.path == "spec.evaluation.datasets[1].scoring"


def test_invalid_spec_carries_every_error() -> None:
    doc = quickstart()
    doc["spec"]["hyperparameters"]["maxSteps"] = None
    doc["spec"]["env"] = [{"name": "WORLD_SIZE", "value": "2"}]
    with pytest.raises(InvalidSpec) as info:
        validation.parse(doc)
    assert info.value.errors == [
        FieldError("spec.hyperparameters.maxSteps", "set maxSteps or epochs"),
        FieldError("spec.env[0].name", "WORLD_SIZE is reserved: kubetrain sets it"),
    ]


def test_immutable_fields_while_running() -> None:
    old = validation.parse(quickstart()).spec
    changed = quickstart()
    changed["spec"]["hyperparameters"]["learningRate"] = 1e-3
    changed["spec"]["resources"]["workers"] = 4
    changed["spec"]["hyperparameters"]["globalBatchSize"] = 32
    changed["spec"]["runPolicy"] = {"suspend": True, "backoffLimit": 5}
    changed["spec"]["serve"]["replicas"] = 3
    new = validation.parse(changed).spec
    assert [str(e) for e in validation.immutable_changes(old, new)] == [
        "spec.hyperparameters.globalBatchSize: cannot change while the run is active",
        "spec.hyperparameters.learningRate: cannot change while the run is active",
        "spec.resources.workers: cannot change while the run is active",
    ]
    assert validation.immutable_changes(old, old) == []


def test_status_round_trips() -> None:
    status = {
        "phase": "Running",
        "observedGeneration": 2,
        "attempts": 1,
        "conditions": [
            {
                "type": "Training",
                "status": "True",
                "reason": "StepsAdvancing",
                "lastTransitionTime": "2026-11-28T03:00:00Z",
                "observedGeneration": 2,
            }
        ],
        "progress": {"step": 10, "totalSteps": 200, "percent": 5, "loss": 3.2},
        "evaluation": {"metrics": {"perplexity": 24.5}, "gate": {"passed": True}},
    }
    doc = {**quickstart(), "status": status}
    run = validation.parse(doc)
    assert run.status is not None
    assert run.status.conditions[0].last_transition_time.year == 2026
    assert run.status.evaluation is not None
    assert run.status.evaluation.metrics == {"perplexity": 24.5}


def test_api_module_imports_nothing_heavy() -> None:
    import subprocess
    import sys

    code = (
        "import sys, kubetrain_api, kubetrain_api.crd, kubetrain_api.validation, "
        "kubetrain_api.modelservice, kubetrain_api.documents, kubetrain_cli.main\n"
        "heavy = {'torch', 'ray', 'kopf', 'kubernetes', 'transformers'} & set(sys.modules)\n"
        "print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert api.GROUP == "kubetrain.dev"
