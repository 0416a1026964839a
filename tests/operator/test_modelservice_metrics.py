"""The operator's ModelService series (metrics.SERVICES), read back as Prometheus scrapes
them: per-variant traffic and readiness, the experiment's numbers and its decision, the
traffic-change timeline, and no stale series after a variant or a service goes."""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kubetrain_api.modelservice import DriftStatus, ModelServiceStatus
from kubetrain_operator import metrics
from kubetrain_operator.metrics import ServiceIndex

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
T1 = datetime(2026, 1, 2, 4, 0, 0, tzinfo=UTC)


def status(
    decision: str = "Undecided", variants: tuple[str, ...] = ("a", "b")
) -> ModelServiceStatus:
    return ModelServiceStatus.model_validate(
        {
            "variants": [
                {"name": v, "weight": 100 // len(variants), "ready": v == "a"} for v in variants
            ],
            "experiment": {
                "control": "a",
                "treatment": "b",
                "variants": [
                    {
                        "name": "a",
                        "samples": 120,
                        "successes": 60,
                        "rate": 0.5,
                        "interval": {"lower": 0.41, "upper": 0.59},
                    },
                    {"name": "b", "samples": 118, "successes": 71, "rate": 0.6017},
                ],
                "difference": 0.1017,
                "differenceInterval": {"lower": -0.05, "upper": 0.25},
                "pValue": 0.31,
                "decision": decision,
                "looks": 7,
            },
            "history": [
                {
                    "time": T0.isoformat(),
                    "weights": [{"name": "a", "weight": 100}],
                    "cause": "Spec",
                },
                {"time": T1.isoformat(), "weights": [{"name": "a", "weight": 50}], "cause": "Spec"},
            ],
        }
    )


def scrape(index: ServiceIndex) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """name, labels -> value, through the text format Prometheus reads."""
    registry = CollectorRegistry()
    registry.register(index)
    text = generate_latest(registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get(
        (name, frozenset({"namespace": "ml", "modelservice": "chat", **labels}.items()))
    )


def test_a_service_s_traffic_experiment_and_decision_are_exported() -> None:
    index = ServiceIndex()
    index.observe("ml", "chat", status())
    s = scrape(index)
    assert value(s, "kubetrain_modelservice_variant_weight", variant="a") == 50
    assert value(s, "kubetrain_modelservice_variant_ready", variant="a") == 1
    assert value(s, "kubetrain_modelservice_variant_ready", variant="b") == 0
    assert value(s, "kubetrain_experiment_samples", variant="b") == 118
    assert value(s, "kubetrain_experiment_successes", variant="b") == 71
    assert value(s, "kubetrain_experiment_rate", variant="a") == 0.5
    assert value(s, "kubetrain_experiment_rate_lower", variant="a") == 0.41
    assert value(s, "kubetrain_experiment_rate_upper", variant="a") == 0.59
    assert value(s, "kubetrain_experiment_rate_lower", variant="b") is None  # no interval
    assert value(s, "kubetrain_experiment_p_value") == 0.31
    assert value(s, "kubetrain_experiment_difference") == 0.1017
    assert value(s, "kubetrain_experiment_difference_lower") == -0.05
    assert value(s, "kubetrain_experiment_difference_upper") == 0.25
    assert value(s, "kubetrain_experiment_looks") == 7
    decisions = {
        d: value(s, "kubetrain_experiment_decision", decision=d) for d in metrics.DECISIONS
    }
    assert decisions == {"Collecting": 0, "Undecided": 1, "Promote": 0, "Rollback": 0}
    change = "kubetrain_modelservice_last_traffic_change_timestamp_seconds"
    assert value(s, change, cause="Spec") == T1.timestamp()  # the newest of that cause


def test_decision_and_timeline_follow_the_latest_status() -> None:
    index = ServiceIndex()
    index.observe("ml", "chat", status())
    rolled_back = status("Rollback")
    at = datetime(2026, 1, 2, 5, 0, 0, tzinfo=UTC)
    rolled_back.history.append(
        rolled_back.history[0].model_copy(update={"time": at, "cause": "Guardrail"})
    )
    index.observe("ml", "chat", rolled_back)
    # The operator keeps 20 changes: the Spec ones may drop out, their time stays.
    index.observe("ml", "chat", rolled_back.model_copy(update={"history": rolled_back.history[2:]}))
    s = scrape(index)
    assert value(s, "kubetrain_experiment_decision", decision="Rollback") == 1
    assert value(s, "kubetrain_experiment_decision", decision="Undecided") == 0
    change = "kubetrain_modelservice_last_traffic_change_timestamp_seconds"
    assert value(s, change, cause="Guardrail") == at.timestamp()
    assert value(s, change, cause="Spec") == T1.timestamp()


def test_no_stale_series_after_a_variant_or_the_service_goes() -> None:
    index = ServiceIndex()
    index.observe("ml", "chat", status(variants=("a", "b")))
    index.observe("ml", "other", ModelServiceStatus())  # no experiment: no experiment series
    index.observe("ml", "chat", status(variants=("a",)))
    s = scrape(index)
    assert value(s, "kubetrain_modelservice_variant_weight", variant="a") == 100
    assert value(s, "kubetrain_modelservice_variant_weight", variant="b") is None
    assert value(s, "kubetrain_modelservice_variant_ready", variant="b") is None
    assert not [k for k in s if dict(k[1]).get("modelservice") == "other"]
    index.forget("ml", "chat")
    assert scrape(index) == {}
    index.forget("ml", "never-seen")  # a delete of a service never reconciled


def test_the_operator_registry_serves_them() -> None:
    """metrics.SERVICES is the object the reconcile calls, in the operator's registry."""
    try:
        metrics.SERVICES.observe("ml", "chat", status())
        labels = {"namespace": "ml", "modelservice": "chat", "variant": "b"}
        assert metrics.REGISTRY.get_sample_value("kubetrain_experiment_samples", labels) == 118
    finally:
        metrics.SERVICES.forget("ml", "chat")
    assert metrics.REGISTRY.get_sample_value("kubetrain_experiment_samples", labels) is None


def test_prompt_drift_is_exported_per_variant_and_measure() -> None:
    drifting = status()
    drifting.variants[1].drift = DriftStatus(
        unigram_jsd=0.42, length_psi=3.5, prompts=500, drifted=True
    )
    drifting.variants[0].drift = DriftStatus(prompts=10)  # too few prompts: no scores
    index = ServiceIndex()
    index.observe("ml", "chat", drifting)
    s = scrape(index)
    name = "kubetrain_modelservice_prompt_drift"
    assert value(s, name, variant="b", measure="unigram_jsd") == 0.42
    assert value(s, name, variant="b", measure="length_psi") == 3.5
    assert value(s, name, variant="a", measure="unigram_jsd") is None
    index.observe("ml", "chat", status())  # the drift went: so do its series
    assert value(scrape(index), name, variant="b", measure="unigram_jsd") is None
