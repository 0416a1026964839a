"""Pod classification: the live pods of one attempt in, what they say (`Outcome`) out.

Pure, like status.py, which takes the decision from the Outcome. The kind of a failure
here is the default; spec.runPolicy.failureRules may change it (retry.py), matching the
Outcome's `exit_code` and `causes`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from kubetrain_api import contract
from kubetrain_api.contract import LABEL_ATTEMPT, LABEL_ROLE, ROLE_HEAD, ROLE_WORKER
from kubetrain_api.reports import parse_time
from kubetrain_operator.builders import HEAD_CONTAINER
from kubetrain_operator.conditions import as_reason, find_condition

OutcomeKind = Literal[
    "pending", "running", "succeeded", "failed_permanent", "failed_retryable", "preempted"
]

# pod.status.reason values that mean the pod was taken away rather than the code failing.
DISRUPTION_REASONS = frozenset({"Evicted", "Preempted", "NodeLost", "Shutdown", "Terminated"})


# The condition reasons of the driver's own exit codes (others read ExitCode<N>).
EXIT_REASONS = {
    contract.EXIT_USAGE: "UsageError",
    contract.EXIT_INVALID_SPEC: "InvalidRunSpec",
    contract.EXIT_INVALID_DATA: "InvalidData",
    contract.EXIT_RAY_UNAVAILABLE: "RayUnavailable",
    contract.EXIT_NETWORK: "NetworkError",
    contract.EXIT_WORKERS_LOST: "WorkersLost",
}


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    reason: str
    message: str
    exit_code: int | None = None
    """The driver's exit code, when the driver's container ended the attempt."""
    causes: frozenset[str] = frozenset()
    """What a failure rule's onReasons can match (api.FailureReason values)."""


def _meta(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    return pod.get("metadata") or {}


def _name(pod: Mapping[str, Any]) -> str:
    return str(_meta(pod).get("name", "?"))


def role(pod: Mapping[str, Any]) -> str | None:
    return (_meta(pod).get("labels") or {}).get(LABEL_ROLE)


def _pod_status(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    return pod.get("status") or {}


def _phase(pod: Mapping[str, Any]) -> str:
    return str(_pod_status(pod).get("phase") or "Pending")


def _terminating(pod: Mapping[str, Any]) -> bool:
    return bool(_meta(pod).get("deletionTimestamp"))


def _pod_condition(pod: Mapping[str, Any], type: str) -> Mapping[str, Any]:
    return find_condition(_pod_status(pod).get("conditions") or [], type)


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
    if code in contract.INFRASTRUCTURE_EXIT_CODES:
        return "failed_retryable", EXIT_REASONS[code], detail
    if isinstance(code, int) and 1 <= code <= 127:
        return "failed_permanent", EXIT_REASONS.get(code, f"ExitCode{code}"), detail
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
        cause = frozenset({status["reason"]})
        return Outcome("preempted", status["reason"], f"pod {_name(pod)}: {message}", None, cause)
    target = _pod_condition(pod, "DisruptionTarget")
    if target.get("status") == "True":
        message = str(target.get("message") or "disrupted")
        reason = as_reason(target.get("reason"), "DisruptionTarget")
        causes = frozenset({"DisruptionTarget"})
        return Outcome("preempted", reason, f"pod {_name(pod)}: {message}", None, causes)
    if _terminating(pod):
        message = f"pod {_name(pod)} is being deleted"
        return Outcome("preempted", "PodDeleted", message, None, frozenset({"PodDeleted"}))
    return None


def missing(head: Mapping[str, Any] | None, workers: list[Any], expected: int) -> list[str]:
    missing = [] if head is not None else ["head"]
    if len(workers) < expected:
        missing.append(f"{expected - len(workers)} of {expected} workers")
    return missing


_LATEST = datetime.max.replace(tzinfo=timezone.utc)


def _finished_at(term: Mapping[str, Any] | None) -> datetime:
    moment = parse_time((term or {}).get("finishedAt"))
    if moment is None:
        return _LATEST
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _head_failure(head: Mapping[str, Any]) -> tuple[datetime, Outcome] | None:
    term = _terminated(_head_container(head))
    if term is not None:
        kind, reason, detail = _exit(term)
        code = term.get("exitCode")
        causes = frozenset({"OOMKilled"} if term.get("reason") == "OOMKilled" else ())
        message = f"driver in pod {_name(head)}: {detail}"
        outcome = Outcome(kind, reason, message, code if isinstance(code, int) else None, causes)
        return _finished_at(term), outcome
    if _phase(head) == "Failed":
        reason = as_reason(_pod_status(head).get("reason"), "PodFailed")
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
    causes = frozenset({"WorkerFailed", reason})
    return _finished_at(term), Outcome("failed_retryable", reason, message, None, causes)


def _head_ready(head: Mapping[str, Any]) -> bool:
    if _phase(head) != "Running":
        return False
    ready = _pod_condition(head, "Ready")
    if ready:
        return ready.get("status") == "True"
    return "running" in (_head_container(head).get("state") or {})


_STARTING = (None, "ContainerCreating", "PodInitializing")


def _ready(pod: Mapping[str, Any]) -> bool:
    return _head_ready(pod) if role(pod) == ROLE_HEAD else _phase(pod) == "Running"


def _blocked(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    """(reason, message) when the pod cannot start on its own: unschedulable, image pull or
    config errors. Pending without a reason is just slow."""
    scheduled = _pod_condition(pod, "PodScheduled")
    if scheduled.get("status") == "False":
        return as_reason(scheduled.get("reason"), "Unschedulable"), str(
            scheduled.get("message", "")
        )
    for container in _containers(pod):
        waiting = (container.get("state") or {}).get("waiting")
        if waiting is not None and waiting.get("reason") not in _STARTING:
            return as_reason(waiting["reason"], "ContainerWaiting"), str(waiting.get("message", ""))
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
    head, workers = head_of(pods), workers_of(pods)
    if head is not None and _head_succeeded(head):
        return Outcome("succeeded", "Completed", f"driver in pod {_name(head)} exited 0")
    for pod in ([head] if head is not None else []) + workers:
        disrupted = _disruption(pod)
        if disrupted is not None:
            return disrupted
    gone = missing(head, workers, expected_workers)
    if gone:
        message = "pods vanished: " + ", ".join(gone)
        return Outcome("preempted", "PodMissing", message, None, frozenset({"PodMissing"}))
    assert head is not None
    failures = [f for f in (_head_failure(head), *map(_worker_failure, workers)) if f]
    if failures:
        # min keeps the first of equal times: the head's verdict wins a tie.
        return min(failures, key=lambda failure: failure[0])[1]
    if _head_ready(head) and all(_phase(w) == "Running" for w in workers):
        return Outcome("running", "PodsReady", f"head and {len(workers)} workers ready")
    return _pending([head, *workers])


def pod_attempt(pod: Mapping[str, Any]) -> int | None:
    """The attempt label of a pod, None when it has none."""
    value = (_meta(pod).get("labels") or {}).get(LABEL_ATTEMPT)
    return int(value) if isinstance(value, str) and value.isdigit() else None


def live(pods: list[dict[str, Any]], workers_only: bool = False) -> bool:
    """Whether any pod (worker) is left that nobody has asked to delete yet."""
    return any(not _terminating(p) and (not workers_only or role(p) == ROLE_WORKER) for p in pods)


def head_of(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((p for p in pods if role(p) == ROLE_HEAD), None)


def workers_of(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in pods if role(p) == ROLE_WORKER]


def termination_message(head: Mapping[str, Any] | None) -> Any:
    """The driver container's termination message, if it has terminated."""
    term = _terminated(_head_container(head)) if head is not None else None
    return (term or {}).get("message")
