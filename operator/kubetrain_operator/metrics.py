"""Operator metrics (`kubetrain_operator_*`), in a registry of their own.

Runs (and the GPUs they request) by phase are computed at scrape time from an index the
reconciler keeps, and a run leaves the index when it is deleted, so deleted runs leave no
series behind; ModelServices' traffic and experiments (`kubetrain_modelservice_*`,
`kubetrain_experiment_*`) likewise, from their latest status. Labels are bounded: phase,
verb, resource kind, HTTP status code, outcome; a ModelService's namespace, name, variants
(at most routing.MAX_VARIANTS), decision and traffic-change cause.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kubetrain_api.modelservice import Decision, ModelServiceStatus
from kubetrain_api.v1alpha1 import Phase

REGISTRY = CollectorRegistry(auto_describe=True)
PHASES: tuple[str, ...] = Phase.__args__  # type: ignore[attr-defined]

RECONCILE_SECONDS = Histogram(
    "kubetrain_operator_reconcile_duration_seconds",
    "Time of one reconcile of one TrainingRun.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
RECONCILE_ERRORS = PromCounter(
    "kubetrain_operator_reconcile_errors_total",
    "Reconciles that raised (they are retried).",
    registry=REGISTRY,
)
RETRIES = PromCounter(
    "kubetrain_operator_retries_total",
    "Ray clusters recreated after a failure, by cause.",
    ["cause"],
    registry=REGISTRY,
)
API_CALLS = PromCounter(
    "kubetrain_operator_api_calls_total",
    "Mutating Kubernetes API calls, by verb and kind.",
    ["verb", "resource"],
    registry=REGISTRY,
)
API_ERRORS = PromCounter(
    "kubetrain_operator_api_errors_total",
    "Failed Kubernetes API calls, by HTTP status (or 'connection').",
    ["code"],
    registry=REGISTRY,
)


class RunIndex(Collector):
    """Phase and requested GPUs of every run this operator reconciles, keyed by uid."""

    def __init__(self) -> None:
        self._phases: dict[str, str] = {}
        self._gpus: dict[str, int] = {}
        self._lock = threading.Lock()

    def set(self, uid: str, phase: str, gpus: int = 0) -> None:
        with self._lock:
            self._phases[uid] = phase
            self._gpus[uid] = gpus

    def forget(self, uid: str) -> None:
        with self._lock:
            self._phases.pop(uid, None)
            self._gpus.pop(uid, None)

    def __contains__(self, uid: object) -> bool:
        with self._lock:
            return uid in self._phases

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(self._phases.values())

    def gpus(self) -> Counter[str]:
        """GPUs requested by the runs of each phase (GPU-hours are its integral over time)."""
        with self._lock:
            totals: Counter[str] = Counter()
            for uid, phase in self._phases.items():
                totals[phase] += self._gpus.get(uid, 0)
            return totals

    def collect(self) -> Iterator[GaugeMetricFamily]:
        runs = GaugeMetricFamily(
            "kubetrain_operator_runs", "TrainingRuns by phase.", labels=["phase"]
        )
        gpus = GaugeMetricFamily(
            "kubetrain_operator_run_gpus",
            "GPUs requested by TrainingRuns (workers x gpusPerWorker), by phase.",
            labels=["phase"],
        )
        counts, gpu_counts = self.counts(), self.gpus()
        for phase in PHASES:
            runs.add_metric([phase], counts.get(phase, 0))
            gpus.add_metric([phase], gpu_counts.get(phase, 0))
        yield runs
        yield gpus


RUNS = RunIndex()
REGISTRY.register(RUNS)


def mutating_calls() -> float:
    """Sum of mutating API calls so far (tests compare it before and after a resync)."""
    return sum(
        sample.value
        for metric in API_CALLS.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


# ---------------------------------------------------------------------------- ModelServices

DECISIONS: tuple[str, ...] = Decision.__args__  # type: ignore[attr-defined]


def _gauge(name: str, help_text: str, *extra: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, labels=["namespace", "modelservice", *extra])


class ServiceIndex(Collector):
    """The latest status of every ModelService this operator reconciles, by namespace and
    name, exported at scrape time: a forgotten service, or a variant gone from its status,
    leaves no series behind.

    The series carry the ModelService's `namespace`: the operator's scrape must keep it
    (`honor_labels`, as the chart's ServiceMonitor does), else Prometheus renames it
    `exported_namespace`."""

    def __init__(self) -> None:
        self._statuses: dict[tuple[str, str], ModelServiceStatus] = {}
        # Newest change per cause, kept beyond status.history's 20 entries.
        self._changes: dict[tuple[str, str], dict[str, float]] = {}
        self._lock = threading.Lock()

    def observe(self, namespace: str, name: str, status: ModelServiceStatus) -> None:
        with self._lock:
            self._statuses[namespace, name] = status
            changes = self._changes.setdefault((namespace, name), {})
            for change in status.history:
                at = change.time.timestamp()
                changes[change.cause] = max(at, changes.get(change.cause, at))

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._statuses.pop((namespace, name), None)
            self._changes.pop((namespace, name), None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            statuses = dict(self._statuses)
            changes = {key: dict(value) for key, value in self._changes.items()}
        weight = _gauge(
            "kubetrain_modelservice_variant_weight",
            "Percent of a ModelService's traffic the router gives each variant now.",
            "variant",
        )
        ready = _gauge(
            "kubetrain_modelservice_variant_ready",
            "1 when the variant has a ready replica and its model is resolved.",
            "variant",
        )
        drift = _gauge(
            "kubetrain_modelservice_prompt_drift",
            "Prompt drift of a variant's latest prompts from its model's training data, by "
            "measure: unigram_jsd (Jensen-Shannon divergence of words), length_psi.",
            "variant",
            "measure",
        )
        changed = _gauge(
            "kubetrain_modelservice_last_traffic_change_timestamp_seconds",
            "When the traffic split last changed, by cause (Spec, Promote, Rollback, Guardrail).",
            "cause",
        )
        per_variant = {
            field: _gauge(f"kubetrain_experiment_{field}", text, "variant")
            for field, text in (
                ("samples", "Samples per variant on the primary metric (the statistics' n)."),
                ("successes", "Samples that count for the primary metric, per variant."),
                ("rate", "successes / samples per variant."),
                ("rate_lower", "Lower end of the rate's Wilson interval at 1 - alpha."),
                ("rate_upper", "Upper end of the rate's Wilson interval at 1 - alpha."),
            )
        }
        per_service = {
            field: _gauge(f"kubetrain_experiment_{field}", text)
            for field, text in (
                ("p_value", "Always-valid p-value of the experiment's latest look."),
                ("difference", "rate(treatment) - rate(control) at the latest look."),
                ("difference_lower", "Lower end of the difference's confidence sequence."),
                ("difference_upper", "Upper end of the difference's confidence sequence."),
                ("looks", "Looks the experiment has taken."),
            )
        }
        decision = _gauge(
            "kubetrain_experiment_decision",
            "1 for the experiment's current decision, 0 for the others.",
            "decision",
        )
        for (namespace, name), status in sorted(statuses.items()):
            key = [namespace, name]
            for variant in status.variants:
                if variant.weight is not None:
                    weight.add_metric([*key, variant.name], variant.weight)
                ready.add_metric([*key, variant.name], 1 if variant.ready else 0)
                scores = variant.drift
                for measure, score in (
                    ("unigram_jsd", scores.unigram_jsd if scores else None),
                    ("length_psi", scores.length_psi if scores else None),
                ):
                    if score is not None:
                        drift.add_metric([*key, variant.name, measure], score)
            for cause, at in sorted(changes.get((namespace, name), {}).items()):
                changed.add_metric([*key, cause], at)
            experiment = status.experiment
            if experiment is None:
                continue
            for result in experiment.variants:
                interval = result.interval
                values = {
                    "samples": result.samples,
                    "successes": result.successes,
                    "rate": result.rate,
                    "rate_lower": interval.lower if interval else None,
                    "rate_upper": interval.upper if interval else None,
                }
                for field, value in values.items():
                    if value is not None:
                        per_variant[field].add_metric([*key, result.name], value)
            between = experiment.difference_interval
            values = {
                "p_value": experiment.p_value,
                "difference": experiment.difference,
                "difference_lower": between.lower if between else None,
                "difference_upper": between.upper if between else None,
                "looks": experiment.looks,
            }
            for field, value in values.items():
                if value is not None:
                    per_service[field].add_metric(key, value)
            if experiment.decision is not None:
                for option in DECISIONS:
                    decision.add_metric([*key, option], 1 if option == experiment.decision else 0)
        yield weight
        yield ready
        yield drift
        yield changed
        yield from _evaluation_gauges(statuses)
        yield from per_variant.values()
        yield from per_service.values()
        yield decision


def _evaluation_gauges(
    statuses: dict[tuple[str, str], ModelServiceStatus],
) -> Iterator[GaugeMetricFamily]:
    """Continuous evaluation: each variant's latest value per metric (its model version a
    label: bounded, the versions a variant served among status.evaluation's 20 results),
    and which variants regressed."""
    value = _gauge(
        "kubetrain_modelservice_evaluation_metric",
        "A variant's latest continuous-evaluation value of a metric.",
        "variant",
        "model_version",
        "metric",
    )
    regressed = _gauge(
        "kubetrain_modelservice_evaluation_regressed",
        "1 when the variant's latest evaluation is a regression from its baseline.",
        "variant",
    )
    for (namespace, name), status in sorted(statuses.items()):
        evaluation = status.evaluation
        if evaluation is None:
            continue
        latest: dict[tuple[str, str], tuple[str, float]] = {}
        for result in evaluation.results:  # oldest first: the newest wins
            for metric, number in result.metrics.items():
                latest[result.variant, metric] = (result.model_version or "", number)
        for (variant, metric), (version, number) in sorted(latest.items()):
            value.add_metric([namespace, name, variant, version, metric], number)
        for shown in status.variants:
            flag = 1 if shown.name in evaluation.regressed else 0
            regressed.add_metric([namespace, name, shown.name], flag)
    yield value
    yield regressed


SERVICES = ServiceIndex()
REGISTRY.register(SERVICES)
