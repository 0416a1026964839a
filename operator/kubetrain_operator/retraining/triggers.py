"""When a ModelService retrains: pure decisions from its trigger spec, the last retraining
run, the clock and the observed numbers. No I/O: the operator reads the numbers (feedback
count from the router's log, the evaluation metric from status, drift from the drift
report) and acts on what these functions return.

- `decide`: start a run or not, every trigger that fired (the reasons), and when to look
  again for the schedule. Triggers are ORed: a cron schedule (UTC, five fields, read by
  croniter), at least N new feedback records, an evaluation metric below a threshold,
  drift above a threshold. A schedule whose times passed while the operator was away runs
  once, not once per missed time (as a CronJob), and not at all when the latest missed
  time is older than `starting_deadline` (as CronJob's startingDeadlineSeconds). The
  event triggers (feedback, metric, drift) wait `cooldown` after the last run: a quality
  that stays low while the new model trains, or fails its gate, must not start run after
  run.
- `concurrency`: with a retraining run still active, Forbid starts nothing (the trigger is
  looked at again when it ends), Replace deletes the active run and starts the new one,
  Allow starts the new one beside it (CronJob's concurrencyPolicy).
- `runs_to_delete`: the history limit: the newest `successful` succeeded and `failed`
  failed runs are kept, active runs and `protected` ones (the runs whose models serve)
  never removed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Literal

from croniter import croniter

ConcurrencyPolicy = Literal["Forbid", "Replace", "Allow"]
LOWER_IS_BETTER = frozenset({"loss", "perplexity"})
"""Metrics whose threshold trigger fires above the threshold."""
CRON_MACROS = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@hourly"})
MAX_COUNTED_MISSED = 1000
"""Missed schedule times are counted up to here (for the reason text), not beyond."""


@dataclass(frozen=True)
class TriggerSpec:
    """The triggers of one ModelService (spec.retraining, see the proposal in the report);
    a trigger left None is off."""

    schedule: str | None = None
    """Cron, five fields, evaluated in UTC (no daylight-saving jumps)."""
    starting_deadline: timedelta | None = None
    """A missed schedule time older than this is skipped, not run late."""
    min_new_feedback: int | None = None
    metric: str | None = None
    metric_below: float | None = None
    drift_above: float | None = None
    cooldown: timedelta = timedelta(hours=1)
    """The event triggers wait this long after the last run."""


@dataclass(frozen=True)
class Observed:
    """The numbers at this look; None where there is none yet (no evaluation, no drift)."""

    new_feedback: int = 0
    """Feedback records since the last retraining run's snapshot."""
    metric: float | None = None
    drift: float | None = None


@dataclass(frozen=True)
class Decision:
    start: bool
    reasons: tuple[str, ...] = ()
    """Every trigger that fired, one sentence each (events and conditions)."""
    waiting: tuple[str, ...] = ()
    """Triggers that would have fired but may not yet or any more (cooldown, deadline)."""
    next_check: datetime | None = None
    """The next schedule time after now (requeue then); None without a schedule."""
    missed: int = 0
    """Schedule times due since the last run (1 is on time; more ran once for all)."""


class InvalidTrigger(ValueError):
    """A trigger spec that cannot work; the message names the field."""


def validate(spec: TriggerSpec, prefix: str = "spec.retraining") -> list[str]:
    """Every problem of `spec`, each naming its field; empty when valid."""
    errors = []
    if spec.schedule is not None and not _valid_cron(spec.schedule):
        errors.append(
            f"{prefix}.schedule: {spec.schedule!r} is not a cron schedule (five fields: "
            "minute hour day-of-month month day-of-week, e.g. '0 3 * * *', or @daily etc.)"
        )
    if spec.min_new_feedback is not None and spec.min_new_feedback < 1:
        errors.append(f"{prefix}.minNewFeedback: must be at least 1")
    if (spec.metric is None) != (spec.metric_below is None):
        errors.append(f"{prefix}.metricBelow: needs both a metric name and a threshold")
    if spec.cooldown < timedelta(0):
        errors.append(f"{prefix}.cooldownSeconds: must not be negative")
    if spec.starting_deadline is not None and spec.starting_deadline <= timedelta(0):
        errors.append(f"{prefix}.startingDeadlineSeconds: must be positive")
    return errors


def _valid_cron(expr: str) -> bool:
    # Five fields or a CronJob macro only: croniter also takes a sixth (seconds) and a
    # seventh (year) field, which a CronJob would refuse.
    five = len(expr.split()) == 5 or expr.strip() in CRON_MACROS
    return five and bool(croniter.is_valid(expr))


def decide(
    spec: TriggerSpec, *, last_run: datetime | None, since: datetime, now: datetime, seen: Observed
) -> Decision:
    """Whether to start a retraining run now. `last_run`: when the last one was created
    (None: never); `since`: where schedules count from without one (the ModelService's
    creation, as a CronJob's). All times timezone-aware."""
    if errors := validate(spec):
        raise InvalidTrigger("; ".join(errors))
    now, since = _utc(now), _utc(since)
    last = _utc(last_run) if last_run is not None else None
    reasons: list[str] = []
    waiting: list[str] = []
    next_check = None
    missed = 0
    if spec.schedule is not None:
        due, missed, next_check = _schedule(spec.schedule, last or since, now)
        if due is not None:
            late = now - due
            if spec.starting_deadline is not None and late > spec.starting_deadline:
                waiting.append(
                    f"schedule {spec.schedule!r}: the time {due:%Y-%m-%d %H:%M} UTC is "
                    f"{_seconds(late)} past, beyond the starting deadline "
                    f"({_seconds(spec.starting_deadline)}): skipped"
                )
                missed = 0
            else:
                extra = f" ({missed} times missed, run once)" if missed > 1 else ""
                reasons.append(
                    f"schedule {spec.schedule!r} was due at {due:%Y-%m-%d %H:%M} UTC{extra}"
                )
    events = _events(spec, seen)
    if events and last is not None and now - last < spec.cooldown:
        left = _seconds(spec.cooldown - (now - last))
        waiting += [f"{event}: cooling down ({left} left)" for event in events]
    else:
        reasons += events
    return Decision(bool(reasons), tuple(reasons), tuple(waiting), next_check, missed)


def _events(spec: TriggerSpec, seen: Observed) -> list[str]:
    fired = []
    if spec.min_new_feedback is not None and seen.new_feedback >= spec.min_new_feedback:
        fired.append(f"{seen.new_feedback} new feedback records (at least {spec.min_new_feedback})")
    if spec.metric_below is not None and seen.metric is not None:
        # Loss and perplexity get worse upwards: "below the bar" means above it.
        upward = (spec.metric or "").rsplit("/", 1)[-1] in LOWER_IS_BETTER
        worse = seen.metric > spec.metric_below if upward else seen.metric < spec.metric_below
        if worse:
            side = "above" if upward else "below"
            fired.append(f"{spec.metric} {seen.metric:.4g} is {side} {spec.metric_below:.4g}")
    if spec.drift_above is not None and seen.drift is not None and seen.drift > spec.drift_above:
        fired.append(f"drift {seen.drift:.4g} is above {spec.drift_above:.4g}")
    return fired


def _schedule(expr: str, after: datetime, now: datetime) -> tuple[datetime | None, int, datetime]:
    """(the latest schedule time in (after, now] or None, how many there were, the first
    time after now)."""
    first = croniter(expr, after).get_next(datetime)
    # Times fall on whole minutes: the latest one <= now is the previous one before the
    # next second of now's minute.
    minute = now.replace(second=0, microsecond=0)
    following = croniter(expr, minute).get_next(datetime)
    if first > now:
        return None, 0, following
    latest = croniter(expr, minute + timedelta(seconds=1)).get_prev(datetime)
    count, it = 1, croniter(expr, first)
    while count < MAX_COUNTED_MISSED and it.get_next(datetime) <= latest:
        count += 1
    return latest, count, following


def schedule_times(
    expr: str, after: datetime, now: datetime
) -> tuple[datetime | None, int, datetime]:
    """(the latest time of cron `expr` in (after, now] or None, how many there were, the
    first time after now): the schedule arithmetic of `decide`, for other schedules
    (continuous evaluation) that run a missed time once."""
    return _schedule(expr, _utc(after), _utc(now))


def _utc(when: datetime) -> datetime:
    if when.tzinfo is None:
        raise ValueError(f"{when}: a naive time; pass timezone-aware times (UTC)")
    return when.astimezone(timezone.utc)


def _seconds(span: timedelta) -> str:
    total = int(span.total_seconds())
    hours, rest = divmod(total, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


# --------------------------------------------------------------------------------------
# concurrency and history
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConcurrencyDecision:
    create: bool
    delete: tuple[str, ...] = ()
    """Active runs to delete first (Replace)."""
    reason: str = ""


def concurrency(policy: ConcurrencyPolicy, active: Sequence[str]) -> ConcurrencyDecision:
    """What a decided start does given the retraining runs still `active` (names)."""
    if not active:
        return ConcurrencyDecision(True, reason="no retraining run is active")
    names = ", ".join(active)
    if policy == "Forbid":
        return ConcurrencyDecision(
            False, reason=f"{names} still running (concurrencyPolicy Forbid): start nothing"
        )
    if policy == "Replace":
        return ConcurrencyDecision(
            True, tuple(active), f"replacing {names} (concurrencyPolicy Replace)"
        )
    if policy == "Allow":
        return ConcurrencyDecision(True, reason=f"beside {names} (concurrencyPolicy Allow)")
    raise ValueError(f"concurrencyPolicy: {policy!r} is not Forbid, Replace or Allow")


Outcome = Literal["Succeeded", "Failed", "Active"]


@dataclass(frozen=True)
class PastRun:
    name: str
    created: datetime
    outcome: Outcome


@dataclass(frozen=True)
class HistoryLimit:
    successful: int = 3
    failed: int = 1
    protected: frozenset[str] = field(default_factory=frozenset)
    """Runs whose models are served (champion, challenger): never removed."""


def runs_to_delete(runs: Iterable[PastRun], limit: HistoryLimit) -> list[str]:
    """The finished runs beyond the history limit, oldest first. Protected runs do not
    count against the limit."""
    runs = list(runs)
    doomed: list[PastRun] = []
    for outcome, keep in (("Succeeded", limit.successful), ("Failed", limit.failed)):
        mine = sorted(
            (r for r in runs if r.outcome == outcome and r.name not in limit.protected),
            key=lambda r: (r.created, r.name),
            reverse=True,
        )
        doomed += mine[max(0, keep) :]
    return [r.name for r in sorted(doomed, key=lambda r: (r.created, r.name))]
