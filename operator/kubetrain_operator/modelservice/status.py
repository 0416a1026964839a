"""One pure computation of a ModelService's status: what the reconciler observed (the
variants' models, their Deployments, the router, the router's counts) in, the new status,
the traffic split the router must apply and the events out. No I/O.

The experiment (spec.experiment) is looked at on every pass that has the router's counts:
`experiments.stats.decide` on the counts since the experiment began. Its first decision is
kept (the always-valid test's guarantee holds for a decision taken once, not one re-taken
at every look): status.experiment stops changing, and the split follows the decision as
spec.experiment.onDecision allows:

- promote: the winner gets all the traffic (the treatment on a win; the control on a loss
  or a broken guardrail);
- rollback: only a loss or a broken guardrail moves traffic (to the control);
- none: nothing moves; the decision is reported.

A decision holds until spec.experiment names another control or treatment, which starts a
new experiment from the spec's weights. Every change of the split is kept in
status.history (the newest MAX_HISTORY).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import ValidationError

from kubetrain_api import modelservice as ms
from kubetrain_api.reports import clip, wire
from kubetrain_api.routing import TOTAL_WEIGHT, RouterStats
from kubetrain_api.v1alpha1 import MAX_MESSAGE, MAX_SHORT
from kubetrain_api.validation import FieldError
from kubetrain_operator.conditions import set_condition
from kubetrain_operator.experiments import stats as experiment_stats
from kubetrain_operator.modelservice import drift as service_drift
from kubetrain_operator.modelservice.sources import Resolution
from kubetrain_operator.status import EVENT_MESSAGE_LIMIT, Event

READY, ROUTER_READY, VARIANTS_READY = "Ready", "RouterReady", "VariantsReady"
PROMOTED, ROLLED_BACK = "Promoted", "RolledBack"
DECIDED: tuple[ms.Decision, ...] = ("Promote", "Rollback")
REGRESSION_BREACH = "continuous evaluation regressed"
"""How status.experiment.guardrailBreach begins when continuous evaluation rolled back."""
Cause = Literal["Spec", "Promote", "Rollback", "Guardrail", "Regression"]


@dataclass(frozen=True, kw_only=True)
class ObservedService:
    """Everything one reconcile of a ModelService saw."""

    service: ms.ModelService | None
    """The parsed spec; None when it is invalid."""
    generation: int
    now: datetime
    previous: Mapping[str, Any] = field(default_factory=dict)
    invalid: list[FieldError] = field(default_factory=list)
    resolutions: dict[str, Resolution] = field(default_factory=dict)
    """Per variant: its model, or why there is none."""
    deployments: dict[str, Mapping[str, Any] | None] = field(default_factory=dict)
    """Per variant: its engine Deployment as stored (None: not there yet)."""
    router: Mapping[str, Any] | None = None
    """The router's Deployment as stored."""
    stats: RouterStats | None = None
    """The router's counts since the experiment began (or, without one running, over the
    drift window); None when not read or unreadable."""
    stats_problem: str | None = None
    """Why the counts could not be read, when they were asked for."""
    endpoint: str | None = None
    regressed_treatment: str | None = None
    """Why the experiment's treatment counts as regressed by continuous evaluation, when
    spec.evaluation.regression.onRegression is `rollback` (the previous look's results)."""
    """In-cluster base URL of the service's OpenAI API."""


@dataclass(frozen=True)
class ServiceDecision:
    status: dict[str, Any]
    weights: dict[str, int] | None
    """The split the router must apply; None: build nothing (invalid, or a variant's model
    is not known yet)."""
    events: list[Event] = field(default_factory=list)
    looking: bool = False
    """Whether the experiment waits for more counts (the reconciler looks again soon)."""


def _previous(previous: Mapping[str, Any]) -> ms.ModelServiceStatus:
    try:
        return ms.ModelServiceStatus.model_validate(dict(previous))
    # Written by another version and unreadable: recomputed from scratch (the history and
    # a running experiment start over; the spec and the children are untouched).
    except ValidationError:
        return ms.ModelServiceStatus()


def _ready_replicas(deployment: Mapping[str, Any] | None) -> tuple[int, int]:
    if deployment is None:
        return 0, 0
    spec, status = deployment.get("spec") or {}, deployment.get("status") or {}
    return int(spec.get("replicas") or 0), int(status.get("readyReplicas") or 0)


def _model_uri(resolution: Resolution) -> str | None:
    source = resolution.source
    if source is None:
        return None
    if source.claim is not None:
        return f"pvc://{source.claim}/{source.sub_path}".rstrip("/")
    return source.url


def _variant_stats(
    name: str, stats: RouterStats, metric: ms.PrimaryMetric
) -> experiment_stats.VariantStats:
    counts = stats.variants.get(name)
    if counts is None:
        return experiment_stats.VariantStats(name=name, n=0, successes=0)
    if metric == "positiveFeedbackRate":
        n, successes = counts.n, counts.successes
    elif metric == "errorRate":
        n, successes = counts.requests, counts.errors
    else:
        n, successes = counts.requests, counts.slow
    return experiment_stats.VariantStats(
        name=name,
        n=n,
        successes=successes,
        requests=counts.requests,
        errors=counts.errors,
        latency_p95_s=counts.latency_p95_s,
    )


def experiment_config(spec: ms.ExperimentSpec) -> experiment_stats.ExperimentConfig:
    """The statistics' configuration of spec.experiment."""
    rails = spec.guardrails
    return experiment_stats.ExperimentConfig(
        alpha=spec.alpha,
        min_samples=spec.min_samples_per_variant,
        mde=spec.minimum_detectable_effect,
        higher_is_better=spec.primary_metric == "positiveFeedbackRate",
        guardrails=experiment_stats.GuardrailConfig(
            max_error_rate=rails.max_error_rate,
            max_latency_increase=rails.max_latency_increase,
            min_requests=rails.min_requests,
            confidence=rails.confidence,
        ),
    )


def _applies(action: str, on_decision: ms.DecisionAction) -> bool:
    return on_decision == "promote" or (on_decision == "rollback" and action == "rollback")


class _Computation:
    def __init__(self, observed: ObservedService):
        self.o = observed
        self.events: list[Event] = []

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.events.append(Event(type_, reason, clip(message, EVENT_MESSAGE_LIMIT)))

    def experiment(
        self, spec: ms.ExperimentSpec, old: ms.ExperimentStatus | None, resolved: bool
    ) -> ms.ExperimentStatus:
        """The experiment's status after this look (a kept decision is returned as is)."""
        now, o = self.o.now, self.o
        same = old is not None and (old.control, old.treatment) == (spec.control, spec.treatment)
        if same and old is not None and old.decision in DECIDED:
            return old
        base = ms.ExperimentStatus(
            control=spec.control,
            treatment=spec.treatment,
            decision="Collecting",
            start_time=old.start_time if same and old is not None else None,
            looks=old.looks if same and old is not None else 0,
        )
        if not resolved:
            return base.model_copy(update={"reason": "waiting for every variant's model"})
        if base.start_time is None:
            return base.model_copy(
                update={"start_time": now, "reason": "started: collecting samples"}
            )
        if o.regressed_treatment:
            # Continuous evaluation found the treatment worse than its baseline, and
            # spec.evaluation.regression.onRegression says to roll back: at once, as a
            # broken guardrail.
            breach = f"{REGRESSION_BREACH}: {o.regressed_treatment}"
            applied = _applies("rollback", spec.on_decision)
            self.event("Warning", ROLLED_BACK, f"{spec.treatment}: {breach}")
            return base.model_copy(
                update={
                    "decision": "Rollback",
                    "winner": spec.control,
                    "reason": clip(breach, MAX_MESSAGE),
                    "guardrail_breach": clip(breach, 1024),
                    "decision_time": now,
                    "applied": applied,
                    "last_look_time": now,
                }
            )
        if o.stats is None:
            kept = old if same and old is not None else base
            why = o.stats_problem or "the router's counts are not available yet"
            return kept.model_copy(update={"reason": clip(f"no new look: {why}", MAX_MESSAGE)})
        config = experiment_config(spec)
        control = _variant_stats(spec.control, o.stats, spec.primary_metric)
        treatment = _variant_stats(spec.treatment, o.stats, spec.primary_metric)
        found = experiment_stats.decide(control, treatment, config)
        raw = {control.name: control, treatment.name: treatment}
        results = [
            ms.VariantResult(
                name=v.name,
                samples=v.n,
                successes=v.successes,
                rate=v.rate,
                interval=ms.Interval(lower=v.interval[0], upper=v.interval[1]),
                requests=raw[v.name].requests,
                errors=raw[v.name].errors,
                latency_p95_seconds=raw[v.name].latency_p95_s,
            )
            for v in found.variants
        ]
        enough = min(control.n, treatment.n) >= config.min_samples
        decision: ms.Decision = (
            "Promote"
            if found.action == "promote"
            else "Rollback"
            if found.action == "rollback"
            else "Undecided"
            if enough
            else "Collecting"
        )
        status = base.model_copy(
            update={
                "variants": results,
                "difference": max(-1.0, min(1.0, found.difference)),
                "difference_interval": ms.Interval(
                    lower=found.interval[0], upper=found.interval[1]
                ),
                # Three significant digits: what `kubectl get ms -o wide` shows.
                "p_value": float(f"{min(1.0, max(0.0, found.p_value)):.3g}"),
                "decision": decision,
                "winner": found.winner,
                "reason": clip(found.reason, MAX_MESSAGE),
                "guardrail_breach": found.guardrail_breach,
                "last_look_time": now,
                "looks": (base.looks or 0) + 1,
            }
        )
        if found.action is None:
            return status
        applied = _applies(found.action, spec.on_decision)
        status = status.model_copy(update={"decision_time": now, "applied": applied})
        what = f"{found.winner} gets all traffic" if applied else "traffic left as it is"
        why = f"(onDecision {spec.on_decision})" if not applied else ""
        message = f"{found.reason}; {what} {why}".strip()
        if not applied:
            self.event("Normal", "ExperimentDecided", message)
        elif found.action == "promote":
            self.event("Normal", PROMOTED, message)
        else:
            self.event("Warning", ROLLED_BACK, message)
        return status

    def compute(self) -> ServiceDecision:
        o = self.o
        old = _previous(o.previous)
        status = old.model_copy(update={"observed_generation": o.generation})
        conditions: list[dict[str, Any]] = [wire(c) for c in old.conditions]

        def condition(type_: str, ok: bool, reason: str, message: str) -> None:
            nonlocal conditions
            conditions = set_condition(
                conditions, type_, "True" if ok else "False", reason, message, o.generation, o.now
            )

        service = o.service
        if service is None:
            text = "; ".join(f"{e.path}: {e.message}" for e in o.invalid) or "invalid spec"
            condition(READY, False, "InvalidSpec", text)
            status.conditions = []
            out = wire(status) | {"conditions": conditions}
            return ServiceDecision(out, None, self.events)

        spec = service.spec
        variants: list[ms.VariantStatus] = []
        resolved = True
        problems: list[str] = []
        for v in spec.variants:
            resolution = o.resolutions.get(v.name, Resolution(waiting="not resolved yet"))
            wanted, ready = _ready_replicas(o.deployments.get(v.name))
            resolved = resolved and resolution.source is not None
            if resolution.message:
                problems.append(f"{v.name}: {resolution.message}")
            variants.append(
                ms.VariantStatus(
                    name=v.name,
                    model_uri=_model_uri(resolution),
                    model_version=resolution.source.version if resolution.source else None,
                    ready=resolution.source is not None and ready > 0,
                    replicas=wanted,
                    ready_replicas=ready,
                    message=clip(resolution.message, MAX_SHORT) if resolution.message else None,
                )
            )

        experiment = None
        if spec.experiment is not None:
            experiment = self.experiment(spec.experiment, old.experiment, resolved)
        weights, cause, why = self.split(spec, experiment)

        history = list(old.history)
        last = {w.name: w.weight for w in history[-1].weights} if history else None
        if resolved and weights != last:
            history.append(
                ms.TrafficChange(
                    time=o.now,
                    weights=[ms.VariantWeight(name=k, weight=w) for k, w in weights.items()],
                    cause=cause,
                    reason=clip(why, 1024),
                )
            )
            if last is not None:
                self.event("Normal", "TrafficShifted", f"{ms.traffic_summary(weights)}: {why}")
        for shown in variants:
            shown.weight = weights.get(shown.name) if resolved else None
            if not shown.ready and shown.message is None and resolved:
                shown.message = "no ready replica yet"

        ready_count = sum(1 for v in variants if v.ready)
        all_ready = ready_count == len(variants)
        condition(
            VARIANTS_READY,
            all_ready,
            "AllReady" if all_ready else ("ModelUnavailable" if problems else "NotReady"),
            "; ".join(problems) or f"{ready_count}/{len(variants)} variants ready",
        )
        wanted, ready = _ready_replicas(o.router)
        condition(
            ROUTER_READY,
            ready > 0,
            "Available" if ready > 0 else "NotReady",
            f"{ready}/{spec.router.replicas} router replicas ready",
        )
        condition(
            READY,
            all_ready and ready > 0,
            "Serving" if all_ready and ready > 0 else "NotReady",
            f"serving {ms.traffic_summary(weights)}" if resolved else "waiting for variants",
        )
        # Prompt drift (modelservice/drift.py): per variant from the router, one condition.
        old_drift = {v.name: v.drift for v in old.variants}
        for shown in variants:
            shown.drift = service_drift.variant_drift(
                o.stats, o.stats_problem, shown.name, old_drift.get(shown.name)
            )
        present = any(c.get("type") == service_drift.DRIFTED for c in conditions)
        drifted = service_drift.drifted_condition(variants, present)
        if drifted is not None:
            condition(service_drift.DRIFTED, *drifted)
        if experiment is not None:
            applied = bool(experiment.applied)
            promoted = applied and experiment.decision == "Promote"
            rolled_back = applied and experiment.decision == "Rollback"
            reason = experiment.reason or ""
            condition(PROMOTED, promoted, "TreatmentWon" if promoted else "NotPromoted", reason)
            rolled = "GuardrailBreached" if experiment.guardrail_breach else "ControlWon"
            condition(ROLLED_BACK, rolled_back, rolled if rolled_back else "NotRolledBack", reason)

        status.variants = variants
        status.variants_ready = f"{ready_count}/{len(variants)}"
        status.traffic = ms.traffic_summary(weights) if resolved else None
        status.router = ms.RouterStatus(
            service=ms.router_name(service.metadata.name or ""),
            url=o.endpoint,
            replicas=spec.router.replicas,
            ready_replicas=ready,
        )
        status.experiment = experiment
        status.history = history[-ms.MAX_HISTORY :]
        status.conditions = []
        out = wire(status) | {"conditions": conditions}
        looking = experiment is not None and experiment.decision not in DECIDED
        return ServiceDecision(out, weights if resolved else None, self.events, looking)

    def split(
        self, spec: ms.ModelServiceSpec, experiment: ms.ExperimentStatus | None
    ) -> tuple[dict[str, int], Cause, str]:
        """The split to apply now, the cause of a change to it, and why."""
        asked = ms.weights(spec)
        if experiment is None or not experiment.applied or experiment.decision not in DECIDED:
            return asked, "Spec", "the spec's weights"
        winner = experiment.winner or ""
        split = {name: TOTAL_WEIGHT if name == winner else 0 for name in asked}
        cause: Cause = "Promote" if experiment.decision == "Promote" else "Rollback"
        if experiment.guardrail_breach:
            regressed = experiment.guardrail_breach.startswith(REGRESSION_BREACH)
            cause = "Regression" if regressed else "Guardrail"
        return split, cause, experiment.reason or experiment.decision


def compute_service_status(observed: ObservedService) -> ServiceDecision:
    """The new status, the split and the events of one reconcile."""
    return _Computation(observed).compute()
