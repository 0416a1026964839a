"""The pure status computation of a ModelService (modelservice/status.py): variants'
readiness, the experiment's looks and its kept decision, the split it moves, history,
conditions and events."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from kubetrain_api import modelservice as ms
from kubetrain_api.modelservice_validation import parse_modelservice
from kubetrain_api.routing import RouterStats, VariantCountsReport, VariantDriftReport
from kubetrain_api.validation import FieldError
from kubetrain_operator.modelservice import drift as service_drift
from kubetrain_operator.modelservice.sources import ModelSource, Resolution
from kubetrain_operator.modelservice.status import (
    ObservedService,
    ServiceDecision,
    compute_service_status,
)

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def service(**experiment: Any) -> ms.ModelService:
    doc: dict[str, Any] = {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "ModelService",
        "metadata": {"name": "chat", "namespace": "team"},
        "spec": {
            "variants": [
                {"name": "a", "source": {"trainingRun": "chat-a"}, "weight": 50},
                {"name": "b", "source": {"uri": "pvc://models/b"}, "weight": 50},
            ],
            "experiment": {
                "control": "a",
                "treatment": "b",
                "minSamplesPerVariant": 100,
                "minimumDetectableEffect": 0.1,
                **experiment,
            },
        },
    }
    return parse_modelservice(doc)


RESOLVED = {
    "a": Resolution(ModelSource("a-v1", claim="chat-a-storage", sub_path="chat-a-1/model")),
    "b": Resolution(ModelSource("b", claim="models", sub_path="b")),
}
READY = {"spec": {"replicas": 1}, "status": {"readyReplicas": 1}}


def counts(
    n: int, successes: int, requests: int | None = None, errors: int = 0
) -> VariantCountsReport:
    return VariantCountsReport(
        requests=requests if requests is not None else n,
        errors=errors,
        n=n,
        successes=successes,
        latency_p50_s=0.1,
        latency_p95_s=0.2,
    )


def stats(a: VariantCountsReport, b: VariantCountsReport) -> RouterStats:
    return RouterStats(backend="sqlite", weights={"a": 50, "b": 50}, variants={"a": a, "b": b})


def look(
    svc: ms.ModelService | None,
    previous: dict[str, Any] | None = None,
    now: datetime = T0,
    **observed: Any,
) -> ServiceDecision:
    fields: dict[str, Any] = {
        "resolutions": RESOLVED,
        "deployments": {"a": READY, "b": READY},
        "router": READY,
        "endpoint": "http://chat-router.team.svc/v1",
    }
    fields.update(observed)
    return compute_service_status(
        ObservedService(service=svc, generation=3, now=now, previous=previous or {}, **fields)
    )


def conditions(decision: ServiceDecision) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in decision.status["conditions"]}


def started() -> ServiceDecision:
    """The first pass: the experiment starts, the spec's split is applied."""
    return look(service())


def test_an_invalid_spec_is_reported_and_builds_nothing() -> None:
    decision = look(None, invalid=[FieldError("spec.variants[0].weight", "must be <= 100")])
    assert decision.weights is None
    ready = conditions(decision)["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert "spec.variants[0].weight" in ready["message"]
    assert ready["observedGeneration"] == 3


def test_a_variant_whose_run_has_not_succeeded_holds_everything_back() -> None:
    waiting = Resolution(waiting="TrainingRun chat-a has not succeeded yet (phase Running)")
    decision = look(service(), resolutions={**RESOLVED, "a": waiting}, router=None)
    assert decision.weights is None
    assert decision.looking
    variants = conditions(decision)["VariantsReady"]
    assert (variants["status"], variants["reason"]) == ("False", "ModelUnavailable")
    assert "chat-a has not succeeded" in variants["message"]
    assert decision.status["experiment"]["decision"] == "Collecting"
    assert "startTime" not in decision.status["experiment"]
    assert "history" not in decision.status or decision.status["history"] == []


def test_the_first_pass_starts_the_experiment_and_applies_the_spec_split() -> None:
    decision = started()
    assert decision.weights == {"a": 50, "b": 50}
    status = decision.status
    assert status["traffic"] == "a=50,b=50"
    assert status["variantsReady"] == "2/2"
    assert status["experiment"]["startTime"] == "2026-12-01T12:00:00Z"
    assert status["experiment"]["decision"] == "Collecting"
    [change] = status["history"]
    assert change["cause"] == "Spec"
    assert status["variants"][0]["modelUri"] == "pvc://chat-a-storage/chat-a-1/model"
    assert status["variants"][0]["modelVersion"] == "a-v1"
    assert conditions(decision)["Ready"]["status"] == "True"
    assert decision.looking


def test_a_worse_treatment_is_rolled_back_and_the_decision_is_kept() -> None:
    first = started().status
    later = T0 + timedelta(minutes=5)
    decision = look(service(), first, later, stats=stats(counts(300, 180), counts(300, 120)))
    experiment = decision.status["experiment"]
    assert experiment["decision"] == "Rollback"
    assert experiment["winner"] == "a"
    assert experiment["applied"] is True
    assert experiment["pValue"] <= 0.05
    assert experiment["pValue"] == float(f"{experiment['pValue']:.3g}")  # readable in kubectl
    assert experiment["differenceInterval"]["upper"] < 0
    assert [v["samples"] for v in experiment["variants"]] == [300, 300]
    assert decision.weights == {"a": 100, "b": 0}
    assert decision.status["traffic"] == "a=100,b=0"
    assert decision.status["history"][-1]["cause"] == "Rollback"
    rolled = conditions(decision)["RolledBack"]
    assert (rolled["status"], rolled["reason"]) == ("True", "ControlWon")
    assert conditions(decision)["Promoted"]["status"] == "False"
    assert [e.reason for e in decision.events] == ["RolledBack", "TrafficShifted"]
    assert not decision.looking

    # Kept: new counts that would say otherwise change nothing.
    again = look(
        service(), decision.status, later + timedelta(minutes=1),
        stats=stats(counts(900, 300), counts(900, 800)),
    )  # fmt: skip
    assert again.status["experiment"] == experiment
    assert again.weights == {"a": 100, "b": 0}
    assert again.events == []
    assert len(again.status["history"]) == 2


def test_a_better_treatment_is_promoted() -> None:
    decision = look(service(), started().status, stats=stats(counts(300, 120), counts(300, 180)))
    assert decision.status["experiment"]["decision"] == "Promote"
    assert decision.weights == {"a": 0, "b": 100}
    promoted = conditions(decision)["Promoted"]
    assert (promoted["status"], promoted["reason"]) == ("True", "TreatmentWon")
    assert decision.events[0].reason == "Promoted"


def test_on_decision_rollback_leaves_a_promotion_to_a_person() -> None:
    svc = service(onDecision="rollback")
    decision = look(svc, look(svc).status, stats=stats(counts(300, 120), counts(300, 180)))
    assert decision.status["experiment"]["decision"] == "Promote"
    assert decision.status["experiment"]["applied"] is False
    assert decision.weights == {"a": 50, "b": 50}
    assert conditions(decision)["Promoted"]["status"] == "False"
    assert [e.reason for e in decision.events] == ["ExperimentDecided"]


def test_a_broken_guardrail_rolls_back_before_the_minimum_samples() -> None:
    broken = counts(3, 2, requests=40, errors=30)
    decision = look(service(), started().status, stats=stats(counts(3, 2, requests=40), broken))
    experiment = decision.status["experiment"]
    assert experiment["decision"] == "Rollback"
    assert "5xx rate" in experiment["guardrailBreach"]
    assert decision.weights == {"a": 100, "b": 0}
    assert decision.status["history"][-1]["cause"] == "Guardrail"
    assert conditions(decision)["RolledBack"]["reason"] == "GuardrailBreached"


def test_a_regressed_treatment_rolls_back_at_once() -> None:
    """Continuous evaluation found b worse than its baseline (onRegression: rollback)."""
    why = "b: accuracy 0.61 < baseline 0.8 - 0.05"
    decision = look(service(), started().status, stats=None, regressed_treatment=why)
    experiment = decision.status["experiment"]
    assert experiment["decision"] == "Rollback"
    assert experiment["winner"] == "a"
    assert experiment["guardrailBreach"] == f"continuous evaluation regressed: {why}"
    assert decision.weights == {"a": 100, "b": 0}
    assert decision.status["history"][-1]["cause"] == "Regression"
    assert conditions(decision)["RolledBack"]["status"] == "True"


def test_without_enough_samples_the_experiment_keeps_collecting() -> None:
    decision = look(service(), started().status, stats=stats(counts(20, 15), counts(20, 5)))
    experiment = decision.status["experiment"]
    assert experiment["decision"] == "Collecting"
    assert experiment["looks"] == 1
    assert "collecting samples" in experiment["reason"]
    assert decision.weights == {"a": 50, "b": 50}
    assert decision.looking


def test_unreadable_counts_keep_the_last_numbers_and_say_why() -> None:
    first = look(service(), started().status, stats=stats(counts(20, 15), counts(20, 5)))
    decision = look(service(), first.status, stats=None, stats_problem="router did not answer")
    experiment = decision.status["experiment"]
    assert experiment["variants"] == first.status["experiment"]["variants"]
    assert "router did not answer" in experiment["reason"]


def test_a_new_treatment_starts_a_new_experiment_from_the_spec_split() -> None:
    decided = look(service(), started().status, stats=stats(counts(300, 180), counts(300, 120)))
    assert decided.weights == {"a": 100, "b": 0}
    swapped = service(control="b", treatment="a")
    later = T0 + timedelta(hours=1)
    decision = look(swapped, decided.status, later)
    experiment = decision.status["experiment"]
    assert (experiment["control"], experiment["decision"]) == ("b", "Collecting")
    assert experiment["startTime"] == "2026-12-01T13:00:00Z"
    assert decision.weights == {"a": 50, "b": 50}
    assert decision.status["history"][-1]["cause"] == "Spec"


@pytest.mark.parametrize(
    ("metric", "extra", "a", "b", "winner"),
    [
        ("errorRate", {}, counts(0, 0, 400, 8), counts(0, 0, 400, 60), "a"),
        (
            "latency",
            {"latencyThresholdSeconds": 1.0},
            counts(0, 0, 400).model_copy(update={"slow": 200}),
            counts(0, 0, 400).model_copy(update={"slow": 20}),
            "b",
        ),
    ],
)
def test_lower_is_better_metrics(
    metric: str, extra: dict[str, Any], a: Any, b: Any, winner: str
) -> None:
    svc = service(
        primaryMetric=metric,
        guardrails={"maxErrorRate": 0.5, "maxLatencyIncrease": 10},
        **extra,
    )
    decision = look(svc, look(svc).status, stats=stats(a, b))
    assert decision.status["experiment"]["winner"] == winner
    assert decision.weights is not None
    assert decision.weights[winner] == 100


def test_history_keeps_the_newest_changes() -> None:
    status = started().status
    status["history"] = status["history"] * ms.MAX_HISTORY
    decision = look(service(), status, stats=stats(counts(300, 180), counts(300, 120)))
    assert len(decision.status["history"]) == ms.MAX_HISTORY
    assert decision.status["history"][-1]["cause"] == "Rollback"


def drifting(a: VariantDriftReport | None, b: VariantDriftReport | None) -> RouterStats:
    return stats(
        counts(10, 5).model_copy(update={"drift": a}),
        counts(10, 5).model_copy(update={"drift": b}),
    )


CALM = VariantDriftReport(unigram_jsd=0.02, length_psi=0.05, prompts=500, drifted=False)
SHIFTED = VariantDriftReport(unigram_jsd=0.41, length_psi=2.5, prompts=480, drifted=True)


def test_prompt_drift_reaches_the_variants_and_the_drifted_condition() -> None:
    svc = service()
    decision = look(svc, look(svc).status, stats=drifting(CALM, SHIFTED))
    shown = {v["name"]: v.get("drift") for v in decision.status["variants"]}
    assert shown["a"] == {"unigramJsd": 0.02, "lengthPsi": 0.05, "prompts": 500, "drifted": False}
    assert shown["b"] == {"unigramJsd": 0.41, "lengthPsi": 2.5, "prompts": 480, "drifted": True}
    drifted = conditions(decision)["Drifted"]
    assert (drifted["status"], drifted["reason"]) == ("True", "PromptDrift")
    assert "b: unigram JSD 0.410, length PSI 2.500 over 480 prompts" in drifted["message"]
    assert "a: unigram" not in drifted["message"]

    assert service_drift.unigram_jsd_of(decision.status, "b") == 0.41  # for retraining
    assert service_drift.unigram_jsd_of(decision.status, "c") is None
    calm = look(svc, decision.status, stats=drifting(CALM, CALM))
    assert conditions(calm)["Drifted"]["status"] == "False"
    assert conditions(calm)["Drifted"]["reason"] == "NoDrift"

    # Counts asked for but unreadable: the last reading stands.
    kept = look(svc, decision.status, stats=None, stats_problem="the router did not answer")
    assert conditions(kept)["Drifted"]["status"] == "True"
    assert kept.status["variants"][1]["drift"]["drifted"] is True
    # Not asked for (no experiment running, no retraining or evaluation): cleared.
    cleared = look(svc, decision.status, stats=None)
    assert all("drift" not in v for v in cleared.status["variants"])
    assert conditions(cleared)["Drifted"]["reason"] == "NotMeasured"


def test_no_drift_known_means_no_drifted_condition() -> None:
    svc = service()
    too_few = VariantDriftReport(prompts=12)  # the router's sample was too small to score
    decision = look(svc, look(svc).status, stats=drifting(None, too_few))
    assert "Drifted" not in conditions(decision)
    assert decision.status["variants"][1]["drift"] == {"prompts": 12, "drifted": False}


def test_drift_is_read_for_retraining_or_evaluation_over_a_rounded_window() -> None:
    assert not service_drift.wants_stats(service().spec)
    doc = service().model_dump(by_alias=True, exclude_none=True, mode="json")
    doc["spec"]["evaluation"] = {
        "schedule": "0 * * * *",
        "heldOut": "s3://data/held.jsonl",
        "metrics": ["perplexity"],
    }
    assert service_drift.wants_stats(parse_modelservice(doc).spec)
    start = service_drift.window_start(T0 + timedelta(minutes=7, seconds=13))
    assert start == T0 - timedelta(hours=24) + timedelta(minutes=5)
