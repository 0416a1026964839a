"""Edits of an active run and upgrade safety, as pure functions (stored_spec.py, status.py).

The fixture tests/operator/fixtures/stored-spec-v0.1.0.json holds runs resolved and stored
by kubetrain 0.1.0: every later operator must keep reading them. The rule for defaults
(stored_spec.py): the user's spec is re-resolved with the stored defaults, so a field the
user left out keeps the stored value and a default changed by an upgrade is no edit.
"""

from __future__ import annotations

import copy
import json
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetrain_api import v1alpha1 as api
from kubetrain_api import validation
from kubetrain_api.validation import FieldError
from kubetrain_operator import stored_spec
from kubetrain_operator.status import SPEC_CHANGE_REFUSED, Observed, compute_status

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "operator" / "fixtures" / "stored-spec-v0.1.0.json"
EXAMPLES = ("quickstart", "finetune-lora-gpu")
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


@cache
def _fixture() -> dict[str, Any]:
    return dict(json.loads(FIXTURE.read_text())["runs"])


def stored_doc(stem: str) -> dict[str, Any]:
    """The run document kubetrain 0.1.0 stored for examples/<stem>.yaml (a fresh copy)."""
    return copy.deepcopy(_fixture()[stem])


def written(stem: str) -> dict[str, Any]:
    """examples/<stem>.yaml as the user wrote it (and the API server keeps it)."""
    (doc,) = validation.load_documents((ROOT / "examples" / f"{stem}.yaml").read_text())
    return dict(doc)


def read(doc: dict[str, Any], current: api.TrainingRunSpec) -> api.TrainingRunSpec:
    spec, notes = stored_spec.read(yaml.safe_dump(doc), current)
    assert spec is not None, notes
    return spec


def with_0_1_0_defaults(current: api.TrainingRunSpec) -> api.TrainingRunSpec:
    """current with the defaults 0.1.0 resolved and stored where they have changed since; a
    stored run keeps them. sharedMemory was 2Gi; it is derived from the worker's memory now."""
    if current.resources.shared_memory is not None:
        return current
    resources = current.resources.model_copy(update={"shared_memory": "2Gi"})
    return current.model_copy(update={"resources": resources})


@pytest.mark.parametrize("stem", EXAMPLES)
def test_a_spec_stored_by_0_1_0_reads_as_it_was_and_is_no_edit(stem: str) -> None:
    user = written(stem)
    current = validation.parse(user).spec
    spec, notes = stored_spec.read(yaml.safe_dump(stored_doc(stem)), current)
    assert notes == []
    expected = with_0_1_0_defaults(current)
    assert spec == expected
    assert stored_spec.user_edits(spec, current, user["spec"], suspended=False) == []
    assert stored_spec.effective(spec, current, suspended=False) == expected


def test_removed_renamed_and_added_fields_of_a_stored_spec_are_read_compatibly() -> None:
    user = written("quickstart")
    current = validation.parse(user).spec
    doc = stored_doc("quickstart")
    spec = doc["spec"]
    spec["resources"]["gpuType"] = "a100"  # a field since removed
    spec["distributed"]["reshardAfterFwd"] = spec["distributed"].pop("reshardAfterForward")
    del spec["checkpoint"]["resume"]  # a field added since
    del spec["secrets"]  # a section added since
    spec["checkpoint"]["keepLast"] = 5000  # a bound tightened since: the run's value is used

    stored, notes = stored_spec.read(yaml.safe_dump(doc), current)

    assert stored == with_0_1_0_defaults(current)
    assert any(n.startswith("spec.resources.gpuType: ignored") for n in notes), notes
    assert any(n.startswith("spec.distributed.reshardAfterFwd: ignored") for n in notes), notes
    assert any(n.startswith("spec.checkpoint.keepLast:") for n in notes), notes
    assert stored_spec.user_edits(stored, current, user["spec"], suspended=False) == []


def test_a_default_changed_since_the_run_started_is_no_edit_and_stays() -> None:
    """The run stored sharedMemory 1Gi (an older default; the user never set it); this
    operator derives it. Not an edit, and the run goes on with 1Gi."""
    user = written("quickstart")
    current = validation.parse(user).spec
    assert "sharedMemory" not in user["spec"]["resources"]
    doc = stored_doc("quickstart")
    doc["spec"]["resources"]["sharedMemory"] = "1Gi"
    doc["spec"]["hyperparameters"]["adamBeta2"] = 0.999
    stored = read(doc, current)

    assert stored_spec.user_edits(stored, current, user["spec"], suspended=False) == []
    # (today's comparison of the resolved specs took both for edits)
    assert [e.path for e in validation.immutable_changes(stored, current)] == [
        "spec.hyperparameters.adamBeta2",
        "spec.resources.sharedMemory",
    ]
    kept = stored_spec.effective(stored, current, suspended=False)
    assert kept.resources.shared_memory == "1Gi"
    assert kept.hyperparameters.adam_beta2 == 0.999


def test_what_the_user_sets_is_compared_with_the_stored_spec() -> None:
    user = written("finetune-lora-gpu")
    stored = validation.parse(user).spec
    edited = copy.deepcopy(user)
    edited["spec"]["hyperparameters"]["learningRate"] = 0.5  # set: an edit
    edited["spec"]["resources"]["nodeSelector"] = {}  # a map emptied: an edit
    edited["spec"]["runPolicy"]["backoffLimit"] = 7  # may change while running
    current = validation.parse(edited).spec

    refused = stored_spec.user_edits(stored, current, edited["spec"], suspended=False)

    assert refused[0].path == "spec.hyperparameters.learningRate"
    assert {e.path for e in refused[1:]} == {
        f"spec.resources.nodeSelector.{k}" for k in user["spec"]["resources"]["nodeSelector"]
    }
    kept = stored_spec.effective(stored, current, suspended=False)
    assert kept.hyperparameters.learning_rate == stored.hyperparameters.learning_rate
    assert kept.resources.node_selector == stored.resources.node_selector
    assert kept.run_policy.backoff_limit == 7


def test_placement_may_change_while_suspended_and_nothing_else() -> None:
    old = validation.parse(written("finetune-lora-gpu")).spec
    doc = written("finetune-lora-gpu")
    resources = doc["spec"]["resources"]
    resources["nodeSelector"] = {"pool": "b"}
    resources["tolerations"] = [{"key": "pool", "operator": "Exists"}]
    resources["priorityClassName"] = "high"
    resources["queueName"] = "team-b"
    doc["spec"]["hyperparameters"]["learningRate"] = 0.5
    new = validation.parse(doc).spec

    assert [e.path for e in validation.immutable_changes(old, new, suspended=True)] == [
        "spec.hyperparameters.learningRate"
    ]
    running = {e.path for e in validation.immutable_changes(old, new, suspended=False)}
    assert {
        "spec.resources.nodeSelector.pool",
        "spec.resources.tolerations",
        "spec.resources.priorityClassName",
        "spec.resources.queueName",
        "spec.hyperparameters.learningRate",
    } <= running
    kept = stored_spec.effective(old, new, suspended=True)
    assert kept.resources.node_selector == {"pool": "b"}
    assert kept.resources.queue_name == "team-b"
    assert kept.hyperparameters.learning_rate == old.hyperparameters.learning_rate


def _decide(refused: list[FieldError], previous: dict[str, Any]) -> Any:
    run = validation.parse(written("quickstart"))
    return compute_status(
        Observed(
            run=run, generation=3, now=NOW, attempt=1, previous=previous, refused_changes=refused
        )
    )


def _condition(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == SPEC_CHANGE_REFUSED)


def test_a_refused_edit_is_a_condition_and_one_warning_and_clears_when_reverted() -> None:
    running = {"phase": "Running", "attempts": 1, "startTime": "2026-01-01T00:00:00Z"}
    refused = [FieldError("spec.resources.workers", "cannot change while the run is active")]

    first = _decide(refused, running)

    assert first.status["phase"] != "Failed"
    found = _condition(first.status)
    assert (found["status"], found["reason"], found["observedGeneration"]) == (
        "True",
        "ImmutableFieldChanged",
        3,
    )
    assert found["message"].startswith("spec.resources.workers: cannot change")
    assert [(e.type, e.reason) for e in first.events if e.reason == SPEC_CHANGE_REFUSED] == [
        ("Warning", SPEC_CHANGE_REFUSED)
    ]
    again = _decide(refused, first.status)
    assert again.status == first.status
    assert not [e for e in again.events if e.reason == SPEC_CHANGE_REFUSED]

    reverted = _decide([], first.status)
    assert _condition(reverted.status)["status"] == "False"
    never = _decide([], running).status["conditions"]
    assert not any(c["type"] == SPEC_CHANGE_REFUSED for c in never)  # absent stays absent


def test_an_invalid_edit_is_refused_as_invalid() -> None:
    running = {"phase": "Running", "attempts": 1, "startTime": "2026-01-01T00:00:00Z"}
    invalid = [FieldError("spec.env[0].name", "RANK is reserved: kubetrain sets it")]

    decision = _decide(invalid, running)

    assert decision.status["phase"] != "Failed"
    found = _condition(decision.status)
    assert (found["status"], found["reason"]) == ("True", "InvalidSpec")
    assert found["message"].startswith("spec.env[0].name: RANK is reserved")
