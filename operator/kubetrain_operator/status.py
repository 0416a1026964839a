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
- `retry`: like `create_cluster` for attempt `status.attempts` (already incremented here);
  the previous attempt failed or was preempted, and its pods must be deleted. The reconciler
  deletes pods of any attempt other than `status.attempts` on every pass anyway.
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

The result of training comes from the driver's termination message (JSON written by
`kubetrain run --termination-log`): on the driver's exit 0 it sets `status.model` and the
final `status.evaluation`. Text that is not that JSON is ignored, never copied.

Precedence within one pass: a terminal phase (never left; only observedGeneration and, for
Succeeded runs, status.serving and the Serving condition move) >
invalid spec > the driver exited 0 > deadline > suspend > resume > first start > what the
attempt's pods say. `deadline_exceeded` is the reconciler's call (e.g. not while suspended).

Counting: retryable failures = attempts - 1 - evictions; a run that always fails
retryably ends Failed after exactly backoffLimit + 1 attempts. A resume re-creates the same
attempt number (its pods are gone by then), so it counts as neither a failure nor an
eviction.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, get_args

from kubetrain_api import v1alpha1 as api
from kubetrain_api.contract import LABEL_ATTEMPT, LABEL_ROLE, ROLE_HEAD, ROLE_WORKER
from kubetrain_api.validation import FieldError
from kubetrain_operator import serving
from kubetrain_operator.builders import HEAD_CONTAINER
from kubetrain_operator.names import ChildNames

PHASES: tuple[str, ...] = get_args(api.Phase)

# Kubernetes caps an event's note at 1 KiB; conditions take up to MAX_MESSAGE.
EVENT_MESSAGE_LIMIT = 1024
MAX_SHORT = api.MAX_SHORT

# pod.status.reason values that mean the pod was taken away rather than the code failing.
DISRUPTION_REASONS = frozenset({"Evicted", "Preempted", "NodeLost", "Shutdown", "Terminated"})
# ClusterReady reasons while the current attempt's pods are being created: missing pods are
# then not yet created rather than lost.
CREATING_REASONS = frozenset({"Creating", "Retrying", "Resuming"})
# Failed reasons whose clean-up removes the head pod too.
DELETE_ALL_REASONS = frozenset({"DeadlineExceeded", "InvalidSpec"})

OutcomeKind = Literal[
    "pending", "running", "succeeded", "failed_permanent", "failed_retryable", "preempted"
]
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
    progress: dict[str, Any] | None = None
    previous: dict[str, Any] = field(default_factory=dict)
    suspended: bool = False
    deadline_exceeded: bool = False
    serving: dict[str, Any] | None = None
    """The live serving Deployment `<run>-serve` (read once the run has Succeeded)."""


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    reason: str
    message: str


@dataclass(frozen=True)
class Decision:
    status: dict[str, Any]
    action: Action
    events: list[Event] = field(default_factory=list)
    serve: ServeAction = "none"


def is_terminal(status: Mapping[str, Any]) -> bool:
    return status.get("phase") in api.TERMINAL_PHASES


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------


def rfc3339(moment: datetime) -> str:
    """metav1.Time: UTC, whole seconds, `Z` suffix (naive datetimes are taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, int | float):
            return datetime.fromtimestamp(value, timezone.utc)
        if isinstance(value, str):
            # fromisoformat learnt the `Z` suffix only in Python 3.11.
            return datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except (ValueError, OverflowError, OSError):
        return None
    return None


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reason(text: Any, fallback: str) -> str:
    """A Kubernetes condition reason (CamelCase, no spaces) from free text."""
    cleaned = re.sub(r"[^A-Za-z0-9_,:]", "", text if isinstance(text, str) else "")
    cleaned = cleaned.lstrip("0123456789_,:")[:1024].rstrip(",:")
    return cleaned or fallback


def set_condition(
    conditions: Iterable[Mapping[str, Any]],
    type: str,
    status: str,
    reason: str,
    message: str,
    generation: int,
    now: datetime,
) -> list[dict[str, Any]]:
    """A new list with condition `type` set; lastTransitionTime moves only when status flips."""
    new = {
        "type": type,
        "status": status,
        "reason": reason,
        "message": _clip(message, api.MAX_MESSAGE),
        "lastTransitionTime": rfc3339(now),
        "observedGeneration": generation,
    }
    if not new["message"]:
        # Left out rather than "": kube-apiserver 1.20 reads an empty string in a merge
        # patch of this list as null and refuses it (message is optional in the schema).
        del new["message"]
    result: list[dict[str, Any]] = []
    found = False
    for condition in conditions:
        if condition.get("type") != type:
            result.append(dict(condition))
            continue
        found = True
        if condition.get("status") == status and condition.get("lastTransitionTime"):
            new["lastTransitionTime"] = condition["lastTransitionTime"]
        result.append(new)
    if not found:
        result.append(new)
    return result


def _find_condition(conditions: Iterable[Mapping[str, Any]], type: str) -> Mapping[str, Any]:
    return next((c for c in conditions if c.get("type") == type), {})


# --------------------------------------------------------------------------------------
# pods -> Outcome
# --------------------------------------------------------------------------------------


def _meta(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    return pod.get("metadata") or {}


def _name(pod: Mapping[str, Any]) -> str:
    return str(_meta(pod).get("name", "?"))


def _role(pod: Mapping[str, Any]) -> str | None:
    return (_meta(pod).get("labels") or {}).get(LABEL_ROLE)


def _pod_status(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    return pod.get("status") or {}


def _phase(pod: Mapping[str, Any]) -> str:
    return str(_pod_status(pod).get("phase") or "Pending")


def _terminating(pod: Mapping[str, Any]) -> bool:
    return bool(_meta(pod).get("deletionTimestamp"))


def _pod_condition(pod: Mapping[str, Any], type: str) -> Mapping[str, Any]:
    return _find_condition(_pod_status(pod).get("conditions") or [], type)


def _containers(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(_pod_status(pod).get("containerStatuses") or [])


def _head_container(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    statuses = _containers(pod)
    named = [c for c in statuses if c.get("name") == HEAD_CONTAINER]
    return (named or statuses or [{}])[0]


def _terminated(container: Mapping[str, Any]) -> Mapping[str, Any] | None:
    return (container.get("state") or {}).get("terminated")


def _exit(term: Mapping[str, Any]) -> tuple[OutcomeKind, str, str]:
    """(kind, reason, detail) of a terminated driver container."""
    code, signal = term.get("exitCode"), term.get("signal")
    detail = f"exit code {code}" + (f" ({term['reason']})" if term.get("reason") else "")
    if term.get("reason") == "OOMKilled":
        return "failed_retryable", "OOMKilled", detail
    if isinstance(code, int) and 1 <= code <= 127:
        return "failed_permanent", f"ExitCode{code}", detail
    if isinstance(code, int) and code >= 128:
        return "failed_retryable", f"ExitCode{code}", detail
    if isinstance(signal, int) and signal > 0:
        return "failed_retryable", f"Signal{signal}", f"{detail}, signal {signal}"
    if code == 0:
        return "succeeded", "Completed", detail
    return "failed_retryable", "UnknownExitCode", detail


def _head_succeeded(head: Mapping[str, Any]) -> bool:
    if _phase(head) == "Succeeded":
        return True
    term = _terminated(_head_container(head))
    return term is not None and _exit(term)[0] == "succeeded"


def _disruption(pod: Mapping[str, Any]) -> Outcome | None:
    status = _pod_status(pod)
    if status.get("reason") in DISRUPTION_REASONS:
        message = str(status.get("message") or status["reason"])
        return Outcome("preempted", status["reason"], f"pod {_name(pod)}: {message}")
    target = _pod_condition(pod, "DisruptionTarget")
    if target.get("status") == "True":
        message = str(target.get("message") or "disrupted")
        reason = _reason(target.get("reason"), "DisruptionTarget")
        return Outcome("preempted", reason, f"pod {_name(pod)}: {message}")
    if _terminating(pod):
        return Outcome("preempted", "PodDeleted", f"pod {_name(pod)} is being deleted")
    return None


def _missing(head: Mapping[str, Any] | None, workers: list[Any], expected: int) -> list[str]:
    missing = [] if head is not None else ["head"]
    if len(workers) < expected:
        missing.append(f"{expected - len(workers)} of {expected} workers")
    return missing


_LATEST = datetime.max.replace(tzinfo=timezone.utc)


def _finished_at(term: Mapping[str, Any] | None) -> datetime:
    moment = _parse_time((term or {}).get("finishedAt"))
    if moment is None:
        return _LATEST
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _head_failure(head: Mapping[str, Any]) -> tuple[datetime, Outcome] | None:
    term = _terminated(_head_container(head))
    if term is not None:
        kind, reason, detail = _exit(term)
        return _finished_at(term), Outcome(kind, reason, f"driver in pod {_name(head)}: {detail}")
    if _phase(head) == "Failed":
        reason = _reason(_pod_status(head).get("reason"), "PodFailed")
        return _LATEST, Outcome("failed_retryable", reason, f"head pod {_name(head)} failed")
    return None


def _worker_failure(worker: Mapping[str, Any]) -> tuple[datetime, Outcome] | None:
    # A worker that stops for any reason, even exit 0, is a node Ray lost.
    term = next((t for c in _containers(worker) if (t := _terminated(c)) is not None), None)
    if term is None and _phase(worker) not in ("Failed", "Succeeded"):
        return None
    detail = _exit(term)[2] if term is not None else f"phase {_phase(worker)}"
    message = f"worker pod {_name(worker)} stopped ({detail}); Ray lost a node"
    # Over its memory limit is worth naming: the fix is more memory, not a retry.
    reason = (
        "OOMKilled" if term is not None and term.get("reason") == "OOMKilled" else "WorkerFailed"
    )
    return _finished_at(term), Outcome("failed_retryable", reason, message)


def _head_ready(head: Mapping[str, Any]) -> bool:
    if _phase(head) != "Running":
        return False
    ready = _pod_condition(head, "Ready")
    if ready:
        return ready.get("status") == "True"
    return "running" in (_head_container(head).get("state") or {})


_STARTING = (None, "ContainerCreating", "PodInitializing")


def _ready(pod: Mapping[str, Any]) -> bool:
    return _head_ready(pod) if _role(pod) == ROLE_HEAD else _phase(pod) == "Running"


def _blocked(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    """(reason, message) when the pod cannot start on its own: unschedulable, image pull or
    config errors. Pending without a reason is just slow."""
    scheduled = _pod_condition(pod, "PodScheduled")
    if scheduled.get("status") == "False":
        return _reason(scheduled.get("reason"), "Unschedulable"), str(scheduled.get("message", ""))
    for container in _containers(pod):
        waiting = (container.get("state") or {}).get("waiting")
        if waiting is not None and waiting.get("reason") not in _STARTING:
            return _reason(waiting["reason"], "ContainerWaiting"), str(waiting.get("message", ""))
    return None


def _pending(pods: list[Mapping[str, Any]]) -> Outcome:
    reason, details = "PodsPending", []
    for pod in pods:
        blocked = _blocked(pod)
        if blocked is not None:
            reason = blocked[0] if reason == "PodsPending" else reason
            details.append(f"{_name(pod)} ({': '.join(filter(None, blocked))})")
        elif not _ready(pod):
            details.append(f"{_name(pod)} ({_phase(pod)})")
    return Outcome("pending", reason, "waiting for pods: " + ", ".join(details))


def classify(pods: list[dict[str, Any]], expected_workers: int) -> Outcome:
    """What the pods of a STARTED attempt say. Precedence: the driver's exit 0 wins (workers
    die after the head); then disruption or missing pods (preempted, its own budget); then
    the earliest failure (a driver exit caused by a lost worker is retryable); then ready."""
    head = next((p for p in pods if _role(p) == ROLE_HEAD), None)
    workers = [p for p in pods if _role(p) == ROLE_WORKER]
    if head is not None and _head_succeeded(head):
        return Outcome("succeeded", "Completed", f"driver in pod {_name(head)} exited 0")
    for pod in ([head] if head is not None else []) + workers:
        disrupted = _disruption(pod)
        if disrupted is not None:
            return disrupted
    missing = _missing(head, workers, expected_workers)
    if missing:
        return Outcome("preempted", "PodMissing", "pods vanished: " + ", ".join(missing))
    assert head is not None
    failures = [f for f in (_head_failure(head), *map(_worker_failure, workers)) if f]
    if failures:
        # min keeps the first of equal times: the head's verdict wins a tie.
        return min(failures, key=lambda failure: failure[0])[1]
    if _head_ready(head) and all(_phase(w) == "Running" for w in workers):
        return Outcome("running", "PodsReady", f"head and {len(workers)} workers ready")
    return _pending([head, *workers])


# --------------------------------------------------------------------------------------
# the head's /progress -> status.progress, status.checkpoints.latest, status.evaluation
# --------------------------------------------------------------------------------------

# The API server stores integers as int64.
_MAX_INT = 2**63 - 1


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or not 0 <= value <= _MAX_INT:
        return None
    return int(value)


def _number(value: Any, minimum: float = -math.inf) -> float | None:
    # The head is not trusted to send JSON the API server accepts: no NaN, no booleans.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value >= minimum else None


def _time(value: Any) -> str | None:
    moment = _parse_time(value)
    return rfc3339(moment) if moment is not None else None


def _without_none(values: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def _progress(raw: Mapping[str, Any]) -> dict[str, Any]:
    step, total = _count(raw.get("step")), _count(raw.get("totalSteps"))
    percent = _count(raw.get("percent"))
    if percent is None and step is not None and total:
        percent = step * 100 // total
    return _without_none(
        {
            "step": step,
            "totalSteps": total,
            "epoch": _number(raw.get("epoch"), 0.0),
            "percent": None if percent is None else min(100, percent),
            "loss": _number(raw.get("loss")),
            "tokensPerSecond": _number(raw.get("tokensPerSecond"), 0.0),
            "mfu": _number(raw.get("mfu"), 0.0),
            "etaSeconds": _count(raw.get("etaSeconds")),
            "updatedAt": _time(raw.get("updatedAt")),
        }
    )


def _checkpoint_ref(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        return {}
    path = raw.get("path")
    return _without_none(
        {
            "step": _count(raw.get("step")),
            "path": path if isinstance(path, str) and len(path) <= api.MAX_URI else None,
            "time": _time(raw.get("time")),
        }
    )


def _gate(raw: Any) -> dict[str, Any] | None:
    if not isinstance(raw, Mapping):
        return None
    failures = raw.get("failures")
    failures = failures if isinstance(failures, list) else []
    gate: dict[str, Any] = {
        "failures": [_clip(f, MAX_SHORT) for f in failures if isinstance(f, str)][:16]
    }
    if isinstance(raw.get("passed"), bool):
        gate["passed"] = raw["passed"]
    return gate


def _evaluation(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        return {}
    metrics = raw.get("metrics")
    metrics = metrics if isinstance(metrics, Mapping) else {}
    finite = {
        name: number
        for name, value in metrics.items()
        if isinstance(name, str)
        and len(name) <= MAX_SHORT
        and (number := _number(value)) is not None
    }
    evaluation = _without_none({"step": _count(raw.get("step")), "gate": _gate(raw.get("gate"))})
    if finite:
        evaluation["metrics"] = dict(list(finite.items())[:64])
    return evaluation


def _copy_progress(status: dict[str, Any], raw: Mapping[str, Any] | None) -> None:
    """Copy what the head reported; keep the previous values of what it did not (or could
    not: None means the head was unreachable)."""
    if raw is None:
        return
    progress = _progress(raw)
    if progress:
        status["progress"] = progress
    latest = _checkpoint_ref(raw.get("latestCheckpoint"))
    if latest:
        status["checkpoints"] = {**(status.get("checkpoints") or {}), "latest": latest}
    evaluation = _evaluation(raw.get("evaluation"))
    if evaluation:
        status["evaluation"] = evaluation


def _evaluated(evaluation: Mapping[str, Any]) -> tuple[str, str]:
    """(reason, message) of the Evaluated condition."""
    metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(evaluation.get("metrics", {}).items()))
    message = f"step {evaluation.get('step', '?')}: {metrics or 'no metrics'}"
    gate = evaluation.get("gate") or {}
    if gate.get("passed") is True:
        return "GatePassed", message
    if gate.get("passed") is False:
        return "GateFailed", f"{message}; gate failed: {'; '.join(gate.get('failures', []))}"
    return "Evaluated", message


# --------------------------------------------------------------------------------------
# the driver's termination message -> status.model, status.evaluation
# --------------------------------------------------------------------------------------

# Kubernetes keeps at most 4096 bytes of a termination message.
MAX_TERMINATION_MESSAGE = 4096
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _model(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        return {}
    uri, version = raw.get("uri"), raw.get("version")
    ok_uri = isinstance(uri, str) and 0 < len(uri) <= api.MAX_URI and uri.isprintable()
    ok_version = (
        isinstance(version, str) and len(version) <= api.MAX_NAME and bool(_VERSION.match(version))
    )
    return _without_none(
        {"uri": uri if ok_uri else None, "version": version if ok_version else None}
    )


def parse_result(message: Any) -> dict[str, Any]:
    """`{"model": {uri, version}, "evaluation": {step, metrics, gate}}` from the driver's
    termination message, keeping only well-formed parts. A message that is not such JSON
    (a crash text, a truncated document) gives {}: its text is never copied anywhere."""
    if not isinstance(message, str) or len(message) > MAX_TERMINATION_MESSAGE:
        return {}
    try:
        raw = json.loads(message)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(raw, Mapping):
        return {}
    result = {"model": _model(raw.get("model")), "evaluation": _evaluation(raw.get("evaluation"))}
    return {key: value for key, value in result.items() if value}


def _record_result(draft: _Draft, head: Mapping[str, Any] | None) -> None:
    """The exported model and the final evaluation, as the driver reported them on exit."""
    term = _terminated(_head_container(head)) if head is not None else None
    result = parse_result((term or {}).get("message"))
    if "model" in result:
        draft.status["model"] = result["model"]
    if "evaluation" in result:
        draft.status["evaluation"] = result["evaluation"]
        draft.condition("Evaluated", "True", *_evaluated(result["evaluation"]))


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
            "the model server reads the model from a PersistentVolumeClaim; runs with "
            "spec.checkpoint.storage.uri cannot be served yet",
        )
    return None


def _rollout(deployment: Mapping[str, Any] | None, url: str) -> tuple[str, str, str]:
    """(status, reason, message) of the Serving condition, from the live Deployment."""
    if deployment is None:
        return "False", "Progressing", "creating the serving Deployment"
    spec, state = deployment.get("spec") or {}, deployment.get("status") or {}
    desired = _count(spec.get("replicas"))
    desired = 1 if desired is None else desired  # the API server's default
    available = _count(state.get("availableReplicas")) or 0
    if available >= 1:
        return "True", "Available", f"{available} of {desired} replicas available at {url}"
    if desired == 0:
        return "False", "ScaledToZero", "the serving Deployment has 0 replicas"
    progressing = _find_condition(state.get("conditions") or [], "Progressing")
    if progressing.get("status") == "False":  # e.g. ProgressDeadlineExceeded
        reason = _reason(progressing.get("reason"), "ProgressDeadlineExceeded")
        return "False", reason, str(progressing.get("message") or "the rollout is stuck")
    message = f"0 of {desired} replicas available: pods starting or loading the model"
    return "False", "Progressing", message


def _set_serving(draft: _Draft, status: str, reason: str, message: str) -> None:
    before = _find_condition(draft.previous.get("conditions") or [], "Serving")
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
    endpoint = {"service": ChildNames(name).serve, "url": url}
    version = (draft.status.get("model") or {}).get("version")
    if version:
        endpoint["modelVersion"] = version
    draft.status["serving"] = endpoint
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
        self.attempt = max(observed.attempt, _count(self.previous.get("attempts")) or 0)
        # Pods of older attempts are the reconciler's garbage, not this attempt's state.
        self.pods = [p for p in observed.pods if _pod_attempt(p) in (None, self.attempt)]

    @property
    def previous_phase(self) -> str | None:
        return self.previous.get("phase")

    @property
    def evictions(self) -> int:
        return _count(self.status.get("evictions")) or 0

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
        return bool(_find_condition(self.status.get("conditions") or [], type))

    def emit(self, type: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.events.append(Event(type, reason, _clip(message, EVENT_MESSAGE_LIMIT)))

    def enter(
        self, phase: str, event_type: Literal["Normal", "Warning"], reason: str, message: str
    ) -> None:
        """Set the phase; an event marks the transition only (never on a converged run)."""
        if self.previous_phase != phase:
            self.emit(event_type, reason, message)
        self.status["phase"] = phase

    def decide(self, action: Action, serve: ServeAction = "none") -> Decision:
        return Decision(self.status, action, self.events, serve)


def _pod_attempt(pod: Mapping[str, Any]) -> int | None:
    value = (_meta(pod).get("labels") or {}).get(LABEL_ATTEMPT)
    return int(value) if isinstance(value, str) and value.isdigit() else None


def _live(pods: list[dict[str, Any]], workers_only: bool = False) -> bool:
    """Whether any pod (worker) is left that nobody has asked to delete yet."""
    return any(not _terminating(p) and (not workers_only or _role(p) == ROLE_WORKER) for p in pods)


def _cleanup(phase: str, reason: str, pods: list[dict[str, Any]]) -> Action:
    """What a terminal run still needs done to the current attempt's pods."""
    if phase == "Failed" and reason in DELETE_ALL_REASONS:
        return "delete_pods" if _live(pods) else "none"
    return "finish" if _live(pods, workers_only=True) else "none"


def _terminal(draft: _Draft) -> Decision:
    """Succeeded and Failed are never left: only observedGeneration follows the spec, and
    serving follows spec.serve and the serving Deployment."""
    failed = _find_condition(draft.status.get("conditions") or [], "Failed")
    cleanup = _cleanup(draft.status["phase"], failed.get("reason", ""), draft.pods)
    return draft.decide(cleanup, _serve(draft))


def _close(draft: _Draft, phase: str, reason: str, message: str) -> None:
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
    message = _clip("; ".join(errors), api.MAX_MESSAGE)
    draft.status["attempts"] = draft.attempt
    draft.status.setdefault("evictions", 0)
    draft.condition("Validated", "False", "InvalidSpec", message)
    _close(draft, "Failed", "InvalidSpec", message)
    # Nothing was created for a run invalid from the start; a run made invalid while it
    # ran loses its pods.
    return draft.decide("delete_pods" if _live(draft.pods) else "none")


def _suspend(draft: _Draft) -> Decision:
    message = "spec.runPolicy.suspend is true; resuming continues from the latest checkpoint"
    draft.condition("Suspended", "True", "Suspended", message)
    for type in ("ClusterReady", "Training"):
        if draft.has_condition(type):
            draft.condition(type, "False", "Suspended", message)
    draft.enter("Suspended", "Normal", "Suspended", f"attempt {draft.attempt} stopped: {message}")
    return draft.decide("delete_pods" if _live(draft.pods) else "none")


def _create(draft: _Draft, attempt: int, reason: str, message: str) -> None:
    """Ask for the cluster of `attempt`; it counts as created once its pods are seen."""
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
        return draft.decide("delete_pods" if _live(draft.pods) else "none")
    attempt = max(draft.attempt, 1)
    message = f"resuming from the latest checkpoint as attempt {attempt}"
    draft.condition("Suspended", "False", "Resumed", message)
    _create(draft, attempt, "Resuming", message)
    draft.emit("Normal", "Resumed", message)
    return draft.decide("create_cluster")


def _start(draft: _Draft, workers: int) -> Decision:
    message = f"creating Ray cluster attempt 1: a head and {workers} worker pods"
    _create(draft, 1, "Creating", message)
    draft.emit("Normal", "Provisioning", message)
    return draft.decide("create_cluster")


def _retry(draft: _Draft, outcome: Outcome, budget: str) -> Decision:
    attempt = draft.attempt + 1
    what = "was preempted" if outcome.kind == "preempted" else "failed"
    message = (
        f"attempt {draft.attempt} {what}: {outcome.reason}: {outcome.message}; "
        f"retrying as attempt {attempt} ({budget})"
    )
    _create(draft, attempt, "Retrying", message)
    draft.condition("Training", "False", "Retrying", message)
    draft.emit("Warning", outcome.reason, message)
    return draft.decide("retry")


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
        return _retry(draft, outcome, f"retry {failures} of {policy.backoff_limit}")
    message = (
        f"{outcome.reason}: {outcome.message}; backoffLimit {policy.backoff_limit} reached "
        f"after {draft.attempt} attempts"
    )
    return _fail(draft, "BackoffLimitExceeded", message, "finish")


def _progress_phase(draft: _Draft) -> str:
    progress = draft.observed.progress
    if progress is None:  # head unreachable: keep what we knew
        return draft.previous_phase if draft.previous_phase == "Evaluating" else "Running"
    return "Evaluating" if progress.get("phase") == "Evaluating" else "Running"


def _observe(draft: _Draft, outcome: Outcome) -> Decision:
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


def compute_status(observed: Observed) -> Decision:
    """The new `.status`, the one action to take, and the events of this transition."""
    draft = _Draft(observed)
    if is_terminal(draft.previous):
        return _terminal(draft)
    if observed.run is None or observed.invalid:
        return _invalid(draft)
    spec = observed.run.spec
    draft.condition("Validated", "True", "Valid", "")
    draft.status["attempts"] = draft.attempt
    draft.status["evictions"] = draft.evictions
    _copy_progress(draft.status, observed.progress)
    if draft.status.get("evaluation"):
        draft.condition("Evaluated", "True", *_evaluated(draft.status["evaluation"]))

    outcome = None
    started = draft.attempt >= 1 and draft.previous_phase != "Suspended"
    ready = _find_condition(draft.previous.get("conditions") or [], "ClusterReady")
    head = next((p for p in draft.pods if _role(p) == ROLE_HEAD), None)
    workers = [p for p in draft.pods if _role(p) == ROLE_WORKER]
    creating = ready.get("reason") in CREATING_REASONS and _missing(
        head, workers, spec.resources.workers
    )
    if started and not creating:
        outcome = classify(draft.pods, spec.resources.workers)

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
    if draft.attempt == 0:
        return _start(draft, spec.resources.workers)
    if outcome is None:  # requested, not all pods seen yet: create-or-adopt again
        return draft.decide("create_cluster")
    if outcome.kind in ("pending", "running"):
        return _observe(draft, outcome)
    return _after_failure(draft, outcome, spec.run_policy)
