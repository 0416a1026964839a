"""Fewer host syncs per step: a train step leaves the loss and grad norm on the device, the
loop reads them only at its logging steps, and AdamW is fused when the parameters are on
CUDA. (Counting syncs needs a GPU; these check the contract that avoids them.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kubetrain_api import v1alpha1 as api
from kubetrain_api import validation
from kubetrain_trainer import optim
from kubetrain_trainer.config import resolve
from kubetrain_trainer.loop import Trainer, WorkerContext
from kubetrain_trainer.prepare import prepare


def _trainer(out: Path, max_steps: int) -> Trainer:
    doc = {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "syncs"},
        "spec": {
            "model": {"source": "builtin://tiny-llama", "configOverrides": {"vocab_size": 512}},
            "method": "pretrain",
            "data": {
                "sources": [{"name": "d", "uri": "builtin://quickstart-corpus"}],
                "sequenceLength": 32,
            },
            # Two micro-batches per step, so accumulation runs more than once.
            "hyperparameters": {
                "learningRate": 3e-3,
                "globalBatchSize": 4,
                "microBatchSize": 2,
                "maxSteps": max_steps,
            },
            "resources": {"workers": 1},
            "checkpoint": {"intervalSteps": 1000},
            "evaluation": {"intervalSteps": 1000, "maxBatches": 1, "metrics": ["loss"]},
        },
    }
    config = resolve(validation.parse(doc), out, use_gpu=False, world_size=1)
    prepare(config, log=lambda _: None)
    return Trainer(config, WorkerContext())


@pytest.mark.trainer
def test_a_train_step_leaves_loss_and_grad_norm_on_the_device(tmp_path: Path) -> None:
    t = _trainer(tmp_path, max_steps=2)
    out = t.train_step()
    for key in ("loss", "grad_norm", "trained_tokens"):
        assert isinstance(out[key], torch.Tensor), key
        assert out[key].dim() == 0, key
    assert float(out["loss"]) > 0
    assert float(out["grad_norm"]) > 0
    assert int(out["trained_tokens"]) == 2 * 2 * 31  # 4 rows of 32, all trained but the first


@pytest.mark.trainer
def test_step_events_come_at_the_logging_interval_and_the_last_step(tmp_path: Path) -> None:
    t = _trainer(tmp_path, max_steps=7)
    assert t.log_interval == 1  # on CPU reading the loss is free: every step, as before
    t.log_interval = 3
    t.fit()
    events = [json.loads(x) for x in t.config.metrics_path.read_text().splitlines()]
    steps = [e for e in events if e["kind"] == "step"]
    assert [e["step"] for e in steps] == [3, 6, 7]
    for e in steps:
        assert isinstance(e["loss"], float)
        assert isinstance(e["grad_norm"], float)
        assert e["tokens_per_second"] > 0
    assert steps[-1]["tokens_seen"] == 7 * 4 * 32


def test_adamw_is_fused_when_the_parameters_are_on_cuda() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    hp = api.Hyperparameters.model_validate({"learningRate": 1e-3, "maxSteps": 1})
    on_gpu = optim.build_optimizer(model, hp, on_cuda=lambda p: True)
    assert on_gpu.defaults["fused"] is True
    assert not on_gpu.defaults["foreach"]
    on_cpu = optim.build_optimizer(model, hp)  # the real check: these are CPU tensors
    assert on_cpu.defaults["foreach"] is True
    assert not on_cpu.defaults["fused"]
