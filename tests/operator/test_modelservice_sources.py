"""Where a ModelService variant's model is (modelservice/sources.py): a TrainingRun's
exported model on its claim or object store, once it has Succeeded; a uri as given."""

from __future__ import annotations

from typing import Any

from kubetrain_api import contract
from kubetrain_api.modelservice_validation import parse_modelservice
from kubetrain_operator.modelservice.sources import from_training_run, from_uri
from kubetrain_operator.settings import OperatorSettings
from tests.support.runs import example, quickstart

UID = "0123abcd-0000-4000-8000-000000000000"
SETTINGS = OperatorSettings()


def spec(source: dict[str, Any], secrets: dict[str, Any] | None = None) -> Any:
    doc = {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "ModelService",
        "metadata": {"name": "chat"},
        "spec": {"variants": [{"name": "a", "source": source}], "secrets": secrets or {}},
    }
    return parse_modelservice(doc).spec


def stored(run: dict[str, Any], **status: Any) -> dict[str, Any]:
    run = {**run, "metadata": {**run["metadata"], "namespace": "team", "uid": UID}}
    run["status"] = status
    return run


def succeeded(run: dict[str, Any], uri: str) -> dict[str, Any]:
    return stored(run, phase="Succeeded", model={"uri": uri, "version": "qs-step40"})


def test_a_run_on_a_claim_is_mounted_from_its_run_folder() -> None:
    svc = spec({"trainingRun": "qs"})
    folder = contract.run_folder("qs", UID)
    run = succeeded(quickstart("qs"), f"{SETTINGS.storage_mount}/{folder}/model")
    resolution = from_training_run(svc.variants[0], run, SETTINGS)
    assert resolution.message is None
    source = resolution.source
    assert source is not None
    assert (source.claim, source.sub_path) == ("qs-storage", f"{folder}/model")
    assert source.version == "qs-step40"
    assert source.url is None


def test_a_run_on_an_object_store_is_downloaded_with_its_credentials() -> None:
    run = example("pretrain-cpu", "pre")
    storage = run["spec"]["checkpoint"]["storage"]["uri"]
    folder = contract.run_folder("pre", UID)
    svc = spec({"trainingRun": "pre", "version": "pinned"})
    resolution = from_training_run(
        svc.variants[0], succeeded(run, f"{storage}/{folder}/model"), SETTINGS
    )
    source = resolution.source
    assert source is not None
    assert source.url == contract.run_url(storage, folder, contract.MODEL_DIR)
    assert source.object_store_secret == run["spec"]["secrets"]["objectStore"]["name"]
    assert source.version == "pinned"  # the variant's own version wins


def test_runs_without_a_model_to_serve_say_why() -> None:
    variant = spec({"trainingRun": "qs"}).variants[0]
    run = quickstart("qs")
    cases = {
        "not found": None,
        "has not succeeded yet (phase Running)": stored(run, phase="Running"),
        "failed": stored(run, phase="Failed"),
        "did not pass its evaluation gate": stored(
            run,
            phase="Succeeded",
            model={"uri": "/x/model"},
            evaluation={"gate": {"passed": False}},
        ),
        "without exporting a model": stored(run, phase="Succeeded"),
    }
    for words, body in cases.items():
        resolution = from_training_run(variant, body, SETTINGS)
        assert resolution.source is None
        assert resolution.message is not None
        assert words in resolution.message, resolution
    # Waiting is not a problem: a run that will succeed later.
    assert from_training_run(variant, stored(run, phase="Running"), SETTINGS).problem is None
    assert from_training_run(variant, stored(run, phase="Failed"), SETTINGS).problem


def test_a_run_on_local_storage_cannot_be_served() -> None:
    run = quickstart("local")
    run["spec"]["checkpoint"]["storage"] = {"uri": "file:///tmp/runs"}
    variant = spec({"trainingRun": "local"}).variants[0]
    resolution = from_training_run(variant, succeeded(run, "file:///tmp/runs/x/model"), SETTINGS)
    assert resolution.problem is not None
    assert "file://" in resolution.problem


def test_uri_sources() -> None:
    svc = spec({"uri": "pvc://models/chat/v3"})
    source = from_uri(svc.variants[0], svc).source
    assert source is not None
    assert (source.claim, source.sub_path, source.version) == ("models", "chat/v3", "v3")

    svc = spec({"uri": "s3://bucket/chat/v4"}, secrets={"objectStore": {"name": "s3"}})
    source = from_uri(svc.variants[0], svc).source
    assert source is not None
    assert (source.url, source.object_store_secret) == ("s3://bucket/chat/v4", "s3")

    svc = spec(
        {"uri": "hf://org/name", "version": "org-name"}, secrets={"objectStore": {"name": "s3"}}
    )
    source = from_uri(svc.variants[0], svc).source
    assert source is not None
    assert (source.url, source.object_store_secret, source.version) == (
        "hf://org/name",
        None,
        "org-name",
    )
