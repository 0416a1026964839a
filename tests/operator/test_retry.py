"""The pure retry decision: exit codes and reasons -> FailRun / Retry / Ignore, the rule
list in spec.runPolicy.failureRules over the defaults, and the exponential backoff that
status.compute_status waits out (status.nextAttemptTime, Decision.wait)."""

from __future__ import annotations

from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from kubetrain_api import contract
from kubetrain_api import v1alpha1 as api
from kubetrain_api.validation import InvalidSpec, load_documents, parse
from kubetrain_operator import retry
from kubetrain_operator.status import is_terminal
from tests.operator.test_status import (
    NOW,
    cluster,
    condition,
    disruption,
    reconcile,
    running,
    running_status,
    started,
    terminated,
)

ROOT = Path(__file__).resolve().parents[2]


def make_run(**policy: Any) -> api.TrainingRun:
    (doc,) = load_documents((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["spec"]["runPolicy"] = policy
    return parse(doc)


def fail_once(run: api.TrainingRun, head: Any = None, workers: Any = (running, running)):
    return reconcile(running_status(run), run=run, pods=cluster(head=head, workers=workers))


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (contract.EXIT_RAY_UNAVAILABLE, "RayUnavailable"),
        (contract.EXIT_NETWORK, "NetworkError"),
        (contract.EXIT_WORKERS_LOST, "WorkersLost"),
    ],
)
def test_infrastructure_exit_codes_are_retried_after_a_backoff(code: int, reason: str) -> None:
    run = make_run(backoffLimit=3)
    decision = fail_once(run, partial(terminated, code=code))
    status = decision.status
    assert (decision.action, status["attempts"], decision.wait) == ("retry", 2, 10.0)
    assert status["nextAttemptTime"] == "2025-03-01T12:00:10Z"
    assert condition(status, "ClusterReady")["reason"] == "Retrying"
    assert reason in condition(status, "ClusterReady")["message"]
    assert "10s backoff" in decision.events[0].message


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (contract.EXIT_USAGE, "UsageError"),
        (contract.EXIT_INVALID_SPEC, "InvalidRunSpec"),
        (contract.EXIT_INVALID_DATA, "InvalidData"),
        (contract.EXIT_FAILED, "ExitCode1"),
        (42, "ExitCode42"),
    ],
)
def test_user_error_exit_codes_fail_the_run(code: int, reason: str) -> None:
    decision = fail_once(make_run(backoffLimit=3), partial(terminated, code=code))
    status = decision.status
    assert (status["phase"], status["attempts"], decision.action) == ("Failed", 1, "finish")
    assert condition(status, "Failed")["reason"] == reason
    assert "nextAttemptTime" not in status
    assert decision.wait == 0


def test_the_backoff_is_waited_out_before_the_next_attempt_is_created() -> None:
    run = make_run(backoffLimit=3)
    retried = fail_once(run, partial(terminated, code=contract.EXIT_NETWORK)).status
    # The old attempt's pods are gone; the new attempt's not yet created.
    early = reconcile(retried, run=run, now=NOW + timedelta(seconds=4))
    assert (early.action, early.wait, early.events) == ("none", 6.0, [])
    assert early.status == retried  # a converged wait makes no writes
    due = reconcile(retried, run=run, now=NOW + timedelta(seconds=10))
    assert (due.action, due.wait) == ("create_cluster", 0.0)
    # Once the attempt's pods are seen, the time is history.
    up = reconcile(retried, run=run, pods=cluster(2), now=NOW + timedelta(seconds=12))
    assert up.status["phase"] == "Running"
    assert "nextAttemptTime" not in up.status


def test_backoff_doubles_per_counted_failure_and_is_capped() -> None:
    run = make_run(backoffLimit=6, backoffSeconds=10, maxBackoffSeconds=60)
    status, waits = started(run), []
    now = NOW
    while not is_terminal(status):
        attempt = status["attempts"]
        head = partial(terminated, code=contract.EXIT_WORKERS_LOST)
        decision = reconcile(status, run=run, pods=cluster(attempt, head=head), now=now)
        waits.append(decision.wait)
        status = decision.status
        now += timedelta(minutes=5)
    assert waits == [10, 20, 40, 60, 60, 60, 0]
    assert condition(status, "Failed")["reason"] == "BackoffLimitExceeded"
    assert status["attempts"] == 7
    assert "nextAttemptTime" not in status


def test_backoff_seconds_zero_retries_at_once() -> None:
    run = make_run(backoffSeconds=0)
    decision = fail_once(run, partial(terminated, code=137))
    assert (decision.action, decision.wait) == ("retry", 0.0)
    assert "nextAttemptTime" not in decision.status


def test_evictions_are_retried_at_once() -> None:
    decision = fail_once(make_run(), disruption)
    assert (decision.action, decision.wait, decision.status["evictions"]) == ("retry", 0.0, 1)


def test_suspend_during_a_backoff_drops_it() -> None:
    run = make_run()
    retried = fail_once(run, partial(terminated, code=contract.EXIT_NETWORK)).status
    suspended = reconcile(retried, run=run, suspended=True, now=NOW + timedelta(seconds=1))
    assert "nextAttemptTime" not in suspended.status


# --------------------------------------------------------------------------------------
# spec.runPolicy.failureRules
# --------------------------------------------------------------------------------------


def on_codes(action: str, *codes: int, operator: str = "In") -> dict[str, Any]:
    return {"action": action, "onExitCodes": {"operator": operator, "values": list(codes)}}


def on_reasons(action: str, *reasons: str) -> dict[str, Any]:
    return {"action": action, "onReasons": list(reasons)}


def test_a_retry_rule_makes_exit_1_retryable() -> None:
    run = make_run(failureRules=[on_codes("Retry", 1)])
    decision = fail_once(run, partial(terminated, code=1))
    assert (decision.action, decision.status["attempts"]) == ("retry", 2)
    assert "failureRules[0]: Retry" in decision.events[0].message


def test_a_fail_rule_makes_oom_kills_permanent() -> None:
    run = make_run(failureRules=[on_reasons("FailRun", "OOMKilled")])
    for head, workers in [
        (partial(terminated, code=137, reason="OOMKilled"), (running, running)),
        (running, (running, partial(terminated, code=137, reason="OOMKilled"))),
    ]:
        decision = fail_once(run, head, workers)
        assert decision.status["phase"] == "Failed"
        assert condition(decision.status, "Failed")["reason"] == "OOMKilled"


def test_an_ignore_rule_spends_the_eviction_budget_not_backoff_limit() -> None:
    run = make_run(backoffLimit=0, failureRules=[on_codes("Ignore", contract.EXIT_NETWORK)])
    decision = fail_once(run, partial(terminated, code=contract.EXIT_NETWORK))
    status = decision.status
    assert (decision.action, status["evictions"], decision.wait) == ("retry", 1, 0.0)


def test_not_in_and_first_match_wins() -> None:
    rules = [on_codes("Retry", 3), on_codes("FailRun", 0, 3, operator="NotIn")]
    run = make_run(failureRules=rules)
    assert fail_once(run, partial(terminated, code=3)).action == "retry"
    # An infrastructure code, retried by default, fails through the NotIn rule.
    failed = fail_once(run, partial(terminated, code=contract.EXIT_NETWORK))
    assert failed.status["phase"] == "Failed"


def test_reason_rules_match_disruptions_and_lost_workers() -> None:
    run = make_run(failureRules=[on_reasons("FailRun", "DisruptionTarget", "WorkerFailed")])
    assert fail_once(run, disruption).status["phase"] == "Failed"
    lost = fail_once(run, running, (running, partial(terminated, code=1)))
    assert lost.status["phase"] == "Failed"
    # Exit-code rules never match a failure without the driver's exit code.
    run = make_run(failureRules=[on_codes("FailRun", 1, operator="NotIn")])
    assert fail_once(run, disruption).action == "retry"


def test_backoff_seconds_helper() -> None:
    policy = api.RunPolicy(backoff_seconds=5, max_backoff_seconds=30)
    assert [retry.backoff_seconds(policy, n) for n in range(0, 6)] == [0, 5, 10, 20, 30, 30]
    assert retry.backoff_seconds(policy, 10_000) == 30


@pytest.mark.parametrize(
    ("rule", "path", "message"),
    [
        ({"action": "Retry"}, "failureRules[0]", "set exactly one of onExitCodes and onReasons"),
        (
            {**on_codes("Retry", 1), "onReasons": ["OOMKilled"]},
            "failureRules[0]",
            "set exactly one",
        ),
        (on_codes("Retry", 1, 1), "failureRules[0].onExitCodes.values", "must be distinct"),
        (on_codes("FailRun", 0), "failureRules[0].onExitCodes.values", "0 is success"),
        (on_reasons("Retry", "OOMKilled", "OOMKilled"), "failureRules[0].onReasons", "distinct"),
        (on_codes("Retry", 256), "failureRules[0].onExitCodes.values[0]", "255"),
        ({"action": "Restart", "onReasons": ["Evicted"]}, "failureRules[0].action", "FailRun"),
        (on_reasons("Retry", "OOMKiled"), "failureRules[0].onReasons[0]", "OOMKilled"),
    ],
)
def test_invalid_rules_name_the_field(rule: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(InvalidSpec) as caught:
        make_run(failureRules=[rule])
    errors = [str(e) for e in caught.value.errors]
    assert any(e.startswith(f"spec.runPolicy.{path}:") and message in e for e in errors), errors


@pytest.mark.parametrize(
    ("ray_exit", "driver_exit", "expected"),
    [(1, 0, contract.EXIT_RAY_UNAVAILABLE), (0, contract.EXIT_INVALID_DATA, 11), (0, 0, 0)],
)
def test_the_head_command_reports_a_failed_ray_start_as_infrastructure(
    tmp_path: Path, ray_exit: int, driver_exit: int, expected: int
) -> None:
    """The head pod's real script, with `ray` and `kubetrain` played by stubs."""
    import os
    import subprocess

    from kubetrain_operator import builders
    from kubetrain_operator.settings import OperatorSettings

    for tool, code in (("ray", ray_exit), ("kubetrain", driver_exit)):
        stub = tmp_path / tool
        stub.write_text(f"#!/bin/sh\nexit {code}\n")
        stub.chmod(0o755)
    pod = builders.build_head_pod(make_run(), "uid", "ns", 1, OperatorSettings())
    *_, shell, flag, script = pod["spec"]["containers"][0]["command"]
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    assert subprocess.run([shell, flag, script], env=env, check=False).returncode == expected
