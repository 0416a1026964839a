"""A process of the elastic-resume test: the real trainer (`loop.train`) under FSDP2 over
gloo, recording the rows it reads at each step."""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from kubetrain_api import validation
from kubetrain_trainer import loop, sampler
from kubetrain_trainer.config import TrainConfig, resolve


def spec(resume: str) -> dict:
    return {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "elastic"},
        "spec": {
            "model": {"source": "builtin://tiny-llama"},
            "method": "pretrain",
            "data": {
                "sources": [{"name": "d", "uri": "builtin://quickstart-corpus"}],
                "sequenceLength": 32,
                "validationSplit": 0.1,
            },
            # The global batch is what is fixed: 4 rows as 1x4, 2x2 or 4x1 micro-batches.
            "hyperparameters": {
                "learningRate": 3e-3,
                "globalBatchSize": 4,
                "microBatchSize": 1,
                "maxSteps": 4,
                "seed": 5,
                "dropout": 0.0,
            },
            "resources": {"workers": 2, "cpuPerWorker": 1, "memoryPerWorker": "2Gi"},
            # Asynchronous saves: the resumed checkpoints are the trainer's background ones.
            "checkpoint": {"intervalSteps": 2, "keepLast": 5, "resume": resume, "asyncSave": True},
            "evaluation": {"intervalSteps": 100, "maxBatches": 1, "metrics": ["loss"]},
        },
    }


def config(out: Path, world_size: int, resume: str) -> TrainConfig:
    return resolve(validation.parse(spec(resume)), out, use_gpu=False, world_size=world_size)


def run(rank: int, world_size: int, out: str, resume: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{out}/store", rank=rank, world_size=world_size
    )
    seen: dict[int, list[int]] = {}
    micro_batches = sampler.DataOrder.micro_batches

    def recording(self: sampler.DataOrder, step: int, r: int):  # type: ignore[no-untyped-def]
        for rows in micro_batches(self, step, r):
            seen.setdefault(step, []).extend(int(i) for i in rows)
            yield rows

    sampler.DataOrder.micro_batches = recording  # type: ignore[method-assign]
    try:
        cfg = config(Path(out), world_size, resume)
        loop.train(cfg, loop.WorkerContext(rank=rank, world_size=world_size))
        (Path(out) / f"rows-rank{rank}.json").write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()
