"""The retraining loop's pure step (modelservice/retraining.py) on examples/
modelservice-retraining.yaml: a trigger starts an export, the export's snapshot starts a
TrainingRun from the champion, the run's model joins as the challenger, the experiment's
decision promotes or rolls it back; concurrency, history and the effective spec. The
whole loop on real pods is tests/e2e's `test_the_model_keeps_improving_from_its_users`.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from kubetrain_api import contract, routing
from kubetrain_api import modelservice as ms
from kubetrain_api.documents import parse_document
from kubetrain_api.validation import load_documents
from kubetrain_operator.modelservice import retraining
from kubetrain_operator.modelservice.sources import ModelSource
from kubetrain_operator.settings import OperatorSettings
from tests.operator.test_builders import restricted_violations

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "modelservice-retraining.yaml"
UID = "7d2c6a1e-1111-4222-8333-444455556666"
T0 = datetime(2027, 3, 1, 12, 0, tzinfo=timezone.utc)
CHAMPION = ModelSource("helper-v1-step30", claim="helper-v1-storage", sub_path="helper-v1/model")
SNAPSHOT = {"id": "5f0c1d2e3a4b", "uri": "/snapshots/helper/5f0c1d2e3a4b", "sha256": "ab" * 32,
            "sft": 12, "preferences": 3, "binary": 40}  # fmt: skip


def example(**retraining: Any) -> ms.ModelService:
    (doc,) = [d for d in load_documents(EXAMPLE.read_text()) if d["kind"] == "ModelService"]
    doc["metadata"]["namespace"] = "team-a"
    doc["spec"]["retraining"] |= retraining
    service = parse_document(doc)
    assert isinstance(service, ms.ModelService)
    return service


def view(
    service: ms.ModelService | None = None,
    status: ms.RetrainingStatus | None = None,
    now: datetime = T0,
    **seen: Any,
) -> retraining.RetrainingView:
    return retraining.RetrainingView(
        service=service or example(),
        uid=UID,
        now=now,
        created=T0 - timedelta(hours=1),
        previous=status or ms.RetrainingStatus(),
        champion_model=seen.pop("champion_model", CHAMPION),
        champion_version="helper-v1-step30",
        **seen,
    )


def run_body(phase: str, gate: bool | None = None, **model: Any) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if gate is not None:
        status["evaluation"] = {"gate": {"passed": gate, "failures": [] if gate else ["x"]}}
    if model:
        status["model"] = model
    return {"metadata": {"name": "r"}, "status": status}


def finished_export(message: str | None) -> dict[str, Any]:
    return {"status": {"succeeded": 1}, "message": message}


def test_enough_feedback_starts_an_export_once() -> None:
    plan = retraining.step(view(new_feedback=39))
    assert plan.actions == []
    assert plan.status.runs == []
    assert plan.status.champion == ms.ServedModel(
        training_run="helper-v1",
        model_uri="pvc://helper-v1-storage/helper-v1/model",
        model_version="helper-v1-step30",
    )

    plan = retraining.step(view(status=plan.status, new_feedback=40))
    assert plan.actions == [retraining.CreateExportJob("helper-retrain-1")]
    (run,) = plan.status.runs
    assert (run.name, run.outcome, run.start_time) == ("helper-retrain-1", "Exporting", T0)
    assert run.reasons == ["40 new feedback records (at least 40)"]
    assert plan.status.last_run_time == T0
    assert [e.reason for e in plan.events] == ["RetrainingTriggered"]

    # The Job is there and running: nothing new (Forbid), however much feedback comes.
    later = T0 + timedelta(hours=2)
    again = retraining.step(
        view(status=plan.status, now=later, new_feedback=500, export_jobs={run.name: {}})
    )
    assert again.actions == []
    assert [r.outcome for r in again.status.runs] == ["Exporting"]


def test_no_champion_model_no_run() -> None:
    plan = retraining.step(view(new_feedback=1000, champion_model=None))
    assert plan.actions == []
    assert plan.status.runs == []


def exporting() -> ms.RetrainingStatus:
    plan = retraining.step(view(new_feedback=40))
    return plan.status


def test_the_snapshot_starts_a_run_from_the_champion() -> None:
    status = exporting()
    plan = retraining.step(
        view(status=status, export_jobs={"helper-retrain-1": finished_export(json.dumps(SNAPSHOT))})
    )
    (action,) = plan.actions
    assert isinstance(action, retraining.CreateRun)
    body = action.body
    assert body["metadata"]["name"] == "helper-retrain-1"
    assert body["metadata"]["labels"][contract.LABEL_MODELSERVICE] == "helper"
    (owner,) = body["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("ModelService", UID, True)
    spec = body["spec"]
    # Training goes on from the champion's model, not the template's.
    assert spec["model"]["source"] == "pvc://helper-v1-storage/helper-v1/model"
    assert spec["model"]["init"] == "pretrained"
    assert [s["name"] for s in spec["data"]["sources"]] == ["instructions", "feedback"]
    feedback = spec["data"]["sources"][1]
    assert feedback == {
        "name": "feedback",
        "uri": f"pvc://feedback-snapshots/helper/{SNAPSHOT['id']}/{contract.SNAPSHOT_SFT_FILE}",
        "format": "chat",
        "weight": 20.0,
        **{k: v for k, v in feedback.items() if k not in ("name", "uri", "format", "weight")},
    }
    assert spec["hyperparameters"]["maxSteps"] == 80  # the template as written
    (run,) = plan.status.runs
    assert run.outcome == "Training"
    assert run.snapshot == ms.FeedbackSnapshotStatus.model_validate(SNAPSHOT)
    assert [e.reason for e in plan.events] == ["RetrainingStarted"]
    # The run is a valid TrainingRun.
    from kubetrain_api.validation import validate_document

    assert validate_document({**body, "metadata": {"name": "helper-retrain-1"}}) == []


def test_an_export_without_a_snapshot_fails_the_run() -> None:
    for message in (None, "not json", json.dumps({"id": 3}), "x" * 5000, "{}"):
        plan = retraining.step(
            view(status=exporting(), export_jobs={"helper-retrain-1": finished_export(message)})
        )
        assert plan.actions == []
        (run,) = plan.status.runs
        assert run.outcome == "Failed", message
        assert "no snapshot" in (run.message or "")
    failed = retraining.step(
        view(status=exporting(), export_jobs={"helper-retrain-1": {"status": {"failed": 2}}})
    )
    assert failed.status.runs[0].outcome == "Failed"
    assert [e.reason for e in failed.events] == ["RetrainingFailed"]


def training() -> ms.RetrainingStatus:
    jobs = {"helper-retrain-1": finished_export(json.dumps(SNAPSHOT))}
    return retraining.step(view(status=exporting(), export_jobs=jobs)).status


def test_a_succeeded_run_joins_as_the_challenger() -> None:
    status = training()
    running = retraining.step(view(status=status, runs={"helper-retrain-1": run_body("Running")}))
    assert running.status.challenger is None
    assert running.status.runs[0].outcome == "Training"

    model = {"uri": "pvc://helper-retrain-1-storage/m", "version": "helper-retrain-1-step80",
             "generation": 2}  # fmt: skip
    done = run_body("Succeeded", gate=True, **model)
    plan = retraining.step(view(status=status, runs={"helper-retrain-1": done}))
    assert plan.status.challenger == ms.ServedModel(
        training_run="helper-retrain-1",
        model_uri=model["uri"],
        model_version=model["version"],
        generation=2,
    )
    assert plan.status.runs[0].outcome == "Challenging"
    assert plan.new_experiment
    assert [e.reason for e in plan.events] == ["ChallengerJoined"]

    # Its engines start with no traffic (the router would send users to no endpoints)...
    starting = retraining.effective_spec(example(), plan.status, challenger_ready=False)
    assert [(v.name, v.weight) for v in starting.spec.variants] == [
        ("live", 100),
        ("challenger", 0),
    ]
    # ...then the champion at 80%, the challenger at 20%, compared.
    served = retraining.effective_spec(example(), plan.status, challenger_ready=True)
    assert [(v.name, v.weight) for v in served.spec.variants] == [("live", 80), ("challenger", 20)]
    assert served.spec.variants[1].source.training_run == "helper-retrain-1"
    assert served.spec.variants[1].resources == served.spec.variants[0].resources
    assert served.spec.experiment is not None
    assert (served.spec.experiment.control, served.spec.experiment.treatment) == (
        "live",
        "challenger",
    )
    assert served.spec.experiment.min_samples_per_variant == 20  # the spec's settings


def test_a_failed_or_ungated_run_never_serves() -> None:
    for body in (run_body("Failed"), run_body("Succeeded", gate=False, uri="pvc://x/m"), None):
        plan = retraining.step(view(status=training(), runs={"helper-retrain-1": body}))
        assert plan.status.challenger is None
        assert plan.status.runs[0].outcome == "Failed"
        served = retraining.effective_spec(example(), plan.status)
        assert [v.name for v in served.spec.variants] == ["live"]
        assert served.spec.experiment is None  # nothing to compare


def challenging() -> ms.RetrainingStatus:
    done = run_body("Succeeded", gate=True, uri="pvc://c/m", version="c-step80", generation=2)
    return retraining.step(view(status=training(), runs={"helper-retrain-1": done})).status


def decided(
    decision: str, winner: str, applied: bool = True, start: datetime = T0
) -> dict[str, Any]:
    return {"control": "live", "treatment": "challenger", "decision": decision,
            "winner": winner, "applied": applied, "reason": "users preferred it",
            "startTime": start.isoformat()}  # fmt: skip


def test_a_winning_challenger_becomes_the_champion() -> None:
    status = challenging()
    waiting = retraining.step(view(status=status, experiment={"decision": "Undecided"}))
    assert waiting.status.challenger is not None
    not_applied = retraining.step(
        view(status=status, experiment=decided("Promote", "challenger", applied=False))
    )
    assert not_applied.status.challenger is not None  # onDecision lets a person decide
    # An earlier challenger's decided experiment (still shown) decides nothing for this one.
    earlier = decided("Promote", "challenger", start=T0 - timedelta(days=1))
    assert retraining.step(view(status=status, experiment=earlier)).status.challenger is not None

    plan = retraining.step(view(status=status, experiment=decided("Promote", "challenger")))
    assert plan.status.champion is not None
    assert plan.status.champion.training_run == "helper-retrain-1"
    assert plan.status.champion.generation == 2
    assert plan.status.challenger is None
    assert plan.status.runs[0].outcome == "Promoted"
    assert plan.new_experiment
    assert [e.reason for e in plan.events] == ["ChallengerPromoted"]

    # The swap without a dropped request: the challenger slot keeps all the traffic while
    # the champion variant rolls to the new model...
    def split(status: ms.RetrainingStatus, ready: bool) -> list[tuple[str, str | None, int | None]]:
        served = retraining.effective_spec(example(), status, champion_ready=ready)
        assert served.spec.experiment is None
        return [(v.name, v.source.training_run, v.weight) for v in served.spec.variants]

    retiring = plan.status
    assert split(retiring, ready=False) == [
        ("live", "helper-retrain-1", 0),
        ("challenger", "helper-retrain-1", 100),
    ]
    # ...then the champion variant takes it all; the slot goes once the router applies that.
    assert split(retiring, ready=True) == [
        ("live", "helper-retrain-1", 100),
        ("challenger", "helper-retrain-1", 0),
    ]
    for ready, weights in ((False, {"live": 0, "challenger": 100}),
                           (True, {"live": 80, "challenger": 20}),
                           (True, None)):  # fmt: skip
        kept = retraining.step(view(status=retiring, champion_ready=ready, router_weights=weights))
        assert kept.status.retiring is not None, (ready, weights)
    done = retraining.step(
        view(status=retiring, champion_ready=True, router_weights={"live": 100, "challenger": 0})
    )
    assert done.status.retiring is None
    assert split(done.status, ready=True) == [("live", "helper-retrain-1", None)]


def test_a_losing_challenger_goes_and_the_champion_stays() -> None:
    plan = retraining.step(view(status=challenging(), experiment=decided("Rollback", "live")))
    assert plan.status.champion is not None
    assert plan.status.champion.training_run == "helper-v1"
    assert plan.status.challenger is None
    assert plan.status.runs[0].outcome == "RolledBack"
    assert plan.status.runs[0].message == "users preferred it"
    # No traffic at once; its objects stay until the router lets go of it.
    served = retraining.effective_spec(example(), plan.status, champion_ready=False)
    assert [(v.name, v.weight) for v in served.spec.variants] == [("live", 100), ("challenger", 0)]
    gone = retraining.step(view(status=plan.status, router_weights={"live": 100, "challenger": 0}))
    assert gone.status.retiring is None


def test_a_new_challenger_waits_for_the_slot() -> None:
    status = training()
    status.retiring = ms.ServedModel(training_run="helper-retrain-0")
    done = run_body("Succeeded", gate=True, uri="pvc://c/m", version="c-step80", generation=2)
    plan = retraining.step(view(status=status, runs={"helper-retrain-1": done}))
    assert plan.status.challenger is None
    assert plan.status.runs[0].outcome == "Training"


def test_replace_deletes_the_active_run_and_starts_anew() -> None:
    service = example(concurrencyPolicy="Replace", triggers={"minNewFeedback": 10})
    status = retraining.step(view(service, new_feedback=10)).status
    later = T0 + timedelta(hours=2)  # past the cooldown
    plan = retraining.step(view(service, status=status, now=later, new_feedback=10))
    assert retraining.Delete("TrainingRun", "helper-retrain-1") in plan.actions
    assert retraining.CreateExportJob("helper-retrain-2") in plan.actions
    assert [(r.name, r.outcome) for r in plan.status.runs] == [
        ("helper-retrain-1", "Replaced"),
        ("helper-retrain-2", "Exporting"),
    ]


def test_the_cooldown_holds_feedback_back_and_suspend_starts_nothing() -> None:
    service = example(triggers={"minNewFeedback": 10, "cooldownSeconds": 3600})
    status = retraining.step(view(service, new_feedback=10)).status
    status.runs[0].outcome = "Failed"  # nothing active
    soon = retraining.step(view(service, status=status, now=T0 + timedelta(minutes=5),
                                new_feedback=10))  # fmt: skip
    assert soon.actions == []
    late = retraining.step(view(service, status=status, now=T0 + timedelta(hours=2),
                                new_feedback=10))  # fmt: skip
    assert late.actions == [retraining.CreateExportJob("helper-retrain-2")]
    suspended = example(triggers={"minNewFeedback": 10}, suspend=True)
    assert retraining.step(view(suspended, new_feedback=99)).actions == []


def test_history_limits_delete_finished_runs_but_never_a_serving_one() -> None:
    status = ms.RetrainingStatus(
        champion=ms.ServedModel(training_run="helper-retrain-1"),
        runs=[
            ms.RetrainingRunStatus(
                name=f"helper-retrain-{i}", start_time=T0 + timedelta(i), outcome=outcome
            )
            for i, outcome in enumerate(
                ["Promoted", "RolledBack", "RolledBack", "RolledBack", "Failed", "Failed"], 1
            )
        ],
    )
    runs = {r.name: {"status": {}} for r in status.runs}
    service = example(successfulRunsHistoryLimit=2, failedRunsHistoryLimit=1)
    plan = retraining.step(view(service, status=status, runs=runs, new_feedback=0))
    deleted = [a.name for a in plan.actions if isinstance(a, retraining.Delete)]
    # The champion's run stays; of the other succeeded, the newest 2; of the failed, 1.
    assert deleted == ["helper-retrain-2", "helper-retrain-5"]


def test_the_export_job() -> None:
    service = example()
    job = retraining.build_export_job(
        service, UID, "team-a", "helper-retrain-3", OperatorSettings()
    )
    assert job["metadata"]["name"] == "helper-feedback-3"
    assert job["metadata"]["ownerReferences"][0]["uid"] == UID
    pod = job["spec"]["template"]
    assert restricted_violations(pod) == []
    (container,) = pod["spec"]["containers"]
    assert container["command"] == [
        "kubetrain", "feedback", "export", "--out", "/snapshots/helper",
        "--result-file", "/dev/termination-log",
    ]  # fmt: skip
    assert container["terminationMessagePath"] == "/dev/termination-log"
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}  # fmt: skip
    assert claims == {"data": "helper-router-db", "snapshots": "feedback-snapshots"}
    env = {e["name"]: e for e in container["env"]}
    assert env[routing.STORE_ENV]["value"] == "/data/router.db"
    # SQLite on a ReadWriteOnce claim: on the router's node.
    (term,) = pod["spec"]["affinity"]["podAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "router"
    assert pod["spec"]["restartPolicy"] == "Never"


def test_drift_of_the_champion_triggers() -> None:
    service = example(triggers={"driftAbove": 0.2})
    assert retraining.step(view(service, champion_drift=0.1)).actions == []
    plan = retraining.step(view(service, champion_drift=0.35))
    assert plan.actions == [retraining.CreateExportJob("helper-retrain-1")]
    assert plan.status.runs[0].reasons == ["drift 0.35 is above 0.2"]


@pytest.mark.parametrize(
    ("method", "data_format", "file"),
    [
        ("dpo", "preference", contract.SNAPSHOT_PREFERENCES_FILE),
        ("kto", "unpaired-preference", contract.SNAPSHOT_BINARY_FILE),
    ],
)
def test_a_preference_template_learns_from_the_snapshots_pairs_or_labels(
    method: str, data_format: str, file: str
) -> None:
    """Feedback is mostly comparisons and thumbs up/down: a dpo template trains on the
    snapshot's pairs, a kto template on its labelled answers (not on the SFT file)."""
    template = example().spec.retraining.template.model_dump(by_alias=True)  # type: ignore[union-attr]
    template["spec"]["method"] = method
    template["spec"]["data"]["sources"] = [
        {"name": "pairs", "uri": "builtin://quickstart-preferences", "format": data_format}
    ]
    service = example(template=template)
    status = retraining.step(view(service=service, new_feedback=40)).status
    plan = retraining.step(
        view(
            service=service,
            status=status,
            export_jobs={"helper-retrain-1": finished_export(json.dumps(SNAPSHOT))},
        )
    )
    (action,) = plan.actions
    assert isinstance(action, retraining.CreateRun)
    feedback = action.body["spec"]["data"]["sources"][-1]
    assert (feedback["uri"], feedback["format"]) == (
        f"pvc://feedback-snapshots/helper/{SNAPSHOT['id']}/{file}",
        data_format,
    )
    from kubetrain_api.validation import validate_document

    assert validate_document({**action.body, "metadata": {"name": "helper-retrain-1"}}) == []
