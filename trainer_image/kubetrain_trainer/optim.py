"""AdamW with decoupled weight decay, and the learning-rate schedule (warmup, then decay)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from kubetrain_api import v1alpha1 as api


def _on_cuda(param: torch.Tensor) -> bool:
    return param.is_cuda


def build_optimizer(
    model: nn.Module,
    hp: api.Hyperparameters,
    on_cuda: Callable[[torch.Tensor], bool] = _on_cuda,
) -> torch.optim.AdamW:
    """AdamW over trainable parameters; biases and norms (1-D tensors) get no weight decay,
    as in nanoGPT and most LLM recipes. Fused (one kernel for the whole update) when the
    parameters are on CUDA, as torchtitan does; foreach elsewhere. `on_cuda` decides where
    a parameter lives (tests pass their own)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": hp.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = bool(decay or no_decay) and all(on_cuda(p) for p in decay + no_decay)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=hp.learning_rate,
        betas=(hp.adam_beta1, hp.adam_beta2),
        eps=hp.adam_epsilon,
        # Both work with FSDP2's DTensor parameters; the CPU keeps foreach, as measured.
        **({"fused": True} if fused else {"foreach": True}),
    )


def lr_multiplier(step: int, schedule: api.LearningRateSchedule, total_steps: int) -> float:
    """Factor on the peak learning rate at `step` (0-based, before the step is taken)."""
    warmup = schedule.warmup_steps
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule.type == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    floor = schedule.min_ratio
    if schedule.type == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, hp: api.Hyperparameters, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, hp.schedule, total_steps)
    )
