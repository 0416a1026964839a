"""Retraining triggers (kubetrain_operator.retraining.triggers): cron in UTC, missed
schedules run once, each trigger alone, cooldown, the concurrency policies and the
history limit. Pure functions, real croniter."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from kubetrain_operator.retraining.triggers import (
    HistoryLimit,
    InvalidTrigger,
    Observed,
    PastRun,
    TriggerSpec,
    concurrency,
    decide,
    runs_to_delete,
    validate,
)

UTC = timezone.utc
CREATED = datetime(2026, 3, 1, 0, 0, tzinfo=UTC)
NOTHING = Observed()


def at(day: int, hour: int, minute: int = 0, second: int = 0, month: int = 3) -> datetime:
    return datetime(2026, month, day, hour, minute, second, tzinfo=UTC)


def look(spec: TriggerSpec, now: datetime, last: datetime | None = None, seen=NOTHING):
    return decide(spec, last_run=last, since=CREATED, now=now, seen=seen)


DAILY = TriggerSpec(schedule="30 2 * * *")


def test_schedule_fires_at_its_time_and_names_the_next() -> None:
    before = look(DAILY, at(2, 2, 29, 59), last=at(1, 2, 30))
    assert not before.start
    assert before.next_check == at(2, 2, 30)
    on_time = look(DAILY, at(2, 2, 30), last=at(1, 2, 30))
    assert on_time.start
    assert on_time.missed == 1
    assert on_time.reasons == ("schedule '30 2 * * *' was due at 2026-03-02 02:30 UTC",)
    assert on_time.next_check == at(3, 2, 30)
    # The run it starts becomes the last run: the same time does not fire twice.
    assert not look(DAILY, at(2, 2, 31), last=at(2, 2, 30)).start


def test_without_a_last_run_schedules_count_from_creation() -> None:
    assert not look(DAILY, at(1, 2, 0)).start
    assert look(DAILY, at(1, 2, 30, 1)).start


@pytest.mark.parametrize(
    "day",
    # Europe's (Mar 29) and the US's (Mar 8) spring-forward days, and Europe's fall-back day
    # (Oct 25): in UTC there is no missing or repeated 02:30.
    [(8, 3), (29, 3), (25, 10)],
)
def test_utc_has_no_daylight_saving_jumps(day: tuple[int, int]) -> None:
    d, month = day
    last = at(d, 2, 30, month=month) - timedelta(days=1)
    due = look(DAILY, at(d, 2, 30, month=month), last=last)
    assert due.start
    assert due.missed == 1
    assert due.next_check == at(d, 2, 30, month=month) + timedelta(days=1)


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        decide(DAILY, last_run=None, since=CREATED, now=datetime(2026, 3, 2), seen=NOTHING)


def test_times_in_other_zones_are_read_as_utc() -> None:
    berlin = timezone(timedelta(hours=1))
    # 03:30 in UTC+1 is 02:30 UTC.
    assert look(DAILY, datetime(2026, 3, 2, 3, 30, tzinfo=berlin), last=at(1, 2, 30)).start


def test_missed_schedules_while_away_run_once() -> None:
    hourly = TriggerSpec(schedule="0 * * * *")
    back = look(hourly, at(3, 10, 15), last=at(2, 0, 0))  # away for 34 hours
    assert back.start
    assert back.missed == 34
    assert back.reasons == (
        "schedule '0 * * * *' was due at 2026-03-03 10:00 UTC (34 times missed, run once)",
    )
    assert back.next_check == at(3, 11)
    # After that one run, the next look waits for the next time.
    assert not look(hourly, at(3, 10, 16), last=at(3, 10, 15)).start


def test_a_missed_time_beyond_the_starting_deadline_is_skipped() -> None:
    spec = TriggerSpec(schedule="30 2 * * *", starting_deadline=timedelta(minutes=30))
    late = look(spec, at(2, 4, 0), last=at(1, 2, 30))
    assert not late.start
    assert "beyond the starting deadline" in late.waiting[0]
    assert late.next_check == at(3, 2, 30)
    assert look(spec, at(2, 2, 59), last=at(1, 2, 30)).start


def test_feedback_trigger_alone() -> None:
    spec = TriggerSpec(min_new_feedback=100)
    assert not look(spec, at(2, 0), seen=Observed(new_feedback=99)).start
    fired = look(spec, at(2, 0), seen=Observed(new_feedback=100))
    assert fired.reasons == ("100 new feedback records (at least 100)",)
    assert fired.next_check is None


def test_metric_trigger_alone() -> None:
    spec = TriggerSpec(metric="qa/accuracy", metric_below=0.8)
    assert not look(spec, at(2, 0)).start  # no evaluation yet
    assert not look(spec, at(2, 0), seen=Observed(metric=0.8)).start
    assert look(spec, at(2, 0), seen=Observed(metric=0.79)).reasons == (
        "qa/accuracy 0.79 is below 0.8",
    )


def test_loss_and_perplexity_triggers_fire_above_the_bar() -> None:
    spec = TriggerSpec(metric="perplexity", metric_below=30.0)
    assert not look(spec, at(2, 0), seen=Observed(metric=12.0)).start
    assert look(spec, at(2, 0), seen=Observed(metric=41.5)).reasons == (
        "perplexity 41.5 is above 30",
    )
    held_out = TriggerSpec(metric="held/loss", metric_below=2.0)
    assert look(held_out, at(2, 0), seen=Observed(metric=2.5)).start


def test_drift_trigger_alone() -> None:
    spec = TriggerSpec(drift_above=0.2)
    assert not look(spec, at(2, 0), seen=Observed(drift=0.2)).start
    assert look(spec, at(2, 0), seen=Observed(drift=0.35)).reasons == ("drift 0.35 is above 0.2",)


def test_all_triggers_that_fire_are_named() -> None:
    spec = TriggerSpec(schedule="0 * * * *", min_new_feedback=10, drift_above=0.1)
    both = look(spec, at(2, 5), last=at(2, 3, 30), seen=Observed(new_feedback=10, drift=0.5))
    assert len(both.reasons) == 3


def test_event_triggers_wait_out_the_cooldown_but_schedules_do_not() -> None:
    spec = TriggerSpec(schedule="0 * * * *", metric="accuracy", metric_below=1.0)
    low = Observed(metric=0.5)
    # The quality stays low while the last run trains: no second run within the hour ...
    waiting = look(spec, at(2, 5, 30), last=at(2, 5, 0), seen=low)
    assert not waiting.start
    assert waiting.waiting == ("accuracy 0.5 is below 1: cooling down (30m00s left)",)
    assert look(spec, at(2, 6, 0, 1), last=at(2, 5, 0, 1), seen=NOTHING).start  # the schedule
    assert look(spec, at(2, 6, 1), last=at(2, 5, 0, 30), seen=low).start  # cooled down
    assert look(spec, at(2, 0), seen=low).start  # no run yet: nothing to cool down from


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (TriggerSpec(schedule="61 * * * *"), "spec.retraining.schedule"),
        (TriggerSpec(schedule="0 0 * * * *"), "spec.retraining.schedule"),  # seconds field
        (TriggerSpec(schedule="daily"), "spec.retraining.schedule"),
        (TriggerSpec(schedule="@sometimes"), "spec.retraining.schedule"),
        (TriggerSpec(min_new_feedback=0), "spec.retraining.minNewFeedback"),
        (TriggerSpec(metric="loss"), "spec.retraining.metricBelow"),
        (TriggerSpec(cooldown=timedelta(seconds=-1)), "spec.retraining.cooldownSeconds"),
    ],
)
def test_invalid_specs_name_the_field(spec: TriggerSpec, field: str) -> None:
    errors = validate(spec)
    assert len(errors) == 1
    assert errors[0].startswith(field + ":")
    with pytest.raises(InvalidTrigger, match=field):
        look(spec, at(2, 0))


def test_valid_schedules() -> None:
    for expr in ("*/15 * * * *", "0 3 * * 1-5", "@daily", "@hourly", "0 0 1 * *"):
        assert validate(TriggerSpec(schedule=expr)) == [], expr
    assert look(TriggerSpec(schedule="@daily"), at(2, 0), last=at(1, 0)).start


def test_concurrency_policies() -> None:
    assert concurrency("Forbid", []).create
    forbid = concurrency("Forbid", ["retrain-1"])
    assert not forbid.create
    assert forbid.delete == ()
    replace = concurrency("Replace", ["retrain-1"])
    assert replace.create
    assert replace.delete == ("retrain-1",)
    allow = concurrency("Allow", ["retrain-1"])
    assert allow.create
    assert allow.delete == ()
    with pytest.raises(ValueError, match="concurrencyPolicy"):
        concurrency("Sometimes", ["retrain-1"])  # type: ignore[arg-type]


def test_history_limit_keeps_the_newest_and_never_the_served_or_active() -> None:
    runs = [
        PastRun("r1", at(1, 0), "Succeeded"),  # the champion's run: protected
        PastRun("r2", at(2, 0), "Succeeded"),
        PastRun("r3", at(3, 0), "Failed"),
        PastRun("r4", at(4, 0), "Succeeded"),
        PastRun("r5", at(5, 0), "Failed"),
        PastRun("r6", at(6, 0), "Succeeded"),
        PastRun("r7", at(7, 0), "Active"),
    ]
    limit = HistoryLimit(successful=2, failed=1, protected=frozenset({"r1"}))
    assert runs_to_delete(runs, limit) == ["r2", "r3"]
    assert runs_to_delete(runs, HistoryLimit(successful=0, failed=0)) == [
        "r1",
        "r2",
        "r3",
        "r4",
        "r5",
        "r6",
    ]
    assert runs_to_delete(runs, HistoryLimit(successful=10, failed=10)) == []
