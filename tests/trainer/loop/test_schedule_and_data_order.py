"""Pure pieces of the loop: learning-rate schedule, batch arithmetic, data order."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kubetrain_api import v1alpha1 as api
from kubetrain_trainer.config import TrainConfig
from kubetrain_trainer.optim import build_optimizer, build_scheduler, lr_multiplier
from kubetrain_trainer.sampler import DataOrder


def config(**hp: object) -> TrainConfig:
    spec = api.TrainingRunSpec.model_validate(
        {
            "model": {"source": "builtin://tiny-llama"},
            "data": {"sources": [{"name": "c", "uri": "builtin://quickstart-corpus"}]},
            "hyperparameters": {"maxSteps": 100, **hp},
        }
    )
    return TrainConfig(name="t", spec=spec, output_dir=Path("/tmp/x"), world_size=2, use_gpu=False)


def test_warmup_then_cosine_to_the_floor() -> None:
    sched = api.LearningRateSchedule(type="cosine", warmupSteps=10, minRatio=0.1)
    lrs = [lr_multiplier(s, sched, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))  # non-increasing after warmup
    assert lr_multiplier(100, sched, 100) == pytest.approx(0.1)
    assert lr_multiplier(55, sched, 100) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))
    )


def test_linear_and_constant() -> None:
    linear = api.LearningRateSchedule(type="linear", warmupSteps=0, minRatio=0.0)
    assert lr_multiplier(50, linear, 100) == pytest.approx(0.5)
    constant = api.LearningRateSchedule(type="constant", warmupSteps=4)
    assert [lr_multiplier(s, constant, 100) for s in (0, 3, 50)] == [0.25, 1.0, 1.0]


def test_scheduler_drives_the_optimizer() -> None:
    cfg = config(learningRate=1e-2, schedule={"type": "constant", "warmupSteps": 2})
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, cfg.hp)
    sched = build_scheduler(opt, cfg.hp, 10)
    seen = []
    for _ in range(3):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([5e-3, 1e-2, 1e-2])


def test_no_weight_decay_on_biases_and_norms() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, config(weightDecay=0.1).hp)
    decays = {len(g["params"]): g["weight_decay"] for g in opt.param_groups}
    assert decays == {1: 0.1, 3: 0.0}  # one weight matrix; bias, norm weight, norm bias


def test_gradient_accumulation_is_derived() -> None:
    assert config(globalBatchSize=32, microBatchSize=4).grad_accum_steps == 4  # 32 / (4 x 2)
    with pytest.raises(ValueError, match="not a multiple"):
        _ = config(globalBatchSize=30, microBatchSize=4).grad_accum_steps


def test_total_steps_from_epochs() -> None:
    cfg = config(globalBatchSize=8, microBatchSize=2)
    assert cfg.total_steps(1000) == 100  # maxSteps wins
    spec = cfg.spec.model_copy(
        update={"hyperparameters": cfg.hp.model_copy(update={"max_steps": None, "epochs": 2})}
    )
    by_epochs = TrainConfig(name="t", spec=spec, output_dir=Path("/x"), world_size=2, use_gpu=False)
    assert by_epochs.total_steps(100) == 2 * math.ceil(100 / 8)


def test_data_order_splits_each_step_over_ranks_without_overlap() -> None:
    cfg = config(globalBatchSize=16, microBatchSize=2)  # accum 4 on 2 ranks
    order = DataOrder(rows=50, config=cfg, seed=7)
    step_rows = [np.concatenate(list(order.micro_batches(1, r))) for r in (0, 1)]
    assert all(len(r) == 8 for r in step_rows)
    combined = np.concatenate(step_rows)
    assert len(set(combined.tolist())) == 16


def test_data_order_is_a_function_of_the_step() -> None:
    """What resume relies on: a fresh DataOrder at step k reads what a long-lived one did."""
    cfg = config(globalBatchSize=16, microBatchSize=2)
    straight = DataOrder(rows=50, config=cfg, seed=7)
    seen = [[b.tolist() for b in straight.micro_batches(s, 1)] for s in range(10)]
    resumed = DataOrder(rows=50, config=cfg, seed=7)
    assert [[b.tolist() for b in resumed.micro_batches(s, 1)] for s in range(6, 10)] == seen[6:]


def test_each_epoch_visits_every_row_once() -> None:
    cfg = config(globalBatchSize=8, microBatchSize=2)
    order = DataOrder(rows=40, config=cfg, seed=1)  # 5 steps per epoch
    rows = [
        i for s in range(5) for r in (0, 1) for b in order.micro_batches(s, r) for i in b.tolist()
    ]
    assert sorted(rows) == list(range(40))
    assert order.epoch(5) == pytest.approx(1.0)


def test_a_step_reads_the_same_rows_at_any_world_size() -> None:
    """Elastic resume: with globalBatchSize fixed, the rows of a global step do not depend on
    how many processes share them."""

    def step_rows(world_size: int, step: int) -> list[int]:
        cfg = TrainConfig(
            name="t",
            spec=config(globalBatchSize=8, microBatchSize=1).spec,
            output_dir=Path("/tmp/x"),
            world_size=world_size,
            use_gpu=False,
        )
        order = DataOrder(rows=30, config=cfg, seed=3)
        return sorted(
            int(i) for r in range(world_size) for b in order.micro_batches(step, r) for i in b
        )

    for step in (0, 3, 7):  # 7 crosses into the second epoch
        assert step_rows(1, step) == step_rows(2, step) == step_rows(4, step) == step_rows(8, step)
