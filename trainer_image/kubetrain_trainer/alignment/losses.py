"""The preference and RL objectives of the alignment methods, as pure torch functions.

Each function takes log-probabilities (already computed by the caller's forward passes) and
returns per-example or summed terms; none reduces across processes by itself, so they run
the same under FSDP2, DDP or a single process. The maths follows TRL's trainers (the tests
compare values and gradients with TRL's own code):

- DPO: Rafailov et al. 2023, "Direct Preference Optimization" (arXiv:2305.18290), with the
  label smoothing of conservative DPO (Mitchell 2023).
- KTO: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"
  (arXiv:2402.01306).
- GRPO: Shao et al. 2024, "DeepSeekMath" (arXiv:2402.03300), with TRL's token-level
  ("dapo") normalization.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kubetrain_trainer.evaluate import IGNORE_INDEX

__all__ = [
    "DpoTerms",
    "GrpoTerms",
    "KtoTerms",
    "dpo_loss",
    "group_advantages",
    "grpo_token_loss",
    "kto_kl",
    "kto_loss",
    "sequence_logps",
    "token_logps",
]


def token_logps(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probability of each next token: `logits[:, t]` scores `labels[:, t + 1]`.

    Returns `(logps, mask)`, both (B, T-1): float32 log-probs, and True where the label is
    not IGNORE_INDEX (logps are 0 elsewhere). Computed as the selected logit minus the
    row's logsumexp, one sequence at a time in float32 (TRL's `selective_log_softmax`):
    no full-vocabulary log-softmax and no float32 copy of the whole (B, T, V) logits.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"token_logps: logits must be (B, T, V) and labels (B, T), got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    # Shift the labels, not the logits: slicing logits[:, :-1] would copy the largest tensor.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    mask = targets != IGNORE_INDEX
    index = targets.masked_fill(~mask, 0).unsqueeze(-1)
    selected = torch.gather(logits, dim=-1, index=index).squeeze(-1).float()
    logsumexp = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])
    logps = (selected - logsumexp).masked_fill(~mask, 0.0)
    return logps[:, :-1], mask[:, :-1]


def sequence_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of the next-token log-probs over each sequence's labelled tokens, (B,) float32."""
    logps, _ = token_logps(logits, labels)
    return logps.sum(dim=-1)


@dataclass(frozen=True)
class DpoTerms:
    """Per-pair DPO loss (B,) and the implicit rewards beta * log(pi / pi_ref), detached."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> DpoTerms:
    """DPO's sigmoid loss per pair (Rafailov et al. 2023, eq. 7) from sequence log-probs.

    With `label_smoothing` eps the preference label is taken as flipped with probability
    eps (conservative DPO): (1 - eps) * -logsigmoid(beta * d) + eps * -logsigmoid(-beta * d),
    d = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected). TRL's `sigmoid` loss
    computed exactly this before TRL 1.0; TRL 1.x keeps it only in its `aot` losses, so the
    tests check eps > 0 against TRL's `sigmoid` loss on the pair and on the swapped pair.
    The caller takes the mean over pairs (of all processes, for a global batch mean).
    """
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    logits = beta * (chosen_logratios - rejected_logratios)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return DpoTerms(
        losses=losses,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
    )


@dataclass(frozen=True)
class KtoTerms:
    """Weighted KTO losses (desirable first, then undesirable) and their detached rewards."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def kto_kl(
    policy_kl_logps: Tensor,
    ref_kl_logps: Tensor,
    reduce: Callable[[Tensor], Tensor] = lambda t: t,
) -> Tensor:
    """KTO's reference point z0: the batch mean of log(pi / pi_ref) over mismatched
    (prompt, completion) pairs, detached, averaged across processes by `reduce` (the caller's
    all-reduce mean), then clamped at 0 (Ethayarajh et al. 2024, sec. 4; TRL's estimate)."""
    kl = (policy_kl_logps - ref_kl_logps).mean().detach()
    return reduce(kl).clamp(min=0)


def kto_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    kl: Tensor,
    *,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> KtoTerms:
    """KTO's loss per example (Ethayarajh et al. 2024, eq. 7, as TRL computes it).

    chosen = desirable examples, rejected = undesirable ones; either side may be empty.
    Desirable: w_d * (1 - sigmoid(beta * (r - z0))); undesirable:
    w_u * (1 - sigmoid(beta * (z0 - r))), with r = log(pi / pi_ref) and z0 = `kl` from
    `kto_kl`. TRL's loss is the mean of `losses` (over all processes' examples).
    """
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    chosen_losses = 1 - torch.sigmoid(beta * (chosen_logratios - kl))
    rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_logratios))
    return KtoTerms(
        losses=torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses)),
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
    )


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True) -> Tensor:
    """GRPO's advantages (Shao et al. 2024, sec. 4.1.2): each reward minus its group's mean,
    divided by the group's standard deviation (Bessel-corrected) + 1e-4 when `scale`.

    `rewards` is (N * group_size,), the completions of one prompt in consecutive blocks.
    A group of one has std 0 (TRL's convention), so its advantage is 0.
    """
    if group_size < 1 or rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"group_advantages: rewards of shape {tuple(rewards.shape)} do not split into "
            f"groups of group_size={group_size}"
        )
    groups = rewards.view(-1, group_size)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(groups)
        advantages = advantages / (std + 1e-4)
    return advantages.reshape(-1)


@dataclass(frozen=True)
class GrpoTerms:
    """Sums over one micro-batch's masked tokens, for the caller to divide by the step's
    global token count: `loss_sum` (with grad), and detached `kl_sum`, `clipped` (tokens
    where the clipped ratio won the min, TRL's clip_ratio/region) and `tokens`."""

    loss_sum: Tensor
    kl_sum: Tensor
    clipped: Tensor
    tokens: Tensor


def grpo_token_loss(
    logps: Tensor,
    old_logps: Tensor,
    ref_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    beta: float,
    epsilon: float,
) -> GrpoTerms:
    """GRPO's clipped surrogate per token (Shao et al. 2024, eq. 3) plus beta times the k3
    estimate of KL(pi || pi_ref) = exp(ref - logp) - (ref - logp) - 1, summed over `mask`.

    Shapes: logps, old_logps, ref_logps, mask (B, T); advantages (B,). The caller divides
    `loss_sum` by the GLOBAL number of masked tokens of the optimizer step (all processes,
    all micro-batches): that is TRL's loss_type "dapo" (its default), sum / num_items_in_batch,
    which weights every token alike whatever the sequence lengths and the sharding.
    `ref_logps` may be None only with beta == 0 (kl_sum is then 0).
    """
    if ref_logps is None and beta != 0.0:
        raise ValueError(f"grpo_token_loss: beta={beta} needs ref_logps (None given)")
    # Padding may hold any value (-inf log-probs too): zero it first so that neither the loss
    # nor its gradient sees it (masking only the product would still give nan gradients).
    logps = logps.masked_fill(~mask, 0.0)
    old_logps = old_logps.masked_fill(~mask, 0.0)
    if ref_logps is not None:
        ref_logps = ref_logps.masked_fill(~mask, 0.0)
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * adv
    per_token = -torch.min(unclipped, clipped)
    if ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        if beta != 0.0:
            per_token = per_token + beta * kl
        kl_sum = torch.where(mask, kl.detach(), 0.0).sum()
    else:
        kl_sum = logps.new_zeros(())
    loss_sum = torch.where(mask, per_token, 0.0).sum()
    ratio = ratio.detach()
    clip_active = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon) & (adv > 0))
    return GrpoTerms(
        loss_sum=loss_sum,
        kl_sum=kl_sum,
        clipped=(clip_active & mask).sum(),
        tokens=mask.sum(),
    )
