"""A decode batch: the KV caches of sequences that take their next token in one forward pass.

Each sequence is prefilled alone (its prompt, batch 1, no padding), then joins the batch:
its cache is stacked onto the others', left-padded to the longest, and an attention mask
hides the padding. Every decode step feeds one token per sequence with its own position
(how many real tokens it has), so a sequence's keys, values and logits are those it would
have alone. A sequence that finishes leaves at once; columns that only padding is left in
are dropped. This is the decode half of continuous batching as vLLM and Hugging Face TGI
do it, with transformers' own `DynamicCache` (padded, not paged: simple and exact, at the
cost of some padding the paged layouts avoid).

Caches that are not plain `DynamicLayer`s (sliding windows, linear attention, quantized)
cannot be stacked this way: such a model's sequences each decode in a batch of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

M = TypeVar("M")


def stackable(cache: Cache) -> bool:
    """Whether `cache` holds plain [batch, heads, length, dim] keys and values per layer."""
    layers = getattr(cache, "layers", ())
    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in layers)


class DecodeBatch(Generic[M]):
    """Members (any per-sequence object) in cache row order, with their stacked cache and,
    per row, its leading padding and real length (padding + length is the cache's width)."""

    def __init__(self, device: torch.device, *, stack: bool) -> None:
        self.device = device
        self.stack = stack
        """Whether other sequences may join (the cache is stackable)."""
        self.members: list[M] = []
        self.cache: Cache | None = None
        self._padding: list[int] = []
        self._lengths: list[int] = []

    def __len__(self) -> int:
        return len(self.members)

    @property
    def width(self) -> int:
        """Columns of the stacked cache."""
        return self._padding[0] + self._lengths[0] if self.members else 0

    def join(self, member: M, cache: Cache, length: int) -> None:
        """Add a prefilled sequence: its `cache` (batch 1) holds `length` tokens."""
        if self.cache is None:
            self.cache = cache
            self._padding = [0]
        else:
            if not self.stack:
                raise ValueError("this batch's cache cannot take another sequence")
            width = max(self.width, length)
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
                assert isinstance(mine, DynamicLayer)
                assert isinstance(theirs, DynamicLayer)
                mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
                mine.values = torch.cat(
                    [_pad_left(mine.values, width), _pad_left(theirs.values, width)]
                )
            grown = width - self.width
            self._padding = [p + grown for p in self._padding] + [width - length]
        self.members.append(member)
        self._lengths.append(length)

    def inputs(self, tokens: Sequence[int]) -> dict[str, Any]:
        """The forward's arguments to feed each member its next token (in member order):
        a mask that hides each row's padding, and each row's own next position. A lone
        unpadded sequence gets exactly what a plain generation loop passes."""
        assert self.cache is not None
        input_ids = torch.tensor([[t] for t in tokens], device=self.device)
        if not any(self._padding):
            return {"input_ids": input_ids, "cache": self.cache}
        columns = torch.arange(self.width + 1, device=self.device)
        padding = torch.tensor(self._padding, device=self.device)
        return {
            "input_ids": input_ids,
            "attention_mask": (columns[None, :] >= padding[:, None]).long(),
            "position_ids": torch.tensor([[n] for n in self._lengths], device=self.device),
            "cache": self.cache,
        }

    def advanced(self) -> None:
        """Record that the forward built from `inputs` ran: each member has one more token."""
        self._lengths = [n + 1 for n in self._lengths]

    def keep(self, kept: Sequence[bool]) -> None:
        """Keep the members whose flag is True (in member order); drop the rest's rows and
        the leading columns that are now padding in every row."""
        if all(kept):
            return
        rows = [i for i, k in enumerate(kept) if k]
        self.members = [self.members[i] for i in rows]
        self._lengths = [self._lengths[i] for i in rows]
        self._padding = [self._padding[i] for i in rows]
        if not rows:
            self.cache = None
            return
        assert self.cache is not None
        index = torch.tensor(rows, device=self.device)
        start = min(self._padding)  # columns before this are padding in every row
        self._padding = [p - start for p in self._padding]
        for layer in self.cache.layers:
            assert isinstance(layer, DynamicLayer)
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Keys or values ([batch, heads, length, dim]) with zeros before them up to `width`."""
    missing = width - tensor.shape[-2]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[-2] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=-2)
