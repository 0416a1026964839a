"""lineage.json from real exports (training loop in one process, no Ray): a first model
trained from a built-in config, then a second trained from the first on a dataset snapshot;
the chain reads back from the second to the first and their data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetrain_api import contract, validation
from kubetrain_api import v1alpha1 as api
from kubetrain_api.lineage import load_chain, parse_lineage
from kubetrain_trainer.config import resolve
from kubetrain_trainer.lineage import build_lineage
from kubetrain_trainer.local import load_run, termination_summary
from kubetrain_trainer.loop import Trainer, WorkerContext
from kubetrain_trainer.prepare import prepare

UID = "0b6f3a52-9d1c-4e0e-8a7e-5f1d2c3b4a59"


def run_doc(name: str, source: str, data_uri: str, fmt: str, **meta: str) -> dict:
    return {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": name, **meta},
        "spec": {
            "model": {"source": source},
            "method": "pretrain",
            "data": {
                "sources": [{"name": "d", "uri": data_uri, "format": fmt}],
                "sequenceLength": 32,
                "validationSplit": 0.1,
            },
            "hyperparameters": {
                "learningRate": 3e-3,
                "globalBatchSize": 4,
                "microBatchSize": 4,
                "maxSteps": 2,
                "seed": 1,
            },
            "resources": {"workers": 1, "cpuPerWorker": 1, "memoryPerWorker": "2Gi"},
            "checkpoint": {"intervalSteps": 100, "resume": "never"},
            "evaluation": {"intervalSteps": 100, "maxBatches": 1, "metrics": ["loss"]},
        },
    }


def train(out: Path, doc: dict) -> Path:
    config = resolve(validation.parse(doc), out, use_gpu=False, world_size=1)
    prepare(config, log=lambda _: None)
    result = Trainer(config, WorkerContext()).fit()
    return Path(result["model"])


@pytest.mark.trainer
def test_two_generations_record_and_chain_their_lineage(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(contract.IMAGE_ENV, "ghcr.io/kubetrain/trainer:test")
    first = train(
        tmp_path / "gen1",
        run_doc("gen1", "builtin://tiny-llama", "builtin://quickstart-corpus", "text"),
    )
    snapshot = tmp_path / "snapshots" / "snap-7f3a"
    snapshot.mkdir(parents=True)
    lines = [f"feedback example {i}: the answer is {i * 7 % 13} apples" for i in range(80)]
    (snapshot / "sft.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    (snapshot / contract.SNAPSHOT_MANIFEST_FILE).write_text(json.dumps({"id": "7f3a9c"}))
    second = train(
        tmp_path / "gen2",
        run_doc(
            "gen2",
            f"file://{first}",
            f"file://{snapshot}/sft.jsonl",
            "jsonl",
            uid=UID,
            namespace="team-a",
        ),
    )

    one = parse_lineage((first / contract.LINEAGE_FILE).read_text())
    two = parse_lineage((second / contract.LINEAGE_FILE).read_text())
    assert one.generation == 1
    assert one.parent.source == "builtin://tiny-llama"
    assert one.parent.lineage_id is None
    assert one.run.name == "gen1"
    assert one.run.uid is None
    assert one.data[0].uri == "builtin://quickstart-corpus"
    assert one.data[0].sha256
    assert one.data[0].documents
    assert one.data[0].snapshot_id is None
    assert one.image == "ghcr.io/kubetrain/trainer:test"
    assert one.method == "pretrain"
    assert one.step == 2
    assert one.id == one.content_id()

    assert two.generation == 2
    assert two.parent.lineage_id == one.id
    assert two.parent.generation == 1
    assert (two.run.name, two.run.namespace, two.run.uid) == ("gen2", "team-a", UID)
    assert two.data[0].snapshot_id == "7f3a9c"
    assert two.data[0].documents == 80
    assert two.data_fingerprint
    assert two.id == two.content_id() != one.id

    chain = load_chain(str(second))
    assert [link.lineage.id for link in chain if link.lineage] == [two.id, one.id]
    assert all(link.note is None for link in chain)

    # What the operator puts in status.model (`kubectl get tr` shows the generation).
    reported = termination_summary("gen2", {"step": 2, "model": str(second)}).model
    assert reported is not None
    assert (reported.generation, reported.lineage_id) == (2, two.id)
    reported = termination_summary("gen1", {"step": 2, "model": str(first)}).model
    assert reported is not None
    assert reported.generation == 1


def test_the_run_uid_travels_with_the_run_to_the_workers(tmp_path: Path) -> None:
    """`kubetrain run --run-uid` (the head pod) -> metadata.uid -> the driver's payload to
    each Ray Train worker (driver._worker_entry) -> TrainConfig.run_uid -> lineage."""
    path = tmp_path / "run.yaml"
    path.write_text(
        json.dumps(run_doc("r", "builtin://tiny-llama", "builtin://quickstart-corpus", "text"))
    )
    run = load_run(path, run_uid=UID)
    payload = run.model_dump(by_alias=True, exclude_none=True, mode="json")  # as the driver
    config = resolve(api.TrainingRun.model_validate(payload), tmp_path, world_size=1)
    assert config.run_uid == UID
    assert resolve(load_run(path), tmp_path, world_size=1).run_uid is None


def test_unreadable_parent_lineage_and_manifest_are_logged_not_fatal(tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / contract.LINEAGE_FILE).write_text("{garbled")
    snapshot = tmp_path / "snap"
    snapshot.mkdir()
    (snapshot / "a.jsonl").write_text('{"text": "x"}\n')
    (snapshot / contract.SNAPSHOT_MANIFEST_FILE).write_text("[not a manifest")
    doc = run_doc("r", f"file://{parent}", f"file://{snapshot}", "jsonl")
    config = resolve(validation.parse(doc), tmp_path / "out", world_size=1)
    logged: list[str] = []
    record = build_lineage(config, None, step=1, version="0.1.0", log=logged.append)
    assert record.parent.lineage_id is None
    assert record.generation == 1
    assert record.data[0].snapshot_id is None
    assert len(logged) == 2
    assert "parent model's lineage is left out" in logged[0]
    assert "not JSON" in logged[0]
    assert "snapshot manifest left out" in logged[1]
