"""What the trainer reports, into the run's status: the head's /progress
(`ProgressReport`) -> status.progress, status.checkpoints.latest, status.evaluation; the
driver's termination message (`RunResult`) -> status.model, status.evaluation.

Both are parsed with kubetrain_api.reports' models, leniently: a bad or hostile value is
dropped, never copied. What lands in the status is built from the status models
(`Progress`, `CheckpointRef`, `EvaluationStatus`, `ModelStatus`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubetrain_api import v1alpha1 as api
from kubetrain_api.reports import ProgressReport, RunResult, lenient, wire

__all__ = ["copy_progress", "evaluated", "parse_progress", "parse_result"]


def parse_progress(raw: ProgressReport | Mapping[str, Any] | None) -> ProgressReport | None:
    """A report as read (None: the head was unreachable), JSON parsed leniently."""
    if raw is None or isinstance(raw, ProgressReport):
        return raw
    return lenient(ProgressReport, raw)


def copy_progress(status: dict[str, Any], report: ProgressReport | None) -> None:
    """Copy what the head reported; keep the previous values of what it did not (or could
    not: None means the head was unreachable)."""
    if report is None:
        return
    fields = report.model_dump(include=set(api.Progress.model_fields))
    progress = wire(api.Progress.model_validate({**fields, "percent": report.percent_done()}))
    if progress:
        status["progress"] = progress
    latest = wire(report.latest_checkpoint) if report.latest_checkpoint is not None else {}
    if latest:
        status["checkpoints"] = {**(status.get("checkpoints") or {}), "latest": latest}
    evaluation = wire(report.evaluation) if report.evaluation is not None else {}
    if evaluation:
        status["evaluation"] = evaluation


def evaluated(evaluation: Mapping[str, Any]) -> tuple[str, str]:
    """(reason, message) of the Evaluated condition."""
    metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(evaluation.get("metrics", {}).items()))
    message = f"step {evaluation.get('step', '?')}: {metrics or 'no metrics'}"
    gate = evaluation.get("gate") or {}
    if gate.get("passed") is True:
        return "GatePassed", message
    if gate.get("passed") is False:
        return "GateFailed", f"{message}; gate failed: {'; '.join(gate.get('failures', []))}"
    return "Evaluated", message


def parse_result(message: Any) -> dict[str, Any]:
    """`{"model": {uri, version}, "evaluation": {step, metrics, gate}}` from the driver's
    termination message, keeping only well-formed parts. A message that is not such JSON
    (a crash text, a truncated document) gives {}: its text is never copied anywhere."""
    result = RunResult.from_message(message)
    parts = {
        "model": wire(api.ModelStatus.model_validate(result.model.model_dump()))
        if result.model is not None
        else {},
        "evaluation": wire(result.evaluation) if result.evaluation is not None else {},
    }
    return {key: value for key, value in parts.items() if value}
