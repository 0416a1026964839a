"""A tiny deterministic training setup shared by the checkpoint tests (and their subprocesses)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def tiny_model(seed: int) -> nn.Module:
    """A small MLP with dropout, so training also draws from the torch RNG."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 4))


def tiny_setup(
    seed: int,
) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    model = tiny_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0, end_factor=0.1, total_iters=10
    )
    return model, optimizer, scheduler


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    steps: int,
) -> None:
    """Batches come from the global torch RNG: resuming reproduces them only if the RNG state
    was restored too."""
    model.train()
    for _ in range(steps):
        x, y = torch.randn(16, 8), torch.randn(16, 4)
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
