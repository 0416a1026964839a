"""OpenAI's logit adjustments and log-probabilities, as pure tensor functions.

`adjust_logits` applies `logit_bias`, `presence_penalty` and `frequency_penalty` the way
OpenAI documents them: for every token j,
`logit[j] + bias[j] - count[j] * frequency_penalty - (count[j] > 0) * presence_penalty`,
where `count[j]` is how often j occurs in the text generated so far (not the prompt).
Temperature and top-p apply after this. `top_logprobs` reads log-probabilities from the
model's own logits (log-softmax, before any adjustment), as OpenAI reports them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

# What a log-probability of -inf is reported as (JSON has no infinity; OpenAI uses this).
LOGPROB_FLOOR = -9999.0


def adjust_logits(
    logits: torch.Tensor,
    counts: torch.Tensor,
    *,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`logits` ([..., vocab]) adjusted by the generated-token `counts` ([vocab]) and an
    additive `bias` ([vocab]); a new tensor, the input is left alone."""
    adjusted = (
        logits - counts * frequency_penalty - (counts > 0).to(logits.dtype) * presence_penalty
    )
    if bias is not None:
        adjusted = adjusted + bias
    return adjusted


class LogitAdjuster:
    """The per-request state `adjust_logits` needs: token counts so far and the dense bias.
    `active` is False when every parameter is neutral, so callers can skip it entirely."""

    def __init__(
        self,
        vocab_size: int,
        device: torch.device,
        *,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: Mapping[int, float] | None = None,
    ) -> None:
        self.presence_penalty = presence_penalty
        self.frequency_penalty = frequency_penalty
        self.counts = torch.zeros(vocab_size, device=device)
        self.bias: torch.Tensor | None = None
        if logit_bias:
            self.bias = torch.zeros(vocab_size, device=device)
            for token, value in logit_bias.items():
                self.bias[token] = value
        self.active = bool(presence_penalty or frequency_penalty or self.bias is not None)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return logits
        return adjust_logits(
            logits,
            self.counts,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            bias=self.bias,
        )

    def observe(self, token: int) -> None:
        if self.active:  # counts matter only to the penalties
            self.counts[token] += 1


@dataclass(frozen=True)
class TokenLogprobs:
    """One generated token's log-probability and the `k` most likely alternatives, as
    token ids (the engine turns them into text)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def token_logprobs(logits: torch.Tensor, token: int, k: int) -> TokenLogprobs:
    """Log-softmax of one position's `logits` ([vocab]): the chosen token's value and the
    top `k` (most likely first)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logprobs, k) if k > 0 else None
    pairs = (
        ()
        if top is None
        else tuple(
            (int(i), _finite(float(v))) for v, i in zip(top.values, top.indices, strict=True)
        )
    )
    return TokenLogprobs(token, _finite(float(logprobs[token])), pairs)


def _finite(value: float) -> float:
    return max(value, LOGPROB_FLOOR)
