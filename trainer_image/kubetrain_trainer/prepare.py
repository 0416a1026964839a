"""Data preparation, its own step before training, apart from any launcher (Ray Train,
torchrun) so that each can run it without the other's dependencies."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

from kubetrain_trainer.config import TrainConfig


def prepare(
    config: TrainConfig,
    log: Callable[[str], None] = print,
    ray_ready: threading.Event | None = None,
) -> dict[str, Any]:
    """Data preparation, its own step (nanoGPT): clean, dedup, mix, tokenize, pack, split.
    Writes to the run's storage once; every worker then reads the token shards. A large
    input (`pipeline.large_input`) waits for `ray_ready` (set once the driver has joined,
    or failed to join, the cluster) and is then prepared by Ray tasks across it."""
    from kubetrain_trainer import models
    from kubetrain_trainer.data import pipeline, prepare_data

    # Ray tasks write their work files under the data folder, which every pod must see:
    # the run's claim does, but with an object store it is the head's own scratch, so the
    # preparation stays in this process.
    parallel = False if config.remote_root else None
    if parallel is None and ray_ready is not None and pipeline.wants_ray(config.spec.data):
        log("data: a large input, prepared across the Ray cluster once it is joined")
        ray_ready.wait()

    spec = config.spec
    tokenizer = None
    if not spec.model.source.startswith("builtin://"):
        tokenizer = models.load_tokenizer(spec.model, config.output_dir / "cache")
    vocab = int(spec.model.config_overrides.get("vocab_size", 1024))
    prepare_data(
        spec,
        config.data_dir,
        tokenizer=tokenizer,
        vocab_size=vocab,
        seed=spec.hyperparameters.seed,
        log=log,
        parallel=parallel,
    )
    return dict(json.loads((config.data_dir / "summary.json").read_text()))
