"""Spread a model over the data-parallel processes: FSDP2 (`fully_shard` per transformer
block, then the root) or DDP, with mixed precision, activation checkpointing and
torch.compile as the spec asks. Kept apart from the model and the loop, as in torchtitan."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from kubetrain_trainer.config import TrainConfig

_MIXED = {"bf16-mixed": torch.bfloat16}
_WEIGHTS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(config: TrainConfig) -> torch.dtype:
    """The dtype matmuls run in: the mixed-precision dtype, else the weights' own."""
    return _MIXED.get(config.precision) or _WEIGHTS[config.param_dtype]


def parallelize(
    model: nn.Module, blocks: list[nn.Module], config: TrainConfig, device: torch.device
) -> nn.Module:
    """Apply activation checkpointing, compile and FSDP2/DDP; returns the module to train.
    Under bf16-mixed the weights (and so the optimizer state) keep their own dtype and only
    compute runs in bf16: FSDP2 through its MixedPrecisionPolicy, DDP through autocast."""
    if config.precision not in ("fp32", *_MIXED):
        # Validation refuses it first (spec.hyperparameters.precision): no loss scaler.
        raise ValueError(f"precision {config.precision} is not supported; use bf16-mixed")
    dist_spec = config.spec.distributed
    mixed = _MIXED.get(config.precision)
    if dist_spec.activation_checkpointing:
        # transformers' own switch: non-reentrant checkpointing of each decoder layer.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]
    if dist_spec.compile:
        for block in blocks:
            block.compile()
    if not dist.is_initialized() or dist_spec.strategy == "ddp":
        if mixed is not None:
            # DDP has no public mixed-precision policy: autocast the forward (the backward
            # follows it), so matmuls run in bf16 while the weights stay as they are.
            model.forward = torch.autocast(device.type, dtype=mixed)(model.forward)  # type: ignore[method-assign]
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    # FSDP2 even on one process (as torchtitan does): its policy is what casts the
    # parameters to the compute dtype, so a single GPU trains in bf16 too.
    mp = (
        MixedPrecisionPolicy(param_dtype=mixed, reduce_dtype=torch.float32)
        if mixed is not None
        else MixedPrecisionPolicy()
    )
    reshard = dist_spec.reshard_after_forward
    for block in blocks:
        fully_shard(block, mp_policy=mp, reshard_after_forward=reshard)
    # The root holds embeddings and the head; its all-gather is needed right after forward.
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip gradient communication on accumulation micro-steps (FSDP2 and DDP alike)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
    elif isinstance(model, DistributedDataParallel):
        model.require_backward_grad_sync = enabled
