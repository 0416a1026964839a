"""Retry policy of a failed attempt: spec.runPolicy.failureRules, then the defaults, and
the exponential backoff before the next attempt. Pure; status.compute_status applies it.

Defaults (outcome.classify): the driver's user-error exit codes and every other code
1-127 fail the run; its infrastructure codes (contract.INFRASTRUCTURE_EXIT_CODES),
signals (128+), OOMKilled and a lost worker are retried against backoffLimit; eviction,
preemption, node loss and vanished pods are retried at once against evictionLimit.

A rule list in the spirit of a Kubernetes Job's podFailurePolicy: tried in order, the
first that matches decides; FailRun -> permanent, Retry -> counted against backoffLimit,
Ignore -> counted against evictionLimit (so no rule can make a run retry forever).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from kubetrain_api import v1alpha1 as api
from kubetrain_operator.outcome import Outcome, OutcomeKind

FAILURE_KINDS: frozenset[OutcomeKind] = frozenset(
    {"failed_permanent", "failed_retryable", "preempted"}
)
ACTION_KINDS: dict[str, OutcomeKind] = {
    "FailRun": "failed_permanent",
    "Retry": "failed_retryable",
    "Ignore": "preempted",
}


def matches(rule: api.FailureRule, outcome: Outcome) -> bool:
    codes = rule.on_exit_codes
    if codes is not None:
        if outcome.exit_code is None or outcome.exit_code == 0:
            return False
        return (outcome.exit_code in codes.values) == (codes.operator == "In")
    return bool(set(rule.on_reasons or ()) & outcome.causes)


def apply_rules(outcome: Outcome, rules: Sequence[api.FailureRule]) -> Outcome:
    """The outcome with the kind the first matching rule gives, or as it is."""
    if outcome.kind not in FAILURE_KINDS:
        return outcome
    for index, rule in enumerate(rules):
        if matches(rule, outcome):
            kind = ACTION_KINDS[rule.action]
            note = f" (spec.runPolicy.failureRules[{index}]: {rule.action})"
            return dataclasses.replace(outcome, kind=kind, message=outcome.message + note)
    return outcome


def backoff_seconds(policy: api.RunPolicy, failures: int) -> int:
    """The wait before the retry after the `failures`-th counted failure (1, 2, ...):
    backoffSeconds, doubled per further failure, at most maxBackoffSeconds."""
    if failures < 1 or policy.backoff_seconds == 0:
        return 0
    # The exponent is capped so a large backoffLimit cannot build a huge integer.
    delay: int = policy.backoff_seconds * 2 ** min(failures - 1, 30)
    return min(delay, policy.max_backoff_seconds)
