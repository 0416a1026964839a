"""The admission webhook's decision (admission.review), on plain objects: what a CREATE
or an UPDATE of a TrainingRun gets from the API server's point of view."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubetrain_api import v1alpha1 as api
from kubetrain_api import validation
from kubetrain_api.validation import Limits
from kubetrain_operator import admission, stored_spec
from kubetrain_operator.settings import OperatorSettings
from tests.api.test_invalid_corpus import CASES, load
from tests.support.runs import quickstart

RULE_CASES = sorted(name for name, (layer, _) in CASES.items() if layer == "rules")


def stored(status: dict[str, Any] | None = None, **spec_changes: Any) -> dict[str, Any]:
    """The quickstart as the API server holds it, with a status."""
    body = quickstart("run", **spec_changes)
    body["metadata"].update(namespace="team", uid="u-1", generation=1)
    body["status"] = status or {}
    return body


LIMITS = Limits()
RUNNING = {"phase": "Running", "attempts": 1}


def edited(body: dict[str, Any], **spec_changes: Any) -> dict[str, Any]:
    new = copy.deepcopy(body)
    new["metadata"]["generation"] += 1
    for path, value in spec_changes.items():
        node = new["spec"]
        *parents, leaf = path.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return new


def paths(errors: list[validation.FieldError]) -> list[str]:
    return [e.path for e in errors]


def test_a_valid_create_is_admitted() -> None:
    assert admission.review(None, stored(), LIMITS) == []


@pytest.mark.parametrize("name", RULE_CASES)
def test_a_create_is_refused_for_what_kubetrain_validate_refuses(name: str) -> None:
    doc = load(name)
    assert isinstance(doc, dict)
    expected = validation.validate_document(doc)
    assert expected, name
    assert admission.review(None, doc, LIMITS) == expected
    assert CASES[name][1] in admission.refusal(expected)


def test_the_installation_caps_apply() -> None:
    body = stored(resources__workers=4, resources__gpusPerWorker=8)
    body["spec"]["hyperparameters"]["globalBatchSize"] = 32
    body["spec"]["hyperparameters"]["microBatchSize"] = 1
    assert admission.review(None, body, LIMITS) == []
    errors = admission.review(None, body, Limits(max_gpus_per_run=16))
    assert paths(errors) == ["spec.resources.gpusPerWorker"]


def test_an_immutable_edit_of_an_active_run_is_refused_naming_the_field() -> None:
    old = stored(RUNNING)
    new = edited(old, hyperparameters__learningRate=0.5)
    errors = admission.review(old, new, LIMITS)
    assert paths(errors) == ["spec.hyperparameters.learningRate"]
    assert "cannot change while the run is active" in admission.refusal(errors)


@pytest.mark.parametrize(
    "status",
    [
        {},  # not started
        {"phase": "Pending", "attempts": 0},
        {"phase": "Succeeded", "attempts": 1},
        {"phase": "Failed", "attempts": 3},
    ],
)
def test_a_run_that_is_not_active_may_change_any_field(status: dict[str, Any]) -> None:
    old = stored(status)
    assert admission.review(old, edited(old, hyperparameters__learningRate=0.5), LIMITS) == []


def test_mutable_fields_of_an_active_run_may_change() -> None:
    old = stored(RUNNING)
    new = edited(old, runPolicy__backoffLimit=7, runPolicy__suspend=True)
    assert admission.review(old, new, LIMITS) == []


@pytest.mark.parametrize(
    ("suspend", "status", "open_"),
    [
        (True, RUNNING, True),  # being suspended: the next attempt goes where it says
        (False, {"phase": "Suspended", "attempts": 1}, True),  # resumed in this edit
        (False, {**RUNNING, "conditions": [{"type": "ClusterReady", "reason": "Resuming"}]}, True),
        (False, RUNNING, False),
    ],
)
def test_placement_is_open_while_a_run_has_no_pods(
    suspend: bool, status: dict[str, Any], open_: bool
) -> None:
    spec = api.TrainingRunSpec.model_validate(stored(runPolicy__suspend=suspend)["spec"])
    assert stored_spec.placement_open(spec, status) is open_


def test_an_invalid_edit_of_an_active_run_names_every_problem() -> None:
    old = stored(RUNNING)
    new = edited(old, hyperparameters__globalBatchSize=7)
    assert paths(admission.review(old, new, LIMITS)) == [
        "spec.hyperparameters.globalBatchSize",
        "spec.hyperparameters.globalBatchSize",
    ]


def test_metadata_edits_are_admitted_even_on_an_invalid_stored_spec() -> None:
    # A run stored before the webhook (or before a rule got stricter) keeps its invalid
    # spec; labelling it, or removing a finalizer so it can go, must still work.
    old = stored(RUNNING, hyperparameters__globalBatchSize=7)
    assert admission.review(None, old, LIMITS)
    new = copy.deepcopy(old)
    new["metadata"]["labels"] = {"team": "ml"}
    new["metadata"]["finalizers"] = []
    assert admission.review(old, new, LIMITS) == []
    # Changing the spec, though, must make it valid.
    assert admission.review(old, edited(old, runPolicy__backoffLimit=1), LIMITS)


def test_an_unreadable_stored_spec_is_not_compared() -> None:
    old = stored(RUNNING)
    old["spec"]["removedInThisVersion"] = True
    old["spec"]["model"] = "not an object"
    new = stored(RUNNING)
    assert admission.review(old, new, LIMITS) == []


def test_webhook_settings_come_all_or_none(monkeypatch: pytest.MonkeyPatch) -> None:
    assert OperatorSettings.from_env().webhook_port is None
    monkeypatch.setenv("KUBETRAIN_WEBHOOK_PORT", "9443")
    with pytest.raises(ValueError, match="KUBETRAIN_WEBHOOK_CERT_FILE, KUBETRAIN_WEBHOOK_KEY"):
        OperatorSettings.from_env()
    monkeypatch.setenv("KUBETRAIN_WEBHOOK_CERT_FILE", "/tls/tls.crt")
    monkeypatch.setenv("KUBETRAIN_WEBHOOK_KEY_FILE", "/tls/tls.key")
    settings = OperatorSettings.from_env()
    assert (settings.webhook_port, settings.webhook_cert_file, settings.webhook_key_file) == (
        9443,
        "/tls/tls.crt",
        "/tls/tls.key",
    )


def test_a_suspended_run_may_move() -> None:
    old = stored({"phase": "Suspended", "attempts": 1}, runPolicy__suspend=True)
    new = edited(old, resources__nodeSelector={"pool": "a100"}, runPolicy__suspend=False)
    assert admission.review(old, new, LIMITS) == []
    running = stored(RUNNING)
    moved = edited(running, resources__nodeSelector={"pool": "a100"})
    assert paths(admission.review(running, moved, LIMITS)) == ["spec.resources.nodeSelector.pool"]
