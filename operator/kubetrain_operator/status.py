"""The one status computation of a TrainingRun: an observation in, the new status and one
action out.

Pure (no I/O, no clock: `Observed.now`), so every rule is a table-driven test, and the
reconciler can compare the result with the live `.status` to skip a no-op patch: applied to
its own output with the same observation, `compute_status` returns the same status and no
events.

Contract with the reconciler
----------------------------
`Observed.attempt` is `status.attempts` as read (0: no cluster requested yet) and
`Observed.pods` are the live pods of the run (pods labelled with another attempt are
ignored). Only this module changes `status.attempts`; the reconciler creates the attempt
the returned status names. It applies a Decision in this order: patch the status (when it
differs), post the events, then act. Every action is idempotent and may come again:

- `none`: nothing to do.
- `create_cluster`: create-or-adopt the pods of attempt `status.attempts` (`<run>-a<N>-*`).
  Returned by the first reconcile (attempts 0 -> 1), by a resume (same attempt number, once
  its old pods are gone), and again on every pass until all the attempt's pods are seen
  (ClusterReady reason Creating/Retrying/Resuming), so a crash between the status patch and
  the pod creation is harmless and a not-yet-created pod is never taken for a lost one.
  When the API server refuses one of the children (quota, admission, an invalid field),
  the reconciler releases the attempt's pods and passes the refusal back in
  `Observed.create_error`: a permanent one (400/422) fails the run (`CreateRejected`),
  any other sets ClusterReady `QuotaExceeded`/`CreateFailed` and `status.nextCreateTime`
  (exponential backoff, create_errors.py), before which `create_cluster` becomes `none`.
- `retry`: like `create_cluster` for attempt `status.attempts` (already incremented here);
  the previous attempt failed or was preempted, and its pods must be deleted. The reconciler
  deletes pods of any attempt other than `status.attempts` on every pass anyway.
  After a counted failure the new attempt backs off (retry.py): `status.nextAttemptTime`
  says until when, `Decision.wait` how many seconds are left; while it is above 0 the
  reconciler creates no pods and looks at the run again after that long.
- `delete_pods`: delete every pod of the current attempt (suspend, deadline, invalid spec);
  returned while such a pod has no deletionTimestamp.
- `finish`: the run is terminal: delete the worker pods, keep the head pod for its logs.
  Returned on the transition; afterwards only while worker pods are left to delete.

Serving is a second, independent decision (`Decision.serve`), taken for Succeeded runs only
and carried out after the action above:

- `apply`: create-or-adopt (and update, by input hash) the serving objects of serving.py;
  returned on every pass while the run should be served (spec.serve.enabled, the gate
  passed or the spec has none, storage on a PVC), since they may have been deleted.
- `remove`: delete the serving objects; returned while `Observed.serving` (the Deployment,
  deleted last) exists but the run should not be served (serving turned off).
- `none`: nothing to serve and nothing left.

The result of training comes from the driver's termination message (a
`kubetrain_api.reports.RunResult` written by `kubetrain run --termination-log`): on the
driver's exit 0 it sets `status.model` and the final `status.evaluation`. Text that is not
that JSON is ignored, never copied.

The pieces this decision stands on live next to it, each pure: `conditions` (condition
list and text rules), `outcome` (the attempt's pods -> an Outcome), `results` (the head's
ProgressReport and the driver's RunResult -> status fields, parsed leniently).

Precedence within one pass: a terminal phase (never left; only observedGeneration and, for
Succeeded runs, status.serving and the Serving condition move) >
invalid spec > the driver exited 0 > deadline > suspend > resume > first start > what the
attempt's pods say. `deadline_exceeded` is the reconciler's call (timing.deadline_exceeded:
active time only, never while suspended).

Counting: retryable failures = attempts - 1 - evictions; a run that always fails
retryably ends Failed after exactly backoffLimit + 1 attempts. Which failures are
retryable, and which count as evictions, is outcome.classify's default as changed by
spec.runPolicy.failureRules (retry.apply_rules). A resume re-creates the same
attempt number (its pods are gone by then), so it counts as neither a failure nor an
eviction.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, get_args

from kubetrain_api import placement
from kubetrain_api import v1alpha1 as api
from kubetrain_api.reports import ProgressReport, count, parse_time, wire
from kubetrain_api.validation import IMMUTABLE, FieldError
from kubetrain_operator import retry, serving
from kubetrain_operator.conditions import (
    as_reason,
    clip,
    find_condition,
    rfc3339,
    set_condition,
)
from kubetrain_operator.create_errors import CreateError, backoff_seconds
from kubetrain_operator.names import ChildNames
from kubetrain_operator.outcome import (
    Outcome,
    classify,
    head_of,
    live,
    missing,
    pod_attempt,
    termination_message,
    workers_of,
)
from kubetrain_operator.results import copy_progress, evaluated, parse_progress, parse_result
from kubetrain_operator.timing import suspended_seconds

__all__ = [
    "PHASES",
    "Decision",
    "Event",
    "Observed",
    "Outcome",
    "classify",
    "compute_status",
    "is_terminal",
    "parse_result",
    "rfc3339",
    "set_condition",
]

PHASES: tuple[str, ...] = get_args(api.Phase)

# Kubernetes caps an event's note at 1 KiB; conditions take up to MAX_MESSAGE.
EVENT_MESSAGE_LIMIT = 1024
# ClusterReady reasons while the current attempt's pods are being created: missing pods are
# then not yet created rather than lost.
# Refused creates (create_errors.py) leave the attempt in the same state.
CREATING_REASONS = frozenset({"Creating", "Retrying", "Resuming", "QuotaExceeded", "CreateFailed"})
# Failed reasons whose clean-up removes the head pod too.
DELETE_ALL_REASONS = frozenset({"DeadlineExceeded", "InvalidSpec", "CreateRejected"})

Action = Literal["none", "create_cluster", "retry", "delete_pods", "finish"]
ServeAction = Literal["none", "apply", "remove"]


@dataclass(frozen=True, kw_only=True)
class Observed:
    """Everything one reconcile saw, gathered by the reconciler."""

    run: api.TrainingRun | None
    generation: int
    now: datetime
    invalid: list[FieldError] = field(default_factory=list)
    attempt: int = 0
    pods: list[dict[str, Any]] = field(default_factory=list)
    progress: ProgressReport | Mapping[str, Any] | None = None
    """The head's /progress (a mapping is parsed leniently); None: unreachable."""
    previous: dict[str, Any] = field(default_factory=dict)
    suspended: bool = False
    deadline_exceeded: bool = False
    serving: dict[str, Any] | None = None
    """The live serving Deployment `<run>-serve` (read once the run has Succeeded)."""
    create_error: CreateError | None = None
    """The API server refused a child of the attempt this status asks for (create_errors)."""
    refused_changes: list[FieldError] = field(default_factory=list)
    """Fields of the spec changed while the run is active that it may not take (immutable,
    or invalid): the run goes on with its stored spec (stored_spec.py), and says so
    (SpecChangeRefused)."""


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Decision:
    status: dict[str, Any]
    action: Action
    events: list[Event] = field(default_factory=list)
    serve: ServeAction = "none"
    wait: float = 0.0
    """Seconds the next attempt still backs off: no pods before then (see above)."""


def is_terminal(status: Mapping[str, Any]) -> bool:
    return status.get("phase") in api.TERMINAL_PHASES


# --------------------------------------------------------------------------------------
# the driver's result (its termination message) -> status.model, status.evaluation
# --------------------------------------------------------------------------------------


def _record_result(draft: _Draft, head: Mapping[str, Any] | None) -> None:
    """The exported model and the final evaluation, as the driver reported them on exit."""
    result = parse_result(termination_message(head))
    if "model" in result:
        draft.status["model"] = result["model"]
    if "evaluation" in result:
        draft.status["evaluation"] = result["evaluation"]
        draft.condition("Evaluated", "True", *evaluated(result["evaluation"]))


# --------------------------------------------------------------------------------------
# serving (Succeeded runs) -> status.serving, the Serving condition, Decision.serve
# --------------------------------------------------------------------------------------

# Serving reasons without an event: steps on the way, or what the user asked for.
_SERVING_QUIET = frozenset({"Progressing", "Disabled", "ScaledToZero"})


def _serving_blocked(run: api.TrainingRun, status: Mapping[str, Any]) -> tuple[str, str] | None:
    """(reason, message) when the run's model is not to be served, else None."""
    if not run.spec.serve.enabled:
        return "Disabled", "spec.serve.enabled is false"
    gate = (status.get("evaluation") or {}).get("gate") or {}
    if gate.get("passed") is False:
        failures = "; ".join(gate.get("failures") or []) or "no details reported"
        return "GateFailed", f"the model failed its evaluation gate: {failures}"
    if run.spec.evaluation.gate and gate.get("passed") is not True:
        return "GateUnknown", "the run reported no verdict on spec.evaluation.gate"
    if not serving.servable(run):
        return (
            "StorageNotServable",
            "the model server reads the model from a PersistentVolumeClaim or an object "
            "store (s3://, gs://); spec.checkpoint.storage.uri names a path only the "
            "training pods could see",
        )
    return None


def _rollout(deployment: Mapping[str, Any] | None, url: str) -> tuple[str, str, str]:
    """(status, reason, message) of the Serving condition, from the live Deployment."""
    if deployment is None:
        return "False", "Progressing", "creating the serving Deployment"
    spec, state = deployment.get("spec") or {}, deployment.get("status") or {}
    desired = count(spec.get("replicas"))
    desired = 1 if desired is None else desired  # the API server's default
    available = count(state.get("availableReplicas")) or 0
    if available >= 1:
        return "True", "Available", f"{available} of {desired} replicas available at {url}"
    if desired == 0:
        return "False", "ScaledToZero", "the serving Deployment has 0 replicas"
    progressing = find_condition(state.get("conditions") or [], "Progressing")
    if progressing.get("status") == "False":  # e.g. ProgressDeadlineExceeded
        reason = as_reason(progressing.get("reason"), "ProgressDeadlineExceeded")
        return "False", reason, str(progressing.get("message") or "the rollout is stuck")
    message = f"0 of {desired} replicas available: pods starting or loading the model"
    return "False", "Progressing", message


def _set_serving(draft: _Draft, status: str, reason: str, message: str) -> None:
    before = find_condition(draft.previous.get("conditions") or [], "Serving")
    draft.condition("Serving", status, reason, message)
    changed = (before.get("status"), before.get("reason")) != (status, reason)
    if changed and reason not in _SERVING_QUIET:
        draft.emit("Normal" if status == "True" else "Warning", f"Serving{reason}", message)


def _serve(draft: _Draft) -> ServeAction:
    """status.serving and the Serving condition of a Succeeded run, and what to do."""
    run = draft.observed.run
    if run is None or draft.status.get("phase") != "Succeeded":
        return "none"  # a spec made invalid after the run changes nothing served
    blocked = _serving_blocked(run, draft.status)
    if blocked is not None:
        draft.status.pop("serving", None)
        # Absent for runs that never asked for serving; Disabled once it is turned off.
        if blocked[0] != "Disabled" or draft.has_condition("Serving"):
            _set_serving(draft, "False", *blocked)
        return "remove" if draft.observed.serving is not None else "none"
    name = run.metadata.name or ""
    url = serving.service_url(name, run.metadata.namespace or "default")
    version = (draft.status.get("model") or {}).get("version")
    endpoint = api.ServingStatus(service=ChildNames(name).serve, url=url, model_version=version)
    draft.status["serving"] = wire(endpoint)
    _set_serving(draft, *_rollout(draft.observed.serving, url))
    return "apply"


# --------------------------------------------------------------------------------------
# Observed -> Decision
# --------------------------------------------------------------------------------------


class _Draft:
    """The status being computed from the previous one, and the events of this pass."""

    def __init__(self, observed: Observed):
        self.observed = observed
        self.previous: Mapping[str, Any] = observed.previous or {}
        self.status: dict[str, Any] = copy.deepcopy(dict(self.previous))
        self.status["observedGeneration"] = observed.generation
        self.events: list[Event] = []
        self.attempt = max(observed.attempt, count(self.previous.get("attempts")) or 0)
        # Pods of older attempts are the reconciler's garbage, not this attempt's state.
        self.pods = [p for p in observed.pods if pod_attempt(p) in (None, self.attempt)]
        self.report = parse_progress(observed.progress)

    @property
    def previous_phase(self) -> str | None:
        return self.previous.get("phase")

    @property
    def evictions(self) -> int:
        return count(self.status.get("evictions")) or 0

    def condition(self, type: str, status: str, reason: str, message: str = "") -> None:
        self.status["conditions"] = set_condition(
            self.status.get("conditions") or [],
            type,
            status,
            reason,
            message,
            self.observed.generation,
            self.observed.now,
        )

    def has_condition(self, type: str) -> bool:
        return bool(find_condition(self.status.get("conditions") or [], type))

    def emit(self, type: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.events.append(Event(type, reason, clip(message, EVENT_MESSAGE_LIMIT)))

    def enter(
        self, phase: str, event_type: Literal["Normal", "Warning"], reason: str, message: str
    ) -> None:
        """Set the phase; an event marks the transition only (never on a converged run)."""
        if self.previous_phase != phase:
            self.emit(event_type, reason, message)
        self.status["phase"] = phase

    def decide(self, action: Action, serve: ServeAction = "none", wait: float = 0.0) -> Decision:
        return Decision(self.status, action, self.events, serve, wait)

    def seconds_until(self, field: str) -> float:
        """Seconds until the time in status[field] (a backoff: nextAttemptTime after a
        failed attempt, nextCreateTime after a refused create), 0 when passed or unset."""
        until = parse_time(self.status.get(field))
        if until is None:
            return 0.0
        now = self.observed.now
        now = now if now.tzinfo else now.replace(tzinfo=timezone.utc)
        return max(0.0, (until - now).total_seconds())


def _cleanup(phase: str, reason: str, pods: list[dict[str, Any]]) -> Action:
    """What a terminal run still needs done to the current attempt's pods."""
    if phase == "Failed" and reason in DELETE_ALL_REASONS:
        return "delete_pods" if live(pods) else "none"
    return "finish" if live(pods, workers_only=True) else "none"


def _terminal(draft: _Draft) -> Decision:
    """Succeeded and Failed are never left: only observedGeneration follows the spec, and
    serving follows spec.serve and the serving Deployment."""
    failed = find_condition(draft.status.get("conditions") or [], "Failed")
    cleanup = _cleanup(draft.status["phase"], failed.get("reason", ""), draft.pods)
    return draft.decide(cleanup, _serve(draft))


def _close(draft: _Draft, phase: str, reason: str, message: str) -> None:
    _clear_refusals(draft)
    draft.status.pop("nextAttemptTime", None)
    draft.status["completionTime"] = draft.status.get("completionTime") or rfc3339(
        draft.observed.now
    )
    for type in ("ClusterReady", "Training"):
        if draft.has_condition(type):
            draft.condition(type, "False", reason, message)
    if phase == "Succeeded":
        draft.condition("Succeeded", "True", reason, message)
        draft.enter("Succeeded", "Normal", "Succeeded", message)
    else:
        draft.condition("Failed", "True", reason, message)
        draft.enter("Failed", "Warning", reason, message)


def _fail(draft: _Draft, reason: str, message: str, action: Action) -> Decision:
    _close(draft, "Failed", reason, message)
    return draft.decide(action)


def _invalid(draft: _Draft) -> Decision:
    errors = [str(e) for e in draft.observed.invalid] or ["spec: could not be parsed"]
    message = clip("; ".join(errors), api.MAX_MESSAGE)
    draft.status["attempts"] = draft.attempt
    draft.status.setdefault("evictions", 0)
    draft.condition("Validated", "False", "InvalidSpec", message)
    _close(draft, "Failed", "InvalidSpec", message)
    # Nothing was created for a run invalid from the start; a run made invalid while it
    # ran loses its pods.
    return draft.decide("delete_pods" if live(draft.pods) else "none")


def _suspend(draft: _Draft) -> Decision:
    draft.status.pop("nextAttemptTime", None)  # a resume starts at once
    message = "spec.runPolicy.suspend is true; resuming continues from the latest checkpoint"
    draft.condition("Suspended", "True", "Suspended", message)
    for type in ("ClusterReady", "Training"):
        if draft.has_condition(type):
            draft.condition(type, "False", "Suspended", message)
    draft.enter("Suspended", "Normal", "Suspended", f"attempt {draft.attempt} stopped: {message}")
    if draft.status.get("startTime"):  # the deadline's clock stops (timing.py)
        draft.status.setdefault("suspendTime", rfc3339(draft.observed.now))
    return draft.decide("delete_pods" if live(draft.pods) else "none")


def _create(draft: _Draft, attempt: int, reason: str, message: str) -> None:
    """Ask for the cluster of `attempt`; it counts as created once its pods are seen."""
    _clear_refusals(draft)
    draft.status["attempts"] = attempt
    draft.status.setdefault("startTime", rfc3339(draft.observed.now))
    draft.status["phase"] = "Provisioning"
    draft.condition("ClusterReady", "False", reason, message)
    draft.condition("Training", "False", "WaitingForCluster", "the Ray cluster is not ready")


def _resume(draft: _Draft) -> Decision:
    if draft.pods:
        # The attempt number is reused, so its old pods must be gone first.
        message = f"waiting for {len(draft.pods)} pods of attempt {draft.attempt} to terminate"
        draft.condition("Suspended", "True", "Resuming", message)
        return draft.decide("delete_pods" if live(draft.pods) else "none")
    attempt = max(draft.attempt, 1)
    message = f"resuming from the latest checkpoint as attempt {attempt}"
    if draft.status.get("suspendTime"):  # the deadline's clock runs again
        draft.status["suspendedSeconds"] = int(suspended_seconds(draft.status, draft.observed.now))
        del draft.status["suspendTime"]
    draft.condition("Suspended", "False", "Resumed", message)
    _create(draft, attempt, "Resuming", message)
    draft.emit("Normal", "Resumed", message)
    return draft.decide("create_cluster")


def _start(draft: _Draft, workers: int) -> Decision:
    message = f"creating Ray cluster attempt 1: a head and {workers} worker pods"
    _create(draft, 1, "Creating", message)
    draft.emit("Normal", "Provisioning", message)
    return draft.decide("create_cluster")


def _retry(draft: _Draft, outcome: Outcome, budget: str, backoff: int = 0) -> Decision:
    attempt = draft.attempt + 1
    # An Ignore rule spends the eviction budget on a driver's exit: that is no preemption.
    preempted = outcome.kind == "preempted" and outcome.exit_code is None
    what = "was preempted" if preempted else "failed"
    when = ""
    if backoff > 0:
        until = rfc3339(draft.observed.now + timedelta(seconds=backoff))
        draft.status["nextAttemptTime"] = until
        when = f" after a {backoff}s backoff, at {until}"
    message = (
        f"attempt {draft.attempt} {what}: {outcome.reason}: {outcome.message}; "
        f"retrying as attempt {attempt}{when} ({budget})"
    )
    _create(draft, attempt, "Retrying", message)
    draft.condition("Training", "False", "Retrying", message)
    draft.emit("Warning", outcome.reason, message)
    return draft.decide("retry", wait=float(backoff))


def _after_failure(draft: _Draft, outcome: Outcome, policy: api.RunPolicy) -> Decision:
    if outcome.kind == "failed_permanent":
        return _fail(draft, outcome.reason, f"{outcome.reason}: {outcome.message}", "finish")
    if outcome.kind == "preempted":
        used = draft.evictions
        if used < policy.eviction_limit:
            draft.status["evictions"] = used + 1
            budget = f"eviction {used + 1} of {policy.eviction_limit}"
            return _retry(draft, outcome, budget)
        message = (
            f"{outcome.reason}: {outcome.message}; evictionLimit {policy.eviction_limit} reached"
        )
        return _fail(draft, "EvictionLimitExceeded", message, "finish")
    failures = draft.attempt - draft.evictions  # this one included
    if failures <= policy.backoff_limit:
        budget = f"retry {failures} of {policy.backoff_limit}"
        return _retry(draft, outcome, budget, retry.backoff_seconds(policy, failures))
    message = (
        f"{outcome.reason}: {outcome.message}; backoffLimit {policy.backoff_limit} reached "
        f"after {draft.attempt} attempts"
    )
    return _fail(draft, "BackoffLimitExceeded", message, "finish")


def _clear_refusals(draft: _Draft) -> None:
    for key in ("createFailures", "nextCreateTime"):
        if key in draft.status:
            draft.status[key] = None  # a null, since a merge patch keeps what it leaves out


def _refused(draft: _Draft, error: CreateError) -> Decision:
    """The API server refused a child of this attempt (the reconciler has released the
    pods it had created). A permanent refusal fails the run; any other is tried again
    after a backoff, with the refusal in ClusterReady and one Warning per new refusal."""
    message = error.describe(draft.attempt)
    if error.permanent:  # the same spec would build the same invalid object
        return _fail(draft, error.reason, message, "delete_pods")
    failures = (count(draft.status.get("createFailures")) or 0) + 1
    wait = backoff_seconds(failures)
    draft.status["createFailures"] = failures
    draft.status["nextCreateTime"] = rfc3339(draft.observed.now + timedelta(seconds=wait))
    before = find_condition(draft.previous.get("conditions") or [], "ClusterReady")
    draft.condition(
        "ClusterReady", "False", error.reason, f"{message}; trying again in {wait:.0f}s"
    )
    if before.get("reason") != error.reason or message not in before.get("message", ""):
        draft.emit("Warning", error.reason, message)
    return draft.decide("delete_pods")


def _progress_phase(draft: _Draft) -> str:
    if draft.report is None:  # head unreachable: keep what we knew
        return draft.previous_phase if draft.previous_phase == "Evaluating" else "Running"
    return "Evaluating" if draft.report.phase == "Evaluating" else "Running"


def _observe(draft: _Draft, outcome: Outcome) -> Decision:
    _clear_refusals(draft)  # the attempt's pods all exist
    if outcome.kind == "pending":
        draft.condition("ClusterReady", "False", outcome.reason, outcome.message)
        draft.condition("Training", "False", "WaitingForCluster", "the Ray cluster is not ready")
        draft.enter("Provisioning", "Normal", "Provisioning", outcome.message)
        return draft.decide("none")
    phase = _progress_phase(draft)
    draft.condition("ClusterReady", "True", outcome.reason, outcome.message)
    draft.condition("Training", "True", phase, f"attempt {draft.attempt} is {phase.lower()}")
    draft.enter(phase, "Normal", phase, f"attempt {draft.attempt}: {outcome.message}")
    return draft.decide("none")


SPEC_CHANGE_REFUSED = "SpecChangeRefused"


def _refused_changes(draft: _Draft) -> None:
    """SpecChangeRefused: True while the spec holds edits the active run does not take (a
    Warning when they are new or others), False once reverted; absent stays absent."""
    refused = draft.observed.refused_changes
    before = find_condition(draft.previous.get("conditions") or [], SPEC_CHANGE_REFUSED)
    if not refused:
        if before.get("status") == "True":
            message = "the run takes every edit of its spec (reverted, or allowed now)"
            draft.condition(SPEC_CHANGE_REFUSED, "False", "Resolved", message)
        return
    immutable = all(e.message == IMMUTABLE for e in refused)
    message = (
        "; ".join(str(e) for e in refused)
        + "; the run goes on with the spec it started with (revert the edit, or make it once "
        "the run has finished; placement may change while the run is suspended)"
    )
    reason = "ImmutableFieldChanged" if immutable else "InvalidSpec"
    draft.condition(SPEC_CHANGE_REFUSED, "True", reason, message)
    after = find_condition(draft.status["conditions"], SPEC_CHANGE_REFUSED)
    if (before.get("status"), before.get("message")) != ("True", after.get("message")):
        draft.emit("Warning", SPEC_CHANGE_REFUSED, message)


def _validated(draft: _Draft, spec: api.TrainingRunSpec) -> None:
    """Validated=True; accepted-but-risky specs (placement.warnings: RWO storage for a GPU
    run) say so in its message, and once in a Warning event."""
    warnings = "; ".join(f"{path}: {message}" for path, message in placement.warnings(spec))
    before = find_condition(draft.previous.get("conditions") or [], "Validated")
    draft.condition("Validated", "True", "Valid", warnings)
    if warnings and before.get("message") != warnings:
        draft.emit("Warning", "ValidWithWarnings", warnings)


def compute_status(observed: Observed) -> Decision:
    """The new `.status`, the one action to take, and the events of this transition."""
    draft = _Draft(observed)
    if is_terminal(draft.previous):
        return _terminal(draft)
    if observed.run is None or observed.invalid:
        return _invalid(draft)
    spec = observed.run.spec
    _validated(draft, spec)
    _refused_changes(draft)
    draft.status["attempts"] = draft.attempt
    draft.status["evictions"] = draft.evictions
    copy_progress(draft.status, draft.report)
    if draft.status.get("evaluation"):
        draft.condition("Evaluated", "True", *evaluated(draft.status["evaluation"]))

    outcome = None
    started = draft.attempt >= 1 and draft.previous_phase != "Suspended"
    ready = find_condition(draft.previous.get("conditions") or [], "ClusterReady")
    head, workers = head_of(draft.pods), workers_of(draft.pods)
    creating = ready.get("reason") in CREATING_REASONS and missing(
        head, workers, spec.resources.workers
    )
    if started and not creating:
        outcome = classify(draft.pods, spec.resources.workers)
        outcome = retry.apply_rules(outcome, spec.run_policy.failure_rules)
        draft.status.pop("nextAttemptTime", None)  # the attempt has started

    # A finished driver beats a deadline or a suspend that came too late to matter.
    if outcome is not None and outcome.kind == "succeeded":
        _record_result(draft, head)
        _close(draft, "Succeeded", "Completed", f"training finished in attempt {draft.attempt}")
        return draft.decide("finish", _serve(draft))
    if observed.deadline_exceeded:
        limit = spec.run_policy.active_deadline_seconds
        message = f"spec.runPolicy.activeDeadlineSeconds ({limit}s) exceeded"
        return _fail(draft, "DeadlineExceeded", message, "delete_pods")
    if observed.suspended:
        return _suspend(draft)
    if draft.previous_phase == "Suspended":
        return _resume(draft)
    if observed.create_error is not None:
        return _refused(draft, observed.create_error)
    if draft.attempt == 0:
        return _start(draft, spec.resources.workers)
    if outcome is None:  # requested, not all pods seen yet: create-or-adopt again
        wait = draft.seconds_until("nextAttemptTime") or draft.seconds_until("nextCreateTime")
        return draft.decide("none", wait=wait) if wait else draft.decide("create_cluster")
    if outcome.kind in ("pending", "running"):
        return _observe(draft, outcome)
    return _after_failure(draft, outcome, spec.run_policy)
