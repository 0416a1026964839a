"""A process of the two-rank evaluate_loss test. Kept free of transformers so that spawned
processes start quickly."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

from kubetrain_trainer.evaluate import evaluate_loss

VOCAB = 40


class TinyLM(nn.Module):
    """Embedding + a causal running mean + linear head: context-dependent, deterministic."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        h = self.embed(input_ids).cumsum(1)
        h = h / torch.arange(1, input_ids.shape[1] + 1)[None, :, None]
        return SimpleNamespace(logits=self.head(h))


def make_batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Three batches of different shapes with ignored (-100) and padded positions."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for rows, width in ((3, 9), (2, 6), (4, 5)):
        ids = torch.randint(3, VOCAB, (rows, width), generator=g)
        labels = ids.clone()
        labels[0, :4] = -100  # a masked prompt
        mask = torch.ones_like(ids)
        mask[-1, -2:] = 0  # a right-padded row: its pad labels are ignored
        labels[-1, -2:] = -100
        batches.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return batches


def run(rank: int, world_size: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        mine = make_batches()[rank::world_size]  # uneven shares: 2 batches and 1
        loss, count = evaluate_loss(TinyLM(), mine, "cpu")
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"loss": loss, "count": count}, f)
    finally:
        dist.destroy_process_group()
