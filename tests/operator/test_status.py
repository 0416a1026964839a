"""The pure status computation: pod classification, the phase machine, retries and budgets,
suspend/deadline, the terminal guard, progress copying, idempotence and API validity."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from kubetrain_api import v1alpha1 as api
from kubetrain_api.validation import FieldError, load_documents, parse
from kubetrain_operator import timing
from kubetrain_operator.create_errors import (
    MAX_API_MESSAGE,
    CreateError,
    backoff_seconds,
    from_api_error,
    is_refusal,
)
from kubetrain_operator.status import (
    PHASES,
    Decision,
    Event,
    Observed,
    Outcome,
    classify,
    compute_status,
    is_terminal,
    set_condition,
)

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
LATER = NOW + timedelta(minutes=7)
T0 = "2025-03-01T11:00:00Z"
T1 = "2025-03-01T11:00:05Z"
ROLE = "kubetrain.dev/role"
ACTIONS = {"none", "create_cluster", "retry", "delete_pods", "finish"}

Pod = dict[str, Any]
PodFactory = Callable[..., Pod]


@lru_cache
def make_run(
    workers: int = 2, backoff: int = 3, evictions: int = 10, deadline: int | None = None
) -> api.TrainingRun:
    (doc,) = load_documents((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["spec"]["resources"]["workers"] = workers
    doc["spec"]["runPolicy"] = {"backoffLimit": backoff, "evictionLimit": evictions}
    if deadline is not None:
        doc["spec"]["runPolicy"]["activeDeadlineSeconds"] = deadline
    return parse(doc)


# --------------------------------------------------------------------------------------
# pod JSON factories (core/v1 shapes): role, attempt and worker index in, a pod dict out
# --------------------------------------------------------------------------------------


def _pod(
    role: str,
    attempt: int,
    index: int,
    phase: str,
    state: dict[str, Any] | None,
    *,
    conditions: Sequence[dict[str, Any]] = (),
    reason: str | None = None,
    message: str | None = None,
) -> Pod:
    name = f"qs-a{attempt}-head" if role == "head" else f"qs-a{attempt}-worker-{index}"
    status: dict[str, Any] = {"phase": phase, "conditions": list(conditions)}
    if state is not None:
        container = "ray-head" if role == "head" else "ray-worker"
        status["containerStatuses"] = [
            {"name": container, "state": state, "ready": "running" in state, "restartCount": 0}
        ]
    if reason:
        status["reason"] = reason
    if message:
        status["message"] = message
    labels = {
        "kubetrain.dev/run": "qs",
        "kubetrain.dev/role": role,
        "kubetrain.dev/attempt": str(attempt),
    }
    return {"metadata": {"name": name, "labels": labels}, "status": status}


def _cond(type: str, status: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {"type": type, "status": status, "reason": reason, "message": message}


def running(role: str = "head", attempt: int = 1, index: int = 0) -> Pod:
    ready = [_cond("PodScheduled", "True"), _cond("Ready", "True")]
    return _pod(role, attempt, index, "Running", {"running": {"startedAt": T0}}, conditions=ready)


def not_ready(role: str = "head", attempt: int = 1, index: int = 0) -> Pod:
    conditions = [_cond("PodScheduled", "True"), _cond("Ready", "False", "ContainersNotReady")]
    return _pod(role, attempt, index, "Running", {"running": {}}, conditions=conditions)


def pending(
    role: str = "head",
    attempt: int = 1,
    index: int = 0,
    *,
    unschedulable: bool = False,
    waiting: str = "ContainerCreating",
) -> Pod:
    if unschedulable:
        message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
        scheduled = _cond("PodScheduled", "False", "Unschedulable", message)
        return _pod(role, attempt, index, "Pending", None, conditions=[scheduled])
    state = {"waiting": {"reason": waiting, "message": "Back-off pulling image"}}
    return _pod(role, attempt, index, "Pending", state, conditions=[_cond("PodScheduled", "True")])


def terminated(
    role: str = "head",
    attempt: int = 1,
    index: int = 0,
    *,
    code: int,
    reason: str | None = None,
    signal: int | None = None,
    finished: str = T1,
) -> Pod:
    term: dict[str, Any] = {"exitCode": code, "startedAt": T0, "finishedAt": finished}
    if reason:
        term["reason"] = reason
    if signal is not None:
        term["signal"] = signal
    phase = "Succeeded" if code == 0 and signal is None else "Failed"
    return _pod(role, attempt, index, phase, {"terminated": term})


def evicted(role: str = "head", attempt: int = 1, index: int = 0) -> Pod:
    message = "The node was low on resource: memory."
    return _pod(role, attempt, index, "Failed", None, reason="Evicted", message=message)


def disruption(
    role: str = "head", attempt: int = 1, index: int = 0, *, reason: str = "PreemptionByScheduler"
) -> Pod:
    target = _cond("DisruptionTarget", "True", reason, "preempted by a higher priority pod")
    pod = running(role, attempt, index)
    pod["status"]["conditions"].append(target)
    return pod


def deleting(factory: PodFactory) -> PodFactory:
    def build(role: str = "head", attempt: int = 1, index: int = 0) -> Pod:
        pod = factory(role, attempt, index)
        pod["metadata"]["deletionTimestamp"] = T1
        return pod

    return build


def cluster(
    attempt: int = 1,
    head: PodFactory | None = running,
    workers: Sequence[PodFactory] = (running, running),
) -> list[Pod]:
    pods = [] if head is None else [head("head", attempt, 0)]
    return pods + [make("worker", attempt, i) for i, make in enumerate(workers)]


# --------------------------------------------------------------------------------------
# one reconcile, with the checks every scenario must pass
# --------------------------------------------------------------------------------------


def assert_valid_status(status: dict[str, Any]) -> None:
    """What the API server would store: strict JSON, no NaN, every field in the schema."""
    text = json.dumps(status, allow_nan=False)
    api.TrainingRunStatus.model_validate_json(text, strict=True)


def reconcile(
    previous: dict[str, Any] | None = None,
    *,
    run: api.TrainingRun | None = None,
    pods: Sequence[Pod] = (),
    progress: dict[str, Any] | None = None,
    suspended: bool = False,
    deadline: bool = False,
    invalid: Sequence[FieldError] = (),
    now: datetime = NOW,
    generation: int = 1,
) -> Decision:
    """compute_status as the reconciler calls it, checked for validity and idempotence:
    applied to its own output with the same observation (even later), the status does not
    change and no event repeats."""
    previous = previous or {}
    observed = Observed(
        run=None if invalid else (run or make_run()),
        generation=generation,
        now=now,
        invalid=list(invalid),
        attempt=previous.get("attempts") or 0,
        pods=list(pods),
        progress=progress,
        previous=previous,
        suspended=suspended,
        deadline_exceeded=deadline,
    )
    decision = compute_status(observed)
    assert decision.action in ACTIONS
    assert_valid_status(decision.status)
    assert decision.status["observedGeneration"] == generation
    again = compute_status(replace(observed, previous=decision.status, now=LATER))
    assert again.status == decision.status
    assert again.events == []
    return decision


def condition(status: dict[str, Any], type: str) -> dict[str, Any]:
    (found,) = [c for c in status["conditions"] if c["type"] == type]
    return found


def reasons(decision: Decision) -> list[tuple[str, str]]:
    return [(e.type, e.reason) for e in decision.events]


def started(run: api.TrainingRun | None = None) -> dict[str, Any]:
    """The status right after the first reconcile (attempt 1 requested)."""
    return reconcile(run=run).status


def running_status(run: api.TrainingRun | None = None, attempt: int = 1) -> dict[str, Any]:
    """A status whose current attempt is up and training."""
    status = started(run)
    status["attempts"] = attempt
    workers = (run or make_run()).spec.resources.workers
    pods = cluster(attempt, workers=[running] * workers)
    return reconcile(status, run=run, pods=pods).status


# --------------------------------------------------------------------------------------
# classify
# --------------------------------------------------------------------------------------

w_exit = partial(terminated, code=1)
CLASSIFY_TABLE: list[tuple[str, list[Pod], str, str]] = [
    ("all-running", cluster(), "running", "PodsReady"),
    ("head-pending", cluster(head=pending), "pending", "PodsPending"),
    (
        "unschedulable",
        cluster(workers=[running, partial(pending, unschedulable=True)]),
        "pending",
        "Unschedulable",
    ),
    (
        "image-pull",
        cluster(head=partial(pending, waiting="ImagePullBackOff")),
        "pending",
        "ImagePullBackOff",
    ),
    ("head-not-ready", cluster(head=not_ready), "pending", "PodsPending"),
    ("worker-not-running", cluster(workers=[running, pending]), "pending", "PodsPending"),
    ("head-exit-0", cluster(head=partial(terminated, code=0)), "succeeded", "Completed"),
    (
        "head-0-beats-dying-workers",
        cluster(head=partial(terminated, code=0), workers=[w_exit, evicted]),
        "succeeded",
        "Completed",
    ),
    ("head-exit-1", cluster(head=partial(terminated, code=1)), "failed_permanent", "ExitCode1"),
    (
        "head-exit-127",
        cluster(head=partial(terminated, code=127)),
        "failed_permanent",
        "ExitCode127",
    ),
    (
        "head-exit-137",
        cluster(head=partial(terminated, code=137)),
        "failed_retryable",
        "ExitCode137",
    ),
    (
        "head-oom",
        cluster(head=partial(terminated, code=137, reason="OOMKilled")),
        "failed_retryable",
        "OOMKilled",
    ),
    (
        "head-sigterm",
        cluster(head=partial(terminated, code=143)),
        "failed_retryable",
        "ExitCode143",
    ),
    (
        "head-signal",
        cluster(head=partial(terminated, code=0, signal=9)),
        "failed_retryable",
        "Signal9",
    ),
    ("worker-exit-1", cluster(workers=[running, w_exit]), "failed_retryable", "WorkerFailed"),
    (
        "worker-exit-0",
        cluster(workers=[partial(terminated, code=0), running]),
        "failed_retryable",
        "WorkerFailed",
    ),
    (
        "worker-failed-first",
        cluster(
            head=partial(terminated, code=1, finished="2025-03-01T11:00:09Z"),
            workers=[running, partial(terminated, code=137, finished=T1)],
        ),
        "failed_retryable",
        "WorkerFailed",
    ),
    (
        "head-failed-first",
        cluster(
            head=partial(terminated, code=1, finished=T1),
            workers=[running, partial(terminated, code=1, finished="2025-03-01T11:01:00Z")],
        ),
        "failed_permanent",
        "ExitCode1",
    ),
    (
        "same-time-head-decides",
        cluster(head=partial(terminated, code=1), workers=[w_exit, running]),
        "failed_permanent",
        "ExitCode1",
    ),
    (
        "worker-oom",
        cluster(workers=[running, partial(terminated, code=137, reason="OOMKilled")]),
        "failed_retryable",
        "OOMKilled",
    ),
    ("worker-evicted", cluster(workers=[running, evicted]), "preempted", "Evicted"),
    ("head-disrupted", cluster(head=disruption), "preempted", "PreemptionByScheduler"),
    (
        "disruption-beats-exit",
        cluster(head=partial(terminated, code=1), workers=[running, disruption]),
        "preempted",
        "PreemptionByScheduler",
    ),
    ("head-deleted", cluster(head=deleting(running)), "preempted", "PodDeleted"),
    ("head-missing", cluster(head=None), "preempted", "PodMissing"),
    ("worker-missing", cluster(workers=[running]), "preempted", "PodMissing"),
    ("all-missing", [], "preempted", "PodMissing"),
]


@pytest.mark.parametrize(
    ("pods", "kind", "reason"),
    [row[1:] for row in CLASSIFY_TABLE],
    ids=[row[0] for row in CLASSIFY_TABLE],
)
def test_classify(pods: list[Pod], kind: str, reason: str) -> None:
    outcome = classify(pods, expected_workers=2)
    assert (outcome.kind, outcome.reason) == (kind, reason)
    assert outcome.message


def test_classify_pod_failed_without_container_status_is_retryable() -> None:
    head = _pod("head", 1, 0, "Failed", None, reason="UnexpectedAdmissionError")
    outcome = classify([head, running("worker", 1, 0)], expected_workers=1)
    assert outcome == Outcome("failed_retryable", "UnexpectedAdmissionError", outcome.message)


def test_classify_node_lost_and_odd_disruption_reasons_are_preempted() -> None:
    lost = _pod("worker", 1, 0, "Unknown", None, reason="NodeLost")
    assert classify([running(), lost], 1).reason == "NodeLost"
    odd = disruption("worker", reason="by node-lifecycle controller!")
    assert classify([running(), odd], 1).reason == "bynodelifecyclecontroller"


def test_classify_messages_name_the_pod() -> None:
    outcome = classify(cluster(workers=[running, evicted]), 2)
    assert "qs-a1-worker-1" in outcome.message
    assert "low on resource" in outcome.message


# --------------------------------------------------------------------------------------
# set_condition, helpers
# --------------------------------------------------------------------------------------


def test_set_condition_keeps_transition_time_unless_status_flips() -> None:
    first = set_condition([], "Training", "False", "WaitingForCluster", "m", 1, NOW)
    assert first == [
        {
            "type": "Training",
            "status": "False",
            "reason": "WaitingForCluster",
            "message": "m",
            "lastTransitionTime": "2025-03-01T12:00:00Z",
            "observedGeneration": 1,
        }
    ]
    same = set_condition(first, "Training", "False", "Retrying", "again", 2, LATER)
    assert same[0]["lastTransitionTime"] == "2025-03-01T12:00:00Z"
    assert (same[0]["reason"], same[0]["message"], same[0]["observedGeneration"]) == (
        "Retrying",
        "again",
        2,
    )
    flipped = set_condition(same, "Training", "True", "Running", "", 2, LATER)
    assert flipped[0]["lastTransitionTime"] == "2025-03-01T12:07:00Z"
    assert first[0]["reason"] == "WaitingForCluster"  # input untouched


def test_set_condition_keeps_other_types_in_order_and_normalizes_time() -> None:
    conditions = [_cond("Serving", "True", "Up") | {"lastTransitionTime": T0}]
    local = datetime(2025, 3, 1, 13, 30, 15, 999, tzinfo=timezone(timedelta(hours=1)))
    result = set_condition(conditions, "Validated", "True", "Valid", "", 3, local)
    assert [c["type"] for c in result] == ["Serving", "Validated"]
    assert result[1]["lastTransitionTime"] == "2025-03-01T12:30:15Z"
    assert result[0] == conditions[0]
    assert result[0] is not conditions[0]


def test_phases_and_is_terminal() -> None:
    assert PHASES == (
        "Pending",
        "Provisioning",
        "Running",
        "Evaluating",
        "Succeeded",
        "Failed",
        "Suspended",
    )
    assert [p for p in PHASES if is_terminal({"phase": p})] == ["Succeeded", "Failed"]
    assert not is_terminal({})


# --------------------------------------------------------------------------------------
# 1. invalid spec
# --------------------------------------------------------------------------------------

ERRORS = [
    FieldError("spec.resources.workers", "must be >= 1"),
    FieldError("spec.env[0].name", "RANK is reserved"),
]


def test_invalid_spec_fails_with_every_field_path() -> None:
    decision = reconcile(invalid=ERRORS)
    status = decision.status
    assert status["phase"] == "Failed"
    assert decision.action == "none"
    for type in ("Validated", "Failed"):
        found = condition(status, type)
        assert found["reason"] == "InvalidSpec"
        assert "spec.resources.workers: must be >= 1" in found["message"]
        assert "spec.env[0].name: RANK is reserved" in found["message"]
    assert condition(status, "Validated")["status"] == "False"
    assert condition(status, "Failed")["status"] == "True"
    assert status["completionTime"] == "2025-03-01T12:00:00Z"
    assert reasons(decision) == [("Warning", "InvalidSpec")]
    assert "workers" in decision.events[0].message


def test_invalid_spec_is_reported_once() -> None:
    first = reconcile(invalid=ERRORS)
    second = reconcile(first.status, invalid=ERRORS, now=LATER, generation=2)
    assert second.events == []
    assert second.action == "none"
    assert condition(second.status, "Failed") == condition(first.status, "Failed")


def test_invalid_spec_message_is_truncated() -> None:
    many = [FieldError(f"spec.env[{i}].name", "x" * 100) for i in range(1000)]
    status = reconcile(invalid=many).status
    message = condition(status, "Failed")["message"]
    assert len(message) == api.MAX_MESSAGE
    assert message.startswith("spec.env[0].name: xxx")
    assert message.endswith("...")


def test_run_made_invalid_while_running_loses_its_pods() -> None:
    decision = reconcile(running_status(), invalid=ERRORS, pods=cluster())
    assert (decision.status["phase"], decision.action) == ("Failed", "delete_pods")
    assert condition(decision.status, "Training")["status"] == "False"


# --------------------------------------------------------------------------------------
# 2-3. start, provisioning, running, evaluating, success
# --------------------------------------------------------------------------------------


def test_first_reconcile_requests_attempt_one() -> None:
    decision = reconcile()
    status = decision.status
    assert decision.action == "create_cluster"
    assert (status["phase"], status["attempts"], status["evictions"]) == ("Provisioning", 1, 0)
    assert status["startTime"] == "2025-03-01T12:00:00Z"
    assert condition(status, "Validated")["status"] == "True"
    assert condition(status, "ClusterReady")["reason"] == "Creating"
    assert reasons(decision) == [("Normal", "Provisioning")]


@pytest.mark.parametrize(
    "pods", [[], cluster(workers=[running]), cluster(head=None)], ids=["none", "some", "no-head"]
)
def test_requested_cluster_not_yet_seen_is_created_again_not_counted(pods: list[Pod]) -> None:
    decision = reconcile(started(), pods=pods)
    assert decision.action == "create_cluster"
    assert decision.status == {**started(), "observedGeneration": 1}
    assert decision.events == []


def test_pending_pods_are_provisioning() -> None:
    pods = cluster(workers=[running, partial(pending, unschedulable=True)])
    decision = reconcile(started(), pods=pods)
    status = decision.status
    assert (status["phase"], decision.action) == ("Provisioning", "none")
    assert condition(status, "ClusterReady")["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in condition(status, "ClusterReady")["message"]
    assert decision.events == []  # still Provisioning: no transition
    # Once the pods are seen, a vanished pod is a loss, not a pod still to create.
    gone = reconcile(status, pods=cluster(workers=[running]))
    assert (gone.action, gone.status["evictions"]) == ("retry", 1)


def test_running_then_evaluating_then_succeeded() -> None:
    running_ = reconcile(started(), pods=cluster(), progress={"phase": "Running", "step": 5})
    status = running_.status
    assert (status["phase"], running_.action) == ("Running", "none")
    assert condition(status, "ClusterReady")["status"] == "True"
    assert condition(status, "Training")["status"] == "True"
    assert reasons(running_) == [("Normal", "Running")]

    evaluation = {"step": 50, "metrics": {"perplexity": 12.5}, "gate": {"passed": True}}
    progress = {"phase": "Evaluating", "step": 50, "evaluation": evaluation}
    evaluating = reconcile(status, pods=cluster(), progress=progress)
    assert evaluating.status["phase"] == "Evaluating"
    assert condition(evaluating.status, "Evaluated")["reason"] == "GatePassed"
    assert reasons(evaluating) == [("Normal", "Evaluating")]
    # Head unreachable: the phase it last reported stays.
    assert reconcile(evaluating.status, pods=cluster()).status["phase"] == "Evaluating"

    done = reconcile(evaluating.status, pods=cluster(head=partial(terminated, code=0)))
    status = done.status
    assert (status["phase"], done.action) == ("Succeeded", "finish")
    assert status["completionTime"] == "2025-03-01T12:00:00Z"
    assert condition(status, "Succeeded")["status"] == "True"
    assert condition(status, "Training")["status"] == "False"
    assert condition(status, "Evaluated")["status"] == "True"
    assert "Failed" not in {c["type"] for c in status["conditions"]}
    assert (status["attempts"], status["startTime"]) == (1, "2025-03-01T12:00:00Z")
    assert reasons(done) == [("Normal", "Succeeded")]


def test_cluster_lost_readiness_goes_back_to_provisioning() -> None:
    decision = reconcile(running_status(), pods=cluster(head=not_ready))
    assert decision.status["phase"] == "Provisioning"
    assert condition(decision.status, "ClusterReady")["status"] == "False"
    assert reasons(decision) == [("Normal", "Provisioning")]


# --------------------------------------------------------------------------------------
# 4-6. failures, retries and their budgets
# --------------------------------------------------------------------------------------


def fail_attempts(run: api.TrainingRun, head: PodFactory, limit: int = 20) -> list[Decision]:
    """Drive a run whose driver always ends the same way until it is terminal."""
    decisions, status = [], started(run)
    while not is_terminal(status) and len(decisions) < limit:
        attempt = status["attempts"]
        decision = reconcile(status, run=run, pods=cluster(attempt, head=head))
        decisions.append(decision)
        status = decision.status
    return decisions


def test_exit_code_1_fails_after_one_attempt() -> None:
    (decision,) = fail_attempts(make_run(backoff=5), partial(terminated, code=1))
    status = decision.status
    assert (status["phase"], status["attempts"], decision.action) == ("Failed", 1, "finish")
    assert condition(status, "Failed")["reason"] == "ExitCode1"
    assert reasons(decision) == [("Warning", "ExitCode1")]


@pytest.mark.parametrize("backoff", [0, 1, 2, 4])
@pytest.mark.parametrize(
    "head",
    [partial(terminated, code=137), partial(terminated, code=137, reason="OOMKilled")],
    ids=["exit137", "oom"],
)
def test_retryable_failures_end_after_backoff_limit_plus_one_attempts(
    backoff: int, head: PodFactory
) -> None:
    decisions = fail_attempts(make_run(backoff=backoff), head)
    assert [d.action for d in decisions] == ["retry"] * backoff + ["finish"]
    assert [d.status["attempts"] for d in decisions] == [*range(2, backoff + 2), backoff + 1]
    last = decisions[-1].status
    assert (last["phase"], last["evictions"]) == ("Failed", 0)
    assert condition(last, "Failed")["reason"] == "BackoffLimitExceeded"
    assert f"after {backoff + 1} attempts" in condition(last, "Failed")["message"]
    assert reasons(decisions[-1]) == [("Warning", "BackoffLimitExceeded")]


def test_retry_says_retrying_and_names_the_reason() -> None:
    decision = reconcile(
        running_status(make_run(backoff=2)),
        run=make_run(backoff=2),
        pods=cluster(head=partial(terminated, code=137)),
    )
    status = decision.status
    assert (decision.action, status["phase"], status["attempts"]) == ("retry", "Provisioning", 2)
    assert condition(status, "ClusterReady")["reason"] == "Retrying"
    assert condition(status, "Training")["reason"] == "Retrying"
    assert "ExitCode137" in condition(status, "Training")["message"]
    assert reasons(decision) == [("Warning", "ExitCode137")]
    assert "retry 1 of 2" in decision.events[0].message


def test_exit_137_then_success_takes_two_attempts() -> None:
    run = make_run(backoff=2)
    retried = reconcile(started(run), run=run, pods=cluster(head=partial(terminated, code=137)))
    up = reconcile(retried.status, run=run, pods=cluster(2))
    assert up.status["phase"] == "Running"
    done = reconcile(up.status, run=run, pods=cluster(2, head=partial(terminated, code=0)))
    assert (done.status["phase"], done.status["attempts"]) == ("Succeeded", 2)
    assert condition(done.status, "Succeeded")["lastTransitionTime"] == "2025-03-01T12:00:00Z"


def test_pods_of_an_older_attempt_are_ignored() -> None:
    status = running_status(attempt=2)
    old = cluster(1, head=partial(terminated, code=1))
    decision = reconcile(status, pods=old + cluster(2))
    assert (decision.status["phase"], decision.action) == ("Running", "none")


PREEMPTIONS = {
    "evicted": cluster(workers=[running, evicted]),
    "disruption-target": cluster(head=disruption),
    "pod-missing": cluster(workers=[running]),
    "pod-deleted": cluster(head=deleting(running)),
}


@pytest.mark.parametrize("pods", PREEMPTIONS.values(), ids=PREEMPTIONS.keys())
def test_preemption_retries_without_touching_backoff(pods: list[Pod]) -> None:
    run = make_run(backoff=0, evictions=3)
    decision = reconcile(running_status(run), run=run, pods=pods)
    status = decision.status
    assert (decision.action, status["attempts"], status["evictions"]) == ("retry", 2, 1)
    assert decision.events[0].type == "Warning"
    assert "eviction 1 of 3" in decision.events[0].message


def test_eviction_limit_is_its_own_budget() -> None:
    run = make_run(backoff=1, evictions=2)
    status = started(run)
    actions = []
    for head in (evicted, evicted, partial(terminated, code=137), evicted):
        attempt = status["attempts"]
        decision = reconcile(status, run=run, pods=cluster(attempt, head=head))
        actions.append(decision.action)
        status = decision.status
    assert actions == ["retry", "retry", "retry", "finish"]
    assert (status["phase"], status["attempts"], status["evictions"]) == ("Failed", 4, 2)
    assert condition(status, "Failed")["reason"] == "EvictionLimitExceeded"


def test_eviction_limit_zero_fails_on_first_eviction() -> None:
    run = make_run(evictions=0)
    decision = reconcile(started(run), run=run, pods=cluster(head=evicted))
    assert (decision.status["phase"], decision.action) == ("Failed", "finish")
    assert condition(decision.status, "Failed")["reason"] == "EvictionLimitExceeded"


# --------------------------------------------------------------------------------------
# 7. deadline, suspend, resume
# --------------------------------------------------------------------------------------


def test_deadline_fails_and_deletes_pods() -> None:
    run = make_run(deadline=600)
    decision = reconcile(running_status(run), run=run, pods=cluster(), deadline=True)
    status = decision.status
    assert (status["phase"], decision.action) == ("Failed", "delete_pods")
    assert condition(status, "Failed")["reason"] == "DeadlineExceeded"
    assert "600s" in condition(status, "Failed")["message"]
    assert reasons(decision) == [("Warning", "DeadlineExceeded")]
    # Later passes delete what is left, and stop once every pod is going.
    left = reconcile(status, run=run, pods=cluster(head=running, workers=[]))
    assert left.action == "delete_pods"
    going = [deleting(running)("head"), deleting(running)("worker")]
    assert reconcile(status, run=run, pods=going).action == "none"


def test_success_beats_a_deadline_seen_in_the_same_pass() -> None:
    pods = cluster(head=partial(terminated, code=0))
    decision = reconcile(running_status(), pods=pods, deadline=True)
    assert decision.status["phase"] == "Succeeded"


def test_suspend_deletes_pods_and_resume_is_not_a_failure() -> None:
    run = make_run(backoff=1)
    suspended = reconcile(running_status(run), run=run, pods=cluster(), suspended=True)
    status = suspended.status
    assert (status["phase"], suspended.action) == ("Suspended", "delete_pods")
    assert condition(status, "Suspended")["status"] == "True"
    assert condition(status, "Training")["status"] == "False"
    assert reasons(suspended) == [("Normal", "Suspended")]
    terminating = [deleting(running)("head"), deleting(running)("worker")]
    assert reconcile(status, run=run, pods=terminating, suspended=True).action == "none"

    # Resumed while the old pods still terminate: wait, the attempt's names are reused.
    waiting = reconcile(status, run=run, pods=terminating)
    assert (waiting.status["phase"], waiting.action) == ("Suspended", "none")
    assert condition(waiting.status, "Suspended")["reason"] == "Resuming"

    resumed = reconcile(waiting.status, run=run, pods=[], now=LATER)
    status = resumed.status
    assert (status["phase"], resumed.action) == ("Provisioning", "create_cluster")
    assert (status["attempts"], status["evictions"]) == (1, 0)
    assert status["startTime"] == "2025-03-01T12:00:00Z"
    assert condition(status, "Suspended")["status"] == "False"
    assert reasons(resumed) == [("Normal", "Resumed")]

    # The resume used no retry: one retryable failure still retries with backoffLimit 1.
    up = reconcile(status, run=run, pods=cluster())
    failed = reconcile(up.status, run=run, pods=cluster(head=partial(terminated, code=143)))
    assert (failed.action, failed.status["attempts"]) == ("retry", 2)


def test_suspended_from_the_start_creates_nothing_until_resumed() -> None:
    decision = reconcile(suspended=True)
    assert (decision.status["phase"], decision.action) == ("Suspended", "none")
    assert "startTime" not in decision.status
    resumed = reconcile(decision.status, now=LATER)
    assert (resumed.action, resumed.status["attempts"]) == ("create_cluster", 1)
    assert resumed.status["startTime"] == "2025-03-01T12:07:00Z"


def test_time_suspended_does_not_count_toward_the_active_deadline() -> None:
    run = make_run(deadline=600)
    status = running_status(run)  # started at NOW
    # Suspended 100 s in, for a whole day: the deadline's clock stops.
    suspended = reconcile(
        status, run=run, pods=cluster(), suspended=True, now=NOW + timedelta(seconds=100)
    ).status
    assert suspended["suspendTime"] == "2025-03-01T12:01:40Z"
    day = NOW + timedelta(days=1)
    assert not timing.deadline_exceeded(run, suspended, day)
    assert timing.deadline_remaining(run, suspended, day) is None
    resumed = reconcile(suspended, run=run, pods=[], now=day).status
    assert "suspendTime" not in resumed
    assert resumed["suspendedSeconds"] == 86_400 - 100
    # 100 s of activity before the pause, 499 after: not yet; 500 after: exceeded.
    assert timing.active_seconds(resumed, day + timedelta(seconds=499)) == 599
    assert not timing.deadline_exceeded(run, resumed, day + timedelta(seconds=499))
    assert timing.deadline_exceeded(run, resumed, day + timedelta(seconds=500))
    # A second suspension adds to the first.
    again = reconcile(
        resumed, run=run, pods=cluster(), suspended=True, now=day + timedelta(seconds=200)
    ).status
    back = reconcile(again, run=run, pods=[], now=day + timedelta(seconds=300)).status
    assert back["suspendedSeconds"] == 86_400 - 100 + 100


def test_suspended_before_the_start_does_not_count_as_suspended_time() -> None:
    run = make_run(deadline=600)
    decision = reconcile(run=run, suspended=True)
    assert "suspendTime" not in decision.status
    resumed = reconcile(decision.status, run=run, now=LATER).status
    assert "suspendedSeconds" not in resumed
    assert timing.active_seconds(resumed, LATER + timedelta(seconds=30)) == 30


# --------------------------------------------------------------------------------------
# 8. terminal phases never regress
# --------------------------------------------------------------------------------------


def terminal_statuses() -> dict[str, dict[str, Any]]:
    ok = running_status()
    return {
        "succeeded": reconcile(ok, pods=cluster(head=partial(terminated, code=0))).status,
        "exit1": reconcile(ok, pods=cluster(head=partial(terminated, code=1))).status,
        "deadline": reconcile(ok, pods=cluster(), deadline=True).status,
        "invalid": reconcile(invalid=ERRORS).status,
        "invalid-later": reconcile(ok, pods=cluster(), invalid=ERRORS).status,
    }


LATE_OBSERVATIONS: dict[str, dict[str, Any]] = {
    "running-pods": {"pods": cluster()},
    "failing-pods": {"pods": cluster(head=partial(terminated, code=137))},
    "suspended": {"suspended": True},
    "deadline": {"deadline": True},
    "invalid": {"invalid": ERRORS},
    "progress": {"progress": {"phase": "Evaluating", "step": 99}},
    "new-generation": {"generation": 7},
}


@pytest.mark.parametrize("terminal", ["succeeded", "exit1", "deadline", "invalid", "invalid-later"])
@pytest.mark.parametrize("late", LATE_OBSERVATIONS.values(), ids=LATE_OBSERVATIONS.keys())
def test_terminal_phase_is_never_left(terminal: str, late: dict[str, Any]) -> None:
    status = terminal_statuses()[terminal]
    decision = reconcile(status, now=LATER, **late)
    assert decision.events == []
    generation = late.get("generation", 1)
    # Serving follows the spec after the end, so its condition follows the generation.
    conditions = [
        {**c, "observedGeneration": generation} if c["type"] == "Serving" else c
        for c in status["conditions"]
    ]
    assert decision.status == {
        **status,
        "observedGeneration": generation,
        "conditions": conditions,
    }


@pytest.mark.parametrize(
    ("terminal", "pods", "action"),
    [
        ("succeeded", cluster(head=partial(terminated, code=0)), "finish"),
        ("succeeded", cluster(head=partial(terminated, code=0), workers=[]), "none"),
        ("exit1", cluster(workers=[deleting(running)]), "none"),
        ("exit1", cluster(head=None, workers=[running]), "finish"),
        ("deadline", cluster(workers=[]), "delete_pods"),
        ("deadline", [], "none"),
        ("invalid-later", cluster(head=running, workers=[]), "delete_pods"),
        ("invalid", cluster(head=running, workers=[]), "none"),  # attempt 0: not its pods
    ],
)
def test_terminal_runs_clean_up_leftover_pods(terminal: str, pods: list[Pod], action: str) -> None:
    """Succeeded/Failed keep the head pod (logs) and delete workers (`finish`); a deadline or
    an invalid spec deletes every pod (`delete_pods`); nothing left means `none`."""
    assert reconcile(terminal_statuses()[terminal], pods=pods).action == action


# --------------------------------------------------------------------------------------
# 9. progress
# --------------------------------------------------------------------------------------

PROGRESS = {
    "phase": "Running",
    "step": 30,
    "totalSteps": 200,
    "epoch": 1.5,
    "loss": 2.25,
    "tokensPerSecond": 1234.5,
    "mfu": 0.31,
    "etaSeconds": 95,
    "latestCheckpoint": {"step": 25, "path": "/storage/checkpoints/step-25", "time": 1.7e9},
    "evaluation": {"step": 25, "metrics": {"loss": 2.3, "perplexity": 9.97}, "gate": None},
    "updatedAt": "2025-03-01T11:59:58.123456Z",
}


def test_progress_is_copied_with_percent_computed() -> None:
    status = reconcile(running_status(), pods=cluster(), progress=PROGRESS).status
    assert status["progress"] == {
        "step": 30,
        "totalSteps": 200,
        "epoch": 1.5,
        "percent": 15,
        "loss": 2.25,
        "tokensPerSecond": 1234.5,
        "mfu": 0.31,
        "etaSeconds": 95,
        "updatedAt": "2025-03-01T11:59:58Z",
    }
    assert status["checkpoints"] == {
        "latest": {
            "step": 25,
            "path": "/storage/checkpoints/step-25",
            "time": "2023-11-14T22:13:20Z",
        }
    }
    assert status["evaluation"] == {"step": 25, "metrics": {"loss": 2.3, "perplexity": 9.97}}
    assert condition(status, "Evaluated")["reason"] == "Evaluated"
    assert "perplexity=9.97" in condition(status, "Evaluated")["message"]


def test_progress_percent_reported_by_the_head_wins_and_is_capped() -> None:
    progress = {"step": 30, "totalSteps": 200, "percent": 180}
    assert (
        reconcile(running_status(), pods=cluster(), progress=progress).status["progress"]["percent"]
        == 100
    )


def test_previous_progress_is_kept_when_the_head_is_unreachable() -> None:
    before = reconcile(running_status(), pods=cluster(), progress=PROGRESS).status
    after = reconcile(before, pods=cluster(), progress=None, now=LATER).status
    for key in ("progress", "checkpoints", "evaluation"):
        assert after[key] == before[key]
    # A new report without a checkpoint keeps the checkpoint the run can resume from.
    newer = reconcile(before, pods=cluster(), progress={"step": 31}).status
    assert newer["progress"] == {"step": 31}
    assert newer["checkpoints"] == before["checkpoints"]


def test_reward_numbers_are_copied_and_out_of_bounds_ones_dropped() -> None:
    dpo = {"step": 30, "rewardMargin": -0.5, "rewardAccuracy": 0.75, "kl": 0.02}
    status = reconcile(running_status(), pods=cluster(), progress=dpo).status
    assert status["progress"] == dpo
    grpo = {"step": 31, "rewardMean": -1.25, "rewardStd": 0.5}
    status = reconcile(status, pods=cluster(), progress=grpo).status
    # A new report replaces the numbers: dpo's margin does not outlive its report.
    assert status["progress"] == grpo
    bad = {
        "step": 32,
        "rewardMean": "high",
        "rewardStd": -0.1,
        "rewardAccuracy": 1.5,
        "rewardMargin": True,
        "kl": float("nan"),
    }
    assert reconcile(status, pods=cluster(), progress=bad).status["progress"] == {"step": 32}


def test_gate_failure_is_reported_in_evaluated() -> None:
    evaluation = {
        "step": 200,
        "metrics": {"perplexity": 41.2},
        "gate": {"passed": False, "failures": ["perplexity 41.2 > max 30"]},
    }
    status = reconcile(running_status(), pods=cluster(), progress={"evaluation": evaluation}).status
    found = condition(status, "Evaluated")
    assert (found["status"], found["reason"]) == ("True", "GateFailed")
    assert "perplexity 41.2 > max 30" in found["message"]
    assert status["evaluation"]["gate"] == {
        "passed": False,
        "failures": evaluation["gate"]["failures"],
    }


def test_bad_progress_values_are_dropped_not_stored() -> None:
    progress = {
        "step": -1,
        "totalSteps": True,
        "epoch": float("nan"),
        "loss": float("inf"),
        "tokensPerSecond": "fast",
        "mfu": -0.5,
        "etaSeconds": 2**70,
        "updatedAt": "yesterday",
        "percent": None,
        "latestCheckpoint": {"step": "7", "path": "x" * 5000, "time": "not a time"},
        "evaluation": {"metrics": {"loss": float("nan"), "ok": 1, "bad": "x", "b": True}},
    }
    before = running_status()
    status = reconcile(before, pods=cluster(), progress=progress).status
    assert status.get("progress") == before.get("progress")
    assert "checkpoints" not in status
    assert status["evaluation"] == {"metrics": {"ok": 1.0}}


# --------------------------------------------------------------------------------------
# 10-11. idempotence and validity, over random observation sequences
# --------------------------------------------------------------------------------------

HEADS: dict[str, PodFactory | None] = {
    "running": running,
    "pending": pending,
    "not-ready": not_ready,
    "exit0": partial(terminated, code=0),
    "exit1": partial(terminated, code=1),
    "exit137": partial(terminated, code=137),
    "oom": partial(terminated, code=137, reason="OOMKilled"),
    "evicted": evicted,
    "disrupted": disruption,
    "missing": None,
}
WORKERS: dict[str, PodFactory | None] = {
    "running": running,
    "pending": pending,
    "exit1": partial(terminated, code=1),
    "evicted": evicted,
    "missing": None,
}
number = st.one_of(
    st.none(), st.integers(-5, 10**6), st.floats(allow_nan=True, allow_infinity=True)
)
progress_strategy = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {},
        optional={
            "phase": st.sampled_from(["Running", "Evaluating", "Exporting"]),
            "step": number,
            "totalSteps": number,
            "percent": number,
            "loss": number,
            "etaSeconds": number,
            "updatedAt": st.one_of(st.text(max_size=30), number),
            "latestCheckpoint": st.fixed_dictionaries(
                {}, optional={"step": number, "path": st.text(max_size=40), "time": number}
            ),
            "evaluation": st.fixed_dictionaries(
                {},
                optional={
                    "step": number,
                    "metrics": st.dictionaries(st.text(max_size=10), number, max_size=5),
                    "gate": st.fixed_dictionaries(
                        {},
                        optional={
                            "passed": st.one_of(st.booleans(), st.none()),
                            "failures": st.lists(st.text(max_size=300), max_size=20),
                        },
                    ),
                },
            ),
        },
    ),
)
# Weighted towards healthy pods so that sequences get far (running, retries, resumes).
head_strategy = st.sampled_from([*["running"] * 6, "pending", "pending", *HEADS])
worker_strategy = st.sampled_from([*["running"] * 12, *WORKERS])
observation_strategy = st.fixed_dictionaries(
    {
        "head": head_strategy,
        "workers": st.lists(worker_strategy, min_size=2, max_size=2),
        "suspended": st.integers(0, 7).map(lambda n: n == 0),
        "deadline": st.integers(0, 19).map(lambda n: n == 0),  # rare
        "progress": progress_strategy,
        "invalid": st.integers(0, 29).map(lambda n: n == 0),  # rare
    }
)


@hypothesis_settings(max_examples=150, deadline=None)
@given(
    backoff=st.integers(0, 3),
    evictions=st.integers(0, 3),
    observations=st.lists(observation_strategy, max_size=25),
)
def test_random_observations_never_regress_or_overspend(
    backoff: int, evictions: int, observations: list[dict[str, Any]]
) -> None:
    run = make_run(workers=2, backoff=backoff, evictions=evictions)
    status: dict[str, Any] = {}
    deleted: set[str] = set()  # roles whose pods the reconciler deleted in this attempt
    for i, seen in enumerate(observations):
        attempt = status.get("attempts") or 0
        head = HEADS[seen["head"]]
        workers = [make for w in seen["workers"] if (make := WORKERS[w]) is not None]
        pods = cluster(attempt, head=head, workers=workers)
        decision = reconcile(
            status,
            run=run,
            pods=[p for p in pods if attempt and p["metadata"]["labels"][ROLE] not in deleted],
            progress=seen["progress"],
            suspended=seen["suspended"],
            deadline=seen["deadline"],
            invalid=ERRORS if seen["invalid"] else (),
            now=NOW + timedelta(seconds=i),
        )
        new = decision.status
        if is_terminal(status):
            assert new == status
            assert decision.action in ("none", "finish", "delete_pods")
        assert new["attempts"] - new["evictions"] <= backoff + 1
        assert new["evictions"] <= evictions
        assert new["attempts"] >= attempt
        assert all(isinstance(e, Event) and len(e.message) <= 1024 for e in decision.events)
        if decision.action in ("create_cluster", "retry"):
            deleted = set()
        deleted |= {"delete_pods": {"head", "worker"}, "finish": {"worker"}}.get(
            decision.action, set()
        )
        status = new


# --------------------------------------------------------------------------------------
# the API server refusing the attempt's children (create_errors.py)
# --------------------------------------------------------------------------------------

QUOTA = CreateError(
    403,
    "Pod",
    "quickstart-a1-worker-1",
    'pods "quickstart-a1-worker-1" is forbidden: exceeded quota: q, requested: pods=1, '
    "used: pods=2, limited: pods=2",
)


def refused(previous: dict[str, Any], error: CreateError, now: datetime = NOW) -> Decision:
    """The reconciler's second pass after a refused create."""
    observed = Observed(
        run=make_run(),
        generation=1,
        now=now,
        attempt=previous.get("attempts") or 0,
        previous=previous,
        create_error=error,
    )
    decision = compute_status(observed)
    assert_valid_status(decision.status)
    return decision


def test_a_refused_create_is_a_condition_and_an_event_and_is_tried_again_after_a_backoff() -> None:
    first = refused(started(), QUOTA)
    status = first.status
    assert (status["phase"], first.action) == ("Provisioning", "delete_pods")
    ready = condition(status, "ClusterReady")
    assert ready["reason"] == "QuotaExceeded"
    assert "exceeded quota: q" in ready["message"]
    assert "quickstart-a1-worker-1" in ready["message"]
    assert reasons(first) == [("Warning", "QuotaExceeded")]
    assert (status["createFailures"], status["nextCreateTime"]) == (1, "2025-03-01T12:00:05Z")

    # Within the backoff nothing is created; after it, the attempt is created again.
    assert reconcile(status, now=NOW + timedelta(seconds=4)).action == "none"
    assert reconcile(status, now=NOW + timedelta(seconds=5)).action == "create_cluster"

    # The same refusal again: the wait doubles, and no second event.
    second = refused(status, QUOTA, now=NOW + timedelta(seconds=5))
    assert second.status["createFailures"] == 2
    assert second.status["nextCreateTime"] == "2025-03-01T12:00:15Z"
    assert second.events == []
    assert second.status["attempts"] == 1  # a refusal is no attempt

    # Quota freed: the pods exist, the refusal is gone (null: removed by the merge patch).
    seen = reconcile(second.status, pods=cluster(workers=[running, pending]))
    assert condition(seen.status, "ClusterReady")["reason"] != "QuotaExceeded"
    assert seen.status["createFailures"] is None
    assert seen.status["nextCreateTime"] is None


def test_the_backoff_doubles_up_to_five_minutes() -> None:
    assert [backoff_seconds(n) for n in (1, 2, 3, 6, 7, 20)] == [5, 10, 20, 160, 300, 300]


def test_an_invalid_child_fails_the_run_and_releases_its_pods() -> None:
    invalid = CreateError(422, "Pod", "quickstart-a1-head", 'Pod "x" is invalid: spec.nodeSelector')
    decision = refused(started(), invalid)
    status = decision.status
    assert (status["phase"], decision.action) == ("Failed", "delete_pods")
    assert condition(status, "Failed")["reason"] == "CreateRejected"
    assert "spec.nodeSelector" in condition(status, "Failed")["message"]
    assert reasons(decision) == [("Warning", "CreateRejected")]
    # Terminal: pods still there are deleted, the head's included.
    assert reconcile(status, pods=cluster()).action == "delete_pods"


def status_body(message: str, code: int) -> str:
    return json.dumps({"kind": "Status", "message": message, "code": code})


@pytest.mark.parametrize(
    ("code", "message", "reason", "permanent"),
    [
        (
            403,
            'pods "p" is forbidden: exceeded quota: q, requested: pods=1',
            "QuotaExceeded",
            False,
        ),
        (
            403,
            'pods "p" is forbidden: no PriorityClass with name x was found',
            "CreateFailed",
            False,
        ),
        (403, 'admission webhook "policy.example" denied the request: no', "CreateFailed", False),
        (422, 'Pod "p" is invalid: spec.nodeSelector: Invalid value', "CreateRejected", True),
        (400, "bad request", "CreateRejected", True),
    ],
)
def test_refusals_are_classified_from_the_api_servers_answer(
    code: int, message: str, reason: str, permanent: bool
) -> None:
    error = from_api_error(code, status_body(message, code), "Forbidden", "Pod", "p")
    assert (error.reason, error.permanent, error.message) == (reason, permanent, message)


def test_the_api_servers_message_is_bounded_and_a_missing_body_falls_back() -> None:
    long = from_api_error(403, status_body("x" * 10_000, 403), "Forbidden", "Pod", "p")
    assert len(long.message) <= MAX_API_MESSAGE
    assert from_api_error(403, "<html>", "Forbidden", "Pod", "p").message == "Forbidden"
    assert from_api_error(403, None, None, "Pod", "p").message == "HTTP 403"


@pytest.mark.parametrize(
    ("code", "refusal"),
    [(400, True), (403, True), (404, True), (422, True), (409, False), (429, False), (500, False)],
)
def test_only_the_server_refusing_the_object_is_a_refusal(code: int, refusal: bool) -> None:
    assert is_refusal(code) is refusal
