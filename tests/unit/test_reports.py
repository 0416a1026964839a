"""The trainer -> operator wire models (kubetrain_api.reports): written by the trainer,
read by the operator leniently."""

from __future__ import annotations

import json

from kubetrain_api import contract
from kubetrain_api.reports import ProgressReport, ReportedModel, RunResult, lenient, wire
from kubetrain_api.v1alpha1 import EvaluationStatus, GateResult


def test_lenient_drops_each_bad_field_alone() -> None:
    report = lenient(
        ProgressReport,
        {
            "phase": "Exploding",
            "step": 5,
            "totalSteps": "10",
            "loss": float("nan"),
            "mfu": 0.25,
            "updatedAt": 1.7e9,
            "latestCheckpoint": {"step": True, "path": "/storage/run/checkpoints/step-5"},
            "evaluation": [1, 2],
            "unknown": {"anything": 1},
        },
    )
    assert wire(report) == {
        "step": 5,
        "mfu": 0.25,
        "updatedAt": "2023-11-14T22:13:20Z",
        "latestCheckpoint": {"path": "/storage/run/checkpoints/step-5"},
    }
    assert report.percent_done() is None
    assert lenient(ProgressReport, ["not", "a", "mapping"]) == ProgressReport()


def test_percent_is_capped_and_derived_once() -> None:
    assert lenient(ProgressReport, {"percent": 180}).percent_done() == 100
    assert lenient(ProgressReport, {"step": 30, "totalSteps": 200}).percent_done() == 15


def test_run_result_round_trips_and_fits_the_termination_message() -> None:
    result = RunResult(
        model=ReportedModel(uri="/storage/big/model", version="big-step7"),
        evaluation=EvaluationStatus(
            step=7,
            metrics={f"validation/metric-{i:02d}": i / 3 for i in range(64)},
            gate=lenient(GateResult, {"passed": False, "failures": ["x" * 500] * 40}),
        ),
    )
    message = result.to_message()
    assert len(message.encode()) <= contract.TERMINATION_MESSAGE_LIMIT
    parsed = RunResult.from_message(message)
    assert parsed.model == result.model
    assert parsed.evaluation is not None
    assert parsed.evaluation.gate is not None
    assert parsed.evaluation.gate.passed is False


def test_a_hostile_model_version_or_uri_is_dropped() -> None:
    message = json.dumps({"model": {"uri": "a\nb", "version": "../x"}, "evaluation": "no"})
    assert RunResult.from_message(message) == RunResult(model=ReportedModel())
    assert RunResult.from_message("x" * (contract.TERMINATION_MESSAGE_LIMIT + 1)) == RunResult()
