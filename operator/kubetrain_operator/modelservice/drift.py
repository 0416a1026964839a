"""Prompt drift in a ModelService's status: the router computes it per variant (its latest
prompts against the training summary the variant's engine serves; route/drift.py) and
reports it in /stats; here it becomes status.variants[].drift and the Drifted condition.
Pure, no I/O.

The router's counts are read while an experiment runs (since it began) and, for drift,
whenever the service has spec.retraining or spec.evaluation, over the last WINDOW (its
start rounded down to WINDOW_STEP, so the router's per-window cache serves repeated looks),
every LOOK_SECONDS.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from kubetrain_api import modelservice as ms
from kubetrain_api.routing import RouterStats

DRIFTED = "Drifted"
WINDOW = timedelta(hours=24)
WINDOW_STEP = timedelta(minutes=5)
LOOK_SECONDS = 60.0
"""Without an experiment running, how often the drift is read again."""


def wants_stats(spec: ms.ModelServiceSpec) -> bool:
    """Whether the service's drift is worth reading the router's /stats for."""
    return spec.retraining is not None or spec.evaluation is not None


def window_start(now: datetime) -> datetime:
    """The start of the drift window for a look at `now`."""
    start = (now - WINDOW).timestamp()
    step = WINDOW_STEP.total_seconds()
    return datetime.fromtimestamp(start - start % step, timezone.utc)


def variant_drift(
    stats: RouterStats | None, problem: str | None, name: str, old: ms.DriftStatus | None
) -> ms.DriftStatus | None:
    """The variant's drift from the router's counts. Counts asked for but unreadable
    (`problem`) keep the last reading; counts not asked for clear it."""
    if stats is None:
        return old if problem is not None else None
    counts = stats.variants.get(name)
    report = counts.drift if counts is not None else None
    if report is None:
        return None
    jsd, psi = report.unigram_jsd, report.length_psi
    return ms.DriftStatus(
        unigram_jsd=None if jsd is None else min(1.0, max(0.0, jsd)),
        length_psi=None if psi is None else max(0.0, psi),
        prompts=max(0, report.prompts),
        drifted=report.drifted,
    )


def unigram_jsd_of(status: Mapping[str, Any], variant: str | None) -> float | None:
    """A variant's word drift in a stored status (the retraining trigger's `driftAbove`
    compares the champion's); None when unknown or unreadable."""
    for shown in status.get("variants") or []:
        if isinstance(shown, Mapping) and shown.get("name") == variant:
            value = (shown.get("drift") or {}).get("unigramJsd")
            return float(value) if isinstance(value, (int, float)) else None
    return None


def drifted_condition(
    variants: Sequence[ms.VariantStatus], present: bool
) -> tuple[bool, str, str] | None:
    """(status, reason, message) of the Drifted condition; None to leave it out (no
    variant measured and the condition not there before)."""
    measured = [v for v in variants if v.drift is not None and v.drift.unigram_jsd is not None]
    if not measured:
        if not present:
            return None
        return False, "NotMeasured", "no variant's prompt drift is known now"
    drifted = [v for v in measured if v.drift is not None and v.drift.drifted]
    shown = drifted or measured
    message = "; ".join(_describe(v) for v in shown)
    if drifted:
        return True, "PromptDrift", f"prompts drifted from the training data: {message}"
    return False, "NoDrift", message


def _describe(v: ms.VariantStatus) -> str:
    d = v.drift
    assert d is not None
    return (
        f"{v.name}: unigram JSD {d.unigram_jsd or 0.0:.3f}, length PSI "
        f"{d.length_psi or 0.0:.3f} over {d.prompts or 0} prompts"
    )
