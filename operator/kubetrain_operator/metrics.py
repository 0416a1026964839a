"""Operator metrics (`kubetrain_operator_*`), in a registry of their own.

Runs (and the GPUs they request) by phase are computed at scrape time from an index the
reconciler keeps, and a run leaves the index when it is deleted, so deleted runs leave no
series behind. Labels are
bounded: phase, verb, resource kind, HTTP status code, outcome.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

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
