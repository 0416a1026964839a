"""Operator metrics (`kubetrain_operator_*`), in a registry of their own.

Runs by phase are computed at scrape time from an index the reconciler keeps, and a run
leaves the index when it is deleted, so deleted runs leave no series behind. Labels are
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
    """Phase of every run this operator reconciles, keyed by uid."""

    def __init__(self) -> None:
        self._phases: dict[str, str] = {}
        self._lock = threading.Lock()

    def set(self, uid: str, phase: str) -> None:
        with self._lock:
            self._phases[uid] = phase

    def forget(self, uid: str) -> None:
        with self._lock:
            self._phases.pop(uid, None)

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(self._phases.values())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "kubetrain_operator_runs", "TrainingRuns by phase.", labels=["phase"]
        )
        counts = self.counts()
        for phase in PHASES:
            family.add_metric([phase], counts.get(phase, 0))
        yield family


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
