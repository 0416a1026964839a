"""Time a run has been active, and when the reconciler must look at a run again.

Pure functions of the spec, the previous status and `now`. `activeDeadlineSeconds` counts
active time only: the status accumulates the seconds spent suspended (`suspendedSeconds`,
closed on resume) and marks the suspension in progress (`suspendTime`), so a run suspended
for a night does not fail with DeadlineExceeded the moment it resumes.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from kubetrain_api import v1alpha1 as api


def parse_time(value: str) -> datetime:
    """A metav1.Time (`...Z`) as an aware datetime."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def suspended_seconds(status: dict[str, Any], now: datetime) -> float:
    """Seconds spent suspended since startTime, the suspension in progress included."""
    total = float(status.get("suspendedSeconds") or 0)
    if status.get("suspendTime"):
        total += max((now - parse_time(status["suspendTime"])).total_seconds(), 0.0)
    return total


def active_seconds(status: dict[str, Any], now: datetime) -> float | None:
    """Seconds the run has been active (started, not suspended), or None before it starts."""
    if not status.get("startTime"):
        return None
    elapsed = (now - parse_time(status["startTime"])).total_seconds()
    return max(elapsed - suspended_seconds(status, now), 0.0)


def deadline_remaining(
    run: api.TrainingRun | None, status: dict[str, Any], now: datetime
) -> float | None:
    """Active seconds left before activeDeadlineSeconds; None without a deadline, before the
    start, and while suspended (the clock is stopped)."""
    if run is None or status.get("suspendTime"):
        return None
    limit = run.spec.run_policy.active_deadline_seconds
    active = active_seconds(status, now)
    if not limit or active is None:
        return None
    return limit - active


def deadline_exceeded(run: api.TrainingRun | None, status: dict[str, Any], now: datetime) -> bool:
    remaining = deadline_remaining(run, status, now)
    return remaining is not None and remaining <= 0


def ttl_remaining(
    run: api.TrainingRun | None, status: dict[str, Any], now: datetime
) -> float | None:
    """Seconds until a finished run is deleted (ttlSecondsAfterFinished), or None."""
    if run is None or not status.get("completionTime"):
        return None
    ttl = run.spec.run_policy.ttl_seconds_after_finished
    if ttl is None:
        return None
    finished = parse_time(status["completionTime"])
    return (finished + timedelta(seconds=ttl) - now).total_seconds()
