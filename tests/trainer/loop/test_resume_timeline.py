"""The training loop in one process (no Ray): resuming an older step starts a new checkpoint
timeline that supersedes the abandoned one; a LoRA run checkpoints only its adapters, and
its sft evaluation goes through the chat template and a per-dataset gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from kubetrain_api import validation
from kubetrain_trainer.checkpoint import CheckpointManager
from kubetrain_trainer.config import resolve
from kubetrain_trainer.loop import Trainer, WorkerContext
from kubetrain_trainer.prepare import prepare


def spec(*, seed: int, resume: str, lora: bool = False) -> dict:
    doc = {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "timeline"},
        "spec": {
            "model": {"source": "builtin://tiny-llama"},
            "method": "sft" if lora else "pretrain",
            "data": {
                "sources": [
                    {
                        "name": "d",
                        "uri": "builtin://quickstart-instructions"
                        if lora
                        else "builtin://quickstart-corpus",
                        "format": "chat" if lora else "text",
                    }
                ],
                "sequenceLength": 32,
                "validationSplit": 0.1,
            },
            "hyperparameters": {
                "learningRate": 3e-3,
                "globalBatchSize": 4,
                "microBatchSize": 4,
                "maxSteps": 4,
                "seed": seed,
            },
            "resources": {"workers": 1, "cpuPerWorker": 1, "memoryPerWorker": "2Gi"},
            "checkpoint": {"intervalSteps": 2, "keepLast": 5, "resume": resume},
            "evaluation": {"intervalSteps": 100, "maxBatches": 1, "metrics": ["loss"]},
        },
    }
    if lora:
        doc["spec"]["lora"] = {"rank": 2, "alpha": 4, "targetModules": ["q_proj"]}
        doc["spec"]["evaluation"] = {
            "intervalSteps": 100,
            "maxBatches": 1,
            "metrics": ["loss", "accuracy", "f1"],
            "datasets": [
                {
                    "name": "sentiment",
                    "uri": "builtin://quickstart-sentiment",
                    "labels": ["positive", "negative"],
                    "scoring": "loglikelihood-normalized",
                }
            ],
            "gate": [{"metric": "sentiment/f1", "min": 0.0}],
        }
    return doc


def trainer(out: Path, doc: dict) -> Trainer:
    run = validation.parse(doc)
    config = resolve(run, out, use_gpu=False, world_size=1)
    if not (config.data_dir / "summary.json").exists():
        prepare(config, log=lambda _: None)
    return Trainer(config, WorkerContext())


def weights(t: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in t.model.named_parameters()}


@pytest.mark.trainer
def test_resume_from_an_older_step_supersedes_the_abandoned_timeline(tmp_path: Path) -> None:
    first = trainer(tmp_path, spec(seed=1, resume="auto"))
    first.fit()
    old_final = weights(first)
    root = first.config.checkpoint_dir
    assert (root / "latest").read_text() == "step-000004"

    # Resume from step 2 with another seed: the data order differs, so do the weights.
    second = trainer(tmp_path, spec(seed=2, resume="step-2"))
    second.fit()
    new_final = weights(second)
    assert not all(torch.equal(new_final[n], old_final[n]) for n in new_final)

    manager = CheckpointManager(root, keep_last=5)
    latest = manager.latest()
    assert latest is not None
    assert (latest.step, Path(latest.path).name) == (4, "step-000004-t1")
    assert not (root / "step-000004").exists()  # the abandoned step 4 is gone
    assert [Path(i.path).name for i in manager.list_committed()] == [
        "step-000002",
        "step-000004-t1",
    ]
    # `auto` resumes the new step 4, with the second run's tensors.
    third = trainer(tmp_path, spec(seed=3, resume="auto"))
    third.resume()
    assert third.step == 4
    for name, value in weights(third).items():
        assert torch.equal(value, new_final[name]), name


@pytest.mark.trainer
def test_lora_run_checkpoints_adapters_and_gates_on_a_dataset(tmp_path: Path) -> None:
    t = trainer(tmp_path, spec(seed=1, resume="auto", lora=True))
    assert t.shape.n_frozen_params > 0
    result = t.fit()
    assert set(result["metrics"]) >= {"loss", "f1", "sentiment/f1", "sentiment/accuracy"}
    assert result["gate"]["passed"]
    latest = CheckpointManager(t.config.checkpoint_dir, keep_last=5).latest()
    assert latest is not None
    keys = FileSystemReader(latest.path).read_metadata().state_dict_metadata
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys
    assert all("lora_" in k for k in model_keys)
    steps = [json.loads(line) for line in t.config.metrics_path.read_text().splitlines()]
    assert any(e.get("kind") == "checkpoint" for e in steps)
