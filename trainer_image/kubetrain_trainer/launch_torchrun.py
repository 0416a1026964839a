"""Run the training loop under torchrun instead of Ray Train (benchmarks, GPU checks, and
clusters without Ray). Data must already be prepared (`driver.prepare`).

    torchrun --nproc-per-node 2 -m kubetrain_trainer.launch_torchrun RUN.yaml OUTPUT_DIR
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

from kubetrain_trainer.config import resolve
from kubetrain_trainer.local import load_run
from kubetrain_trainer.loop import WorkerContext, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--max-steps", type=int)
    args = parser.parse_args()

    use_gpu = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_gpu else "gloo")
    try:
        run = load_run(args.run, max_steps=args.max_steps)
        config = resolve(run, args.output_dir, use_gpu=use_gpu, world_size=dist.get_world_size())
        ctx = WorkerContext(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )
        train(config, ctx)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
