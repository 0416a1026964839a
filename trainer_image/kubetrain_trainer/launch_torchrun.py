"""Run the training loop under torchrun instead of Ray Train (benchmarks, GPU checks, and
clusters without Ray). Data must already be prepared (`driver.prepare`).

    torchrun --nproc-per-node 2 -m kubetrain_trainer.launch_torchrun RUN.yaml OUTPUT_DIR
"""

from __future__ import annotations

import time

STARTED = time.time()  # before the heavy imports below, for the start-up breakdown

import argparse  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from kubetrain_trainer.config import resolve  # noqa: E402
from kubetrain_trainer.local import load_run  # noqa: E402
from kubetrain_trainer.loop import WorkerContext, train  # noqa: E402

IMPORTED = time.time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--max-steps", type=int)
    args = parser.parse_args()

    use_gpu = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_gpu else "gloo")
    grouped = time.time()
    try:
        run = load_run(args.run, max_steps=args.max_steps)
        config = resolve(run, args.output_dir, use_gpu=use_gpu, world_size=dist.get_world_size())
        ctx = WorkerContext(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            startup={"worker_entry": STARTED, "imports_done": IMPORTED, "group_ready": grouped},
        )
        train(config, ctx)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
