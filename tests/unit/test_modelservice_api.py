"""The ModelService models: defaults, child names, the experiment's mirror of the statistics'
configuration, and the rules the invalid corpus does not reach."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydantic
import pytest

from kubetrain_api import documents, validation
from kubetrain_api import modelservice as ms
from kubetrain_api import v1alpha1 as api
from kubetrain_api.modelservice_validation import (
    parse_modelservice,
    validate_modelservice_document,
)
from kubetrain_operator.experiments import stats
from kubetrain_operator.modelservice.status import experiment_config as operator_experiment_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "modelservice-ab.yaml"


def example_docs() -> list[Any]:
    return validation.load_documents(EXAMPLE.read_text())


def example() -> dict[str, Any]:
    (doc,) = [d for d in example_docs() if d["kind"] == "ModelService"]
    return copy.deepcopy(doc)


def errors_of(doc: dict[str, Any]) -> list[str]:
    return [str(e) for e in validate_modelservice_document(doc)]


def test_example_pairs_two_trainingruns_at_50_50_with_an_experiment() -> None:
    runs = [documents.parse_document(d) for d in example_docs()]
    *trainings, service = runs
    assert all(isinstance(r, api.TrainingRun) for r in trainings)
    assert isinstance(service, ms.ModelService)
    sources = [v.source.training_run for v in service.spec.variants]
    assert sources == [r.metadata.name for r in trainings]
    assert ms.weights(service.spec) == {"a": 50, "b": 50}
    assert service.spec.experiment is not None
    assert (service.spec.experiment.control, service.spec.experiment.treatment) == ("a", "b")


def test_defaults_and_wire_names() -> None:
    doc = example()
    doc["spec"].pop("router")
    service = parse_modelservice(doc)
    router = service.spec.router
    assert router.database.sqlite is not None
    assert router.database.postgres is None
    assert router.sticky_key.source == "user"
    assert (router.replicas, router.resources.cpu, router.resources.memory) == (1, "1", "1Gi")
    assert service.spec.variants[0].engine == "builtin"
    wire = service.model_dump(by_alias=True, exclude_none=True, mode="json")
    assert wire["spec"]["router"]["stickyKey"] == {"source": "user"}
    assert wire["spec"]["experiment"]["minSamplesPerVariant"] == 100
    # The resolved service parses back to itself.
    assert parse_modelservice(wire) == service


def test_a_single_variant_without_weight_gets_all_the_traffic() -> None:
    doc = example()
    doc["spec"]["variants"] = [{"name": "only", "source": {"uri": "hf://org/model"}}]
    doc["spec"].pop("experiment")
    service = parse_modelservice(doc)
    assert ms.weights(service.spec) == {"only": 100}
    assert ms.traffic_summary(ms.weights(service.spec)) == "only=100"


def test_child_names() -> None:
    assert ms.router_name("chat") == "chat-router"
    assert ms.router_database_claim_name("chat") == "chat-router-db"
    assert ms.variant_name("chat", "a") == "chat-a"
    # The longest names validation lets through still make DNS labels.
    name = "s" * ms.MAX_SERVICE_NAME
    variant = "v" * (ms.MAX_DNS_LABEL - ms.MAX_SERVICE_NAME - 1)
    doc = example()
    doc["metadata"]["name"] = name
    doc["spec"]["variants"][0]["name"] = variant
    doc["spec"]["experiment"]["control"] = variant
    assert errors_of(doc) == []
    assert len(ms.variant_name(name, variant)) == ms.MAX_DNS_LABEL
    assert len(ms.router_database_claim_name(name)) <= ms.MAX_DNS_LABEL


def test_postgres_by_secret_reference_allows_several_router_replicas() -> None:
    doc = example()
    doc["spec"]["router"] = {
        "replicas": 3,
        "database": {"postgres": {"dsnSecretRef": {"name": "router-db", "key": "dsn"}}},
    }
    assert errors_of(doc) == []
    doc["spec"]["router"]["database"]["postgres"]["dsnSecretRef"]["key"] = "bad/key"
    assert [e.split(":")[0] for e in errors_of(doc)] == [
        "spec.router.database.postgres.dsnSecretRef.key"
    ]


def test_a_password_or_token_anywhere_is_refused_without_echoing_it() -> None:
    doc = example()
    doc["spec"]["variants"][1]["source"]["version"] = "postgresql://u:hunter2@db/x"
    doc["spec"]["variants"][0]["source"]["version"] = "hf_" + "a" * 30
    errors = errors_of(doc)
    assert sorted(e.split(":")[0] for e in errors) == [
        "spec.variants[0].source.version",
        "spec.variants[1].source.version",
    ]
    assert not any("hunter2" in e or "hf_aaa" in e for e in errors)


def test_latency_metric_takes_a_threshold_and_only_it_does() -> None:
    doc = example()
    doc["spec"]["experiment"] |= {"primaryMetric": "latency", "latencyThresholdSeconds": 2.0}
    assert errors_of(doc) == []
    doc["spec"]["experiment"]["primaryMetric"] = "errorRate"
    assert errors_of(doc) == [
        "spec.experiment.latencyThresholdSeconds: only with primaryMetric latency"
    ]


def test_autoscaling_takes_one_target() -> None:
    doc = example()
    doc["spec"]["variants"][0]["autoscaling"] = {"targetConcurrency": 4, "maxReplicas": 3}
    assert errors_of(doc) == []
    doc["spec"]["variants"][0]["autoscaling"]["targetCpuUtilization"] = 70
    assert errors_of(doc) == [
        "spec.variants[0].autoscaling: set at most one of targetCpuUtilization and "
        "targetConcurrency"
    ]


def test_vllm_variant_on_a_gpu() -> None:
    doc = example()
    doc["spec"]["variants"][1] |= {"engine": "vllm", "gpus": 1, "image": "registry.local/vllm:1"}
    assert errors_of(doc) == []


# --------------------------------------------------------------------------------------
# The experiment section mirrors the statistics' configuration
# --------------------------------------------------------------------------------------


# The operator's own translation (modelservice/status.py), checked field for field.
experiment_config = operator_experiment_config


def test_experiment_defaults_are_the_statistics_defaults() -> None:
    spec = ms.ExperimentSpec(control="a", treatment="b")
    assert experiment_config(spec) == stats.ExperimentConfig()


@pytest.mark.parametrize(
    "changes",
    [
        {"alpha": 0.5},
        {"alpha": 1e-9},
        {"minimumDetectableEffect": 0.999},
        {"minSamplesPerVariant": 1},
        {"guardrails": {"maxErrorRate": 0.0, "maxLatencyIncrease": 100.0, "minRequests": 1}},
        {"guardrails": {"confidence": 0.999}},
        {"primaryMetric": "errorRate"},
    ],
)
def test_every_value_the_schema_accepts_the_statistics_accept(changes: dict[str, Any]) -> None:
    spec = ms.ExperimentSpec.model_validate({"control": "a", "treatment": "b", **changes})
    experiment_config(spec)  # raises ValueError if the statistics refuse it


@pytest.mark.parametrize(
    "changes",
    [
        {"alpha": 0.0},
        {"alpha": 0.51},
        {"minimumDetectableEffect": 1.0},
        {"minSamplesPerVariant": 0},
        {"guardrails": {"maxErrorRate": 1.0}},
        {"guardrails": {"confidence": 1.0}},
    ],
)
def test_the_schema_refuses_what_the_statistics_refuse(changes: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        ms.ExperimentSpec.model_validate({"control": "a", "treatment": "b", **changes})


def test_engine_limits_match_trainingrun_serve() -> None:
    """A variant's engine limits are spec.serve's, same defaults and bounds."""
    for field in ("max_tokens", "max_concurrency", "max_queue", "replicas", "gpus"):
        mine, theirs = ms.Variant.model_fields[field], api.ServeSpec.model_fields[field]
        assert mine.default == theirs.default, field
        assert mine.metadata == theirs.metadata, field


# --------------------------------------------------------------------------------------
# Status: what the operator will write fits the models (and so the CRD)
# --------------------------------------------------------------------------------------


def test_a_decided_experiment_fits_the_status() -> None:
    control = stats.VariantStats("a", n=400, successes=240, requests=420, errors=1)
    treatment = stats.VariantStats("b", n=400, successes=160, requests=410, errors=0)
    decision = stats.decide(control, treatment, stats.ExperimentConfig())
    assert decision.action == "rollback"
    now = datetime(2026, 1, 1, tzinfo=UTC)
    status = ms.ModelServiceStatus(
        observed_generation=1,
        variants_ready="2/2",
        traffic="a=100,b=0",
        experiment=ms.ExperimentStatus(
            control="a",
            treatment="b",
            variants=[
                ms.VariantResult(
                    name=v.name,
                    samples=v.n,
                    successes=v.successes,
                    rate=v.rate,
                    interval=ms.Interval(lower=v.interval[0], upper=v.interval[1]),
                )
                for v in decision.variants
            ],
            difference=decision.difference,
            difference_interval=ms.Interval(lower=decision.interval[0], upper=decision.interval[1]),
            p_value=decision.p_value,
            decision="Rollback",
            winner=decision.winner,
            reason=decision.reason,
            applied=True,
            decision_time=now,
        ),
        history=[
            ms.TrafficChange(
                time=now,
                weights=[
                    ms.VariantWeight(name="a", weight=100),
                    ms.VariantWeight(name="b", weight=0),
                ],
                cause="Rollback",
                reason=decision.reason[:1024],
            )
        ],
    )
    wire = status.model_dump_json(by_alias=True, exclude_none=True)
    assert ms.ModelServiceStatus.model_validate_json(wire, strict=True) == status
    assert '"pValue"' in wire
    assert '"differenceInterval"' in wire


def test_history_is_bounded() -> None:
    change = {"time": "2026-01-01T00:00:00Z", "weights": [], "cause": "Spec"}
    with pytest.raises(pydantic.ValidationError, match="at most 20 items"):
        ms.ModelServiceStatus.model_validate({"history": [change] * (ms.MAX_HISTORY + 1)})


def test_a_parked_variant_may_have_no_replicas() -> None:
    doc = example()
    doc["spec"].pop("experiment")
    doc["spec"]["variants"][0]["weight"] = 100
    doc["spec"]["variants"][1] |= {"weight": 0, "replicas": 0}
    assert errors_of(doc) == []
