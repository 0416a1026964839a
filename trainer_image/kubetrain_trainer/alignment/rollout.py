"""Sampling groups of completions from the policy (GRPO's rollout).

A hand-written decode loop over the model's forward with its KV cache, not `generate`:
the policy is FSDP2-sharded, so every forward is a collective and all ranks must run the
same number of them; here each step agrees across ranks whether any row still runs
(`generate`'s `synced_gpus` does the same, but not for every wrapper and sampler). Works
on plain, PEFT-wrapped and sharded models alike.

The result is rebuilt right-padded, [prompt][completion][pad], with labels on the
completion only: the trainer scores it with a plain forward, where positions are
`arange` and causal attention never lets a token see the padding after it.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kubetrain_trainer.models import IGNORE_INDEX, base_model


@dataclass
class Rollout:
    """Completions sampled for N prompts, G per prompt, as N*G right-padded rows."""

    input_ids: Tensor
    """(N*G, L) int64: [prompt][completion][pad], right-padded with the pad id."""
    labels: Tensor
    """Same shape: IGNORE_INDEX except on completion tokens (the EOS it ended with too)."""
    texts: list[str]
    """The decoded completions, special tokens dropped."""
    prompt_index: list[int]
    """The prompt each row came from; a group's rows are consecutive (row r: r // G)."""


def sample(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    generations: int,
    max_new_tokens: int,
    temperature: float,
    device: torch.device,
    greedy: bool = False,
    pad_id: int,
    eos_id: int,
) -> Rollout:
    """`generations` completions of each prompt (token ids of a rendered prompt), each at
    most `max_new_tokens` long and ended by `eos_id`. Sampled with `torch.multinomial` at
    `temperature` from the global torch RNG (seeded by the caller, so a resumed run
    samples the same), or argmax when `greedy`. Under torch.distributed every rank must
    call this together (with the same `max_new_tokens`), as with any forward of a sharded
    model; their prompts may differ."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("sample needs at least one prompt, and no empty prompt")
    if generations < 1 or max_new_tokens < 1:
        raise ValueError("generations and max_new_tokens must be >= 1")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0 to sample (got {temperature})")
    rows = [list(p) for p in prompts for _ in range(generations)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            new_tokens, lengths = _decode(
                model, rows, max_new_tokens, temperature, greedy, pad_id, eos_id, device
            )
    finally:
        model.train(was_training)
    completions = [new_tokens[r, : lengths[r]].tolist() for r in range(len(rows))]
    input_ids, labels = _right_padded(rows, completions, pad_id)
    return Rollout(
        input_ids=input_ids,
        labels=labels,
        texts=tokenizer.batch_decode(completions, skip_special_tokens=True),
        prompt_index=[r // generations for r in range(len(rows))],
    )


def _decode(
    model: nn.Module,
    rows: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    greedy: bool,
    pad_id: int,
    eos_id: int,
    device: torch.device,
) -> tuple[Tensor, list[int]]:
    """The new tokens of every row (B, steps) and how many of them each row generated."""
    # Left padding lines up every row's next token in the last column; position ids count
    # real tokens only, so a row's padding does not shift its positions.
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, width - len(ids) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)

    cache_kwarg, keeps_logits = _forward_arguments(model)
    extra = {"logits_to_keep": 1} if keeps_logits else {}
    cache = None
    finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
    generated: list[Tensor] = []
    synced = dist.is_available() and dist.is_initialized()
    for step in range(max_new_tokens):
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{cache_kwarg: cache},
            **extra,
        )
        cache = _cache_of(out)
        logits = out.logits[:, -1, :].float()
        if greedy:
            token = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = torch.multinomial(probs, 1).squeeze(-1)
        token = token.masked_fill(finished, pad_id)
        generated.append(token)
        finished |= token == eos_id
        if step == max_new_tokens - 1:
            break
        # Sharded forwards are collectives: stop only when no rank has a row running.
        running = (~finished).any().to(torch.int32).reshape(1)
        if synced:
            dist.all_reduce(running, op=dist.ReduceOp.MAX)
        if not running.item():
            break
        input_ids = token[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], -1)
        position_ids = position_ids[:, -1:] + 1
    new_tokens = torch.stack(generated, dim=1).cpu()
    # A row's completion runs up to and including its first EOS, else to the last step.
    is_eos = new_tokens == eos_id
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, new_tokens.shape[1])
    return new_tokens, first_eos.tolist()


def _forward_arguments(model: nn.Module) -> tuple[str, bool]:
    """The keyword of the KV cache (transformers 5 renamed `past_key_values` to `cache`)
    and whether the forward can compute the last position's logits only."""
    inner = getattr(model, "module", model)  # DDP
    params = inspect.signature(base_model(inner).forward).parameters
    cache_kwarg = "cache" if "cache" in params else "past_key_values"
    return cache_kwarg, "logits_to_keep" in params


def _cache_of(out: Any) -> Any:
    for name in ("cache", "past_key_values"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise RuntimeError(f"{type(out).__name__} returned no KV cache although use_cache=True")


def _right_padded(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int
) -> tuple[Tensor, Tensor]:
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    labels = torch.full((len(prompts), width), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        end = len(prompt) + len(completion)
        input_ids[i, :end] = torch.tensor(prompt + completion, dtype=torch.long)
        labels[i, len(prompt) : end] = torch.tensor(completion, dtype=torch.long)
    return input_ids, labels
