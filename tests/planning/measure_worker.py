"""Measure real training steps of kubetrain's own FSDP2 build, for test_measured.py.

`python -m tests.planning.measure_worker SPEC.json OUT.json WORLD`: WORLD gloo processes
build the model as the trainer does (sharded_init, parallelize, build_optimizer), run two
optimizer steps of random tokens through `loop.accumulate_gradients`, and write per rank:
the bytes of the weights, gradients and optimizer state this rank holds (its tensors'
storages, each once), and the peak of all tensor memory under torch's FSDPMemTracker.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _storages(tensors: list[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        storage = local.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _worker(rank: int, world: int, spec_json: str, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    from kubetrain_api import v1alpha1 as api
    from kubetrain_trainer import loop, optim, sharded_init
    from kubetrain_trainer.config import TrainConfig
    from kubetrain_trainer.data.tokenize import DEFAULT_VOCAB_SIZE

    spec = api.TrainingRunSpec.model_validate_json(spec_json)
    config = TrainConfig(
        name="measure", spec=spec, output_dir=Path(out).parent, world_size=world, use_gpu=False
    )
    # The tracker follows one forward per module per step: no gradient accumulation.
    assert config.grad_accum_steps == 1, "globalBatchSize must be microBatchSize x WORLD"
    torch.manual_seed(0)
    model, _ = sharded_init.build_for_training(config, torch.device("cpu"), DEFAULT_VOCAB_SIZE)
    optimizer = optim.build_optimizer(model, spec.hyperparameters)
    hp, seq = spec.hyperparameters, spec.data.sequence_length
    micro = [
        {"input_ids": ids, "labels": ids.clone()}
        for ids in (
            torch.randint(0, DEFAULT_VOCAB_SIZE, (hp.micro_batch_size, seq))
            for _ in range(config.grad_accum_steps)
        )
    ]
    tracker = FSDPMemTracker(model, optimizer)
    tracker.track_inputs(tuple(b["input_ids"] for b in micro))
    grads = 0
    with tracker:
        for step in range(2):
            loop.accumulate_gradients(model, micro, torch.device("cpu"))
            if step == 1:
                grads = _storages([p.grad for p in model.parameters() if p.grad is not None])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tracker.reset_mod_stats()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    result = {
        "parameters": _storages(list(model.parameters())),
        "gradients": grads,
        "optimizer_state": _storages(state),
        "peak": int(peak),
    }
    Path(f"{out}.{rank}").write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> None:
    spec_file, out, world = sys.argv[1], sys.argv[2], int(sys.argv[3])
    port = int(sys.argv[4]) if len(sys.argv) > 4 else 29611
    mp.spawn(_worker, args=(world, Path(spec_file).read_text(), out, port), nprocs=world)
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]
    Path(out).write_text(json.dumps(ranks))


if __name__ == "__main__":
    main()
