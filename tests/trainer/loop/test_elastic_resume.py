"""Elastic resume: a checkpoint the trainer saved with 2 processes (FSDP2 over gloo) resumes
at 1 and at 4. Each step reads the same rows as the straight 2-process run (the data order
is a function of the global step) and the losses match it up to floating-point reduction
order (DCP reshards model and optimizer state; no dropout)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from kubetrain_trainer.prepare import prepare

from . import elastic_worker

pytestmark = pytest.mark.trainer

SAVE_STEP, TOTAL_STEPS = 2, 4


def launch(out: Path, world_size: int, resume: str) -> tuple[dict[int, list[int]], dict]:
    """Train in `world_size` processes; the rows of each step (all ranks) and the events."""
    mp.spawn(elastic_worker.run, args=(world_size, str(out), resume), nprocs=world_size)
    rows: dict[int, list[int]] = {}
    for rank in range(world_size):
        for step, seen in json.loads((out / f"rows-rank{rank}.json").read_text()).items():
            rows.setdefault(int(step), []).extend(seen)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {step: sorted(r) for step, r in rows.items()}, {
        "losses": {e["step"]: e["loss"] for e in events if e["kind"] == "step"},
        "setup": next(e for e in events if e["kind"] == "setup"),
        "checkpoints": [e["step"] for e in events if e["kind"] == "checkpoint"],
    }


def test_saved_at_two_processes_resumes_at_one_and_at_four(tmp_path: Path) -> None:
    straight_dir = tmp_path / "straight"
    prepare(elastic_worker.config(straight_dir, 2, "auto"), log=lambda _: None)
    straight_rows, straight = launch(straight_dir, 2, "auto")
    assert straight["checkpoints"] == [SAVE_STEP, TOTAL_STEPS]
    assert sorted(straight["losses"]) == list(range(1, TOTAL_STEPS + 1))

    for world_size in (1, 4):
        out = tmp_path / f"world{world_size}"
        shutil.copytree(straight_dir / "data", out / "data")
        shutil.copytree(straight_dir / "checkpoints", out / "checkpoints")
        rows, resumed = launch(out, world_size, f"step-{SAVE_STEP}")
        assert resumed["setup"]["world_size"] == world_size
        assert resumed["setup"]["resumed_from"] == SAVE_STEP
        # Steps are 0-based in the data order: step k reads rows for the (k+1)-th update.
        assert rows == {s: straight_rows[s] for s in range(SAVE_STEP, TOTAL_STEPS)}
        for step in range(SAVE_STEP + 1, TOTAL_STEPS + 1):
            assert resumed["losses"][step] == pytest.approx(straight["losses"][step], rel=1e-5), (
                world_size,
                step,
            )
        assert resumed["checkpoints"] == [SAVE_STEP, TOTAL_STEPS]  # the resumed one, announced


def test_dropout_draws_are_a_function_of_seed_step_and_rank(tmp_path: Path) -> None:
    """The RNG is re-derived at every step, not carried over: what came before a step (a
    resume at another world size, other draws) does not change its dropout masks."""
    from kubetrain_trainer.loop import Trainer, WorkerContext

    doc = elastic_worker.spec("never")
    doc["spec"]["hyperparameters"].update(dropout=0.5, globalBatchSize=4, microBatchSize=2)
    from kubetrain_api import validation
    from kubetrain_trainer.config import resolve

    cfg = resolve(validation.parse(doc), tmp_path, use_gpu=False, world_size=1)
    prepare(cfg, log=lambda _: None)
    losses = []
    for scramble in (1, 2):
        trainer = Trainer(cfg, WorkerContext())  # the same initial weights (the run's seed)
        torch.manual_seed(scramble)
        losses.append(float(trainer.train_step()["loss"]))
    assert losses[0] == losses[1]
