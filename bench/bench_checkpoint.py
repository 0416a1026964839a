"""Checkpoint stall: how much longer the training step that saves a checkpoint takes than a
normal step, synchronous (`dcp.save`) vs asynchronous (`spec.checkpoint.asyncSave`,
`dcp.async_save`), in the same run on the same model.

One process on CPU, the real `Trainer.train_step` and `CheckpointManager`, a Llama of about
64M parameters (a save writes the weights and both AdamW moments, about 0.77 GB, fsynced).
Figures per mode (medians over rounds): the stall (what the save call adds to the step that
saves: the training thread waits for it), the save's own duration (start to commit), and for
async the steps that ran while the write went on and their extra time over normal steps (the
write shares the CPU with training).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

# About 64M parameters (quick: about 20M).
SHAPES = {
    False: {"hidden_size": 768, "num_hidden_layers": 10, "intermediate_size": 2048},
    True: {"hidden_size": 512, "num_hidden_layers": 6, "intermediate_size": 1408},
}


def _trainer(tmp: Path, quick: bool) -> Any:
    from kubetrain_api import validation
    from kubetrain_trainer.config import resolve
    from kubetrain_trainer.loop import Trainer, WorkerContext
    from kubetrain_trainer.prepare import prepare

    overrides = {
        "vocab_size": 512,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        **SHAPES[quick],
    }
    doc = {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "bench-checkpoint"},
        "spec": {
            "model": {"source": "builtin://tiny-llama", "configOverrides": overrides},
            "method": "pretrain",
            "data": {
                "sources": [{"name": "corpus", "uri": "builtin://quickstart-corpus"}],
                "sequenceLength": 32,
            },
            "hyperparameters": {"globalBatchSize": 2, "microBatchSize": 2, "maxSteps": 1000},
            "resources": {"workers": 1},
            "checkpoint": {"intervalSteps": 100000, "keepLast": 1},
        },
    }
    config = resolve(validation.parse(doc), tmp, use_gpu=False, world_size=1)
    prepare(config, log=lambda _: None)
    return Trainer(config, WorkerContext())


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _step(trainer: Any) -> None:
    float(trainer.train_step()["loss"])  # read the loss, as a logging step does


def run(quick: bool = False) -> dict[str, Any]:

    rounds = 2 if quick else 3
    # One compute thread: the background write gets the other core, and OpenMP threads do
    # not spin against other processes on a shared machine (steps vary far less).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = _measure(quick, rounds)
    finally:
        torch.set_num_threads(threads)
    out["torch_threads"] = 1
    return out


def _measure(quick: bool, rounds: int) -> dict[str, Any]:
    from kubetrain_trainer.checkpoint import CheckpointManager

    with tempfile.TemporaryDirectory(prefix="kubetrain-bench-ckpt-") as tmp:
        trainer = _trainer(Path(tmp), quick)
        managers = {
            mode: CheckpointManager(Path(tmp) / mode, keep_last=1) for mode in ("sync", "async")
        }

        def save(mode: str) -> None:
            manager = managers[mode]
            args = (trainer.step, trainer.model, trainer.optimizer, trainer.scheduler)
            extra = {"step": trainer.step, "tokens_seen": trainer.tokens_seen}
            if mode == "sync":
                manager.save(*args, extra=extra)
            else:
                manager.save_async(*args, extra=extra)

        for _ in range(2):  # warm-up: allocator, first optimizer step
            _step(trainer)
        normal: list[float] = []
        per_mode: dict[str, dict[str, list[float]]] = {
            m: {
                "normal_step_s": [],
                "save_step_s": [],
                "stall_s": [],
                "save_duration_s": [],
                "overlap_steps": [],
                "overlap_extra_s": [],
            }
            for m in managers
        }
        for _ in range(rounds):
            for mode, manager in managers.items():
                # The machine may be shared: compare each save step with the normal steps
                # just before it.
                figures = per_mode[mode]
                before = statistics.median(_timed(lambda: _step(trainer)) for _ in range(3))
                compute = _timed(lambda: _step(trainer))
                stall = _timed(lambda mode=mode: save(mode))  # type: ignore[misc]
                # Steps while the write goes on (async), committed as soon as it has ended.
                overlap: list[float] = []
                info = manager.latest() if mode == "sync" else None
                while info is None:
                    overlap.append(_timed(lambda: _step(trainer)))
                    info = manager.poll()
                    if len(overlap) >= 50:
                        info = manager.wait()
                normal.append(before)
                figures["normal_step_s"].append(before)
                figures["save_step_s"].append(compute + stall)
                figures["stall_s"].append(stall)
                figures["save_duration_s"].append(info.duration_s)
                figures["overlap_steps"].append(len(overlap))
                figures["overlap_extra_s"].append(sum(t - before for t in overlap))
        folder = Path(managers["sync"].latest().path)
        checkpoint_bytes = sum(p.stat().st_size for p in folder.iterdir())

    step_s = statistics.median(normal)
    out: dict[str, Any] = {
        "params": trainer.shape.n_params,
        "checkpoint_bytes": checkpoint_bytes,
        "rounds": rounds,
        "normal_step_s": step_s,
    }
    for mode, figures in per_mode.items():
        out[mode] = {
            "save_step_s": statistics.median(figures["save_step_s"]),
            "stall_s": statistics.median(figures["stall_s"]),
            "stall_min_s": min(figures["stall_s"]),
            "save_duration_s": statistics.median(figures["save_duration_s"]),
            "overlap_steps": statistics.median(figures["overlap_steps"]),
            "overlap_extra_s": statistics.median(figures["overlap_extra_s"]),
            "raw": figures,
        }
    out["stall_ratio_async_over_sync"] = max(out["async"]["stall_s"], 0.0) / max(
        out["sync"]["stall_s"], 1e-9
    )
    out["note"] = (
        "stall_s: what the save call adds to the step that saves (the training thread waits "
        "for it), median over rounds; save_step_s: that step, compute plus save call; "
        "normal_step_s: the median of the 3 steps before it. Async also slows the "
        "overlap_steps that run during its background write by overlap_extra_s in total "
        "(the write shares the CPU); save_duration_s: start of the save to its commit"
    )
    return out


def plot_bars(results: dict[str, Any]) -> list[tuple[str, float, float, str]]:
    """For run_all's plot: the stall of an async save against a sync one (target <= 0.5)."""
    return [("ckpt stall\nasync / sync", results["stall_ratio_async_over_sync"], 0.5, "max")]


if __name__ == "__main__":
    from bench.alone import run_alone

    run_alone(run, "checkpoint_stall.json")
