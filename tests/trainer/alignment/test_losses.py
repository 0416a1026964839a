"""The alignment losses against TRL's own trainers: same random inputs, same value, same
gradients with respect to the policy log-probs (float64, tight tolerance).

TRL 1.x computes its losses inline in `_compute_loss`, after the model's forward pass. The
tests call those methods unbound, with a namespace standing in for the trainer (only the
attributes the method reads) and a callable standing in for the model that returns the
test's per-token log-probs as TRL's fused LM head would (DPO, KTO: each sequence has one
completion token, so its per-token log-prob is the sequence log-prob handed to our
functions; GRPO: the stand-in's `_get_per_token_logps_and_entropies` returns them).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.kto_trainer import KTOTrainer
from trl.trainer.utils import nanstd, selective_log_softmax

from kubetrain_trainer.alignment.losses import (
    dpo_loss,
    group_advantages,
    grpo_token_loss,
    kto_kl,
    kto_loss,
    sequence_logps,
    token_logps,
)
from kubetrain_trainer.evaluate import IGNORE_INDEX, next_token_loss_sum
from kubetrain_trainer.models import builtin_config

pytestmark = pytest.mark.trainer

Tensor = torch.Tensor

# TRL's loss methods, called with a stand-in for the trainer (they are untyped).
dpo_compute_loss: Any = DPOTrainer._compute_loss
kto_compute_loss: Any = KTOTrainer._compute_loss
kto_compute_kl_logps: Any = KTOTrainer._compute_kl_logps
grpo_compute_loss: Any = GRPOTrainer._compute_loss


def close(actual: Tensor, expected: Tensor) -> None:
    """Equal up to float64 rounding."""
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)


def leaf(*shape: int, scale: float = 1.0, shift: float = 0.0, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift
    return t.requires_grad_()


def grads(loss: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, inputs)


def single_process_accelerator() -> SimpleNamespace:
    """What TRL's methods use of accelerate's Accelerator, for one process."""
    return SimpleNamespace(
        device=torch.device("cpu"),
        num_processes=1,
        gather=lambda t: t,
        gather_for_metrics=lambda t: t,
        reduce=lambda t, reduction: t,
    )


def trainer_stand_in(**attributes: Any) -> Any:
    return SimpleNamespace(
        model=SimpleNamespace(training=False),  # eval: no gradient-accumulation scaling
        accelerator=single_process_accelerator(),
        aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        **attributes,
    )


def fused_head_output(log_probs: torch.Tensor) -> SimpleNamespace:
    """TRL's fused LM head output: per-token log-probs of the labels, and metric extras."""
    return SimpleNamespace(
        log_probs=log_probs,
        entropy=torch.zeros_like(log_probs),
        mean_logits=torch.zeros_like(log_probs),
        is_top1=torch.zeros(log_probs.shape, dtype=torch.bool),
    )


def one_token_completions(n: int, width: int = 2) -> dict[str, torch.Tensor]:
    """n sequences of `width` tokens whose completion is the last token."""
    completion_mask = torch.zeros(n, width, dtype=torch.long)
    completion_mask[:, -1] = 1
    return {
        "input_ids": torch.ones(n, width, dtype=torch.long),
        "attention_mask": torch.ones(n, width, dtype=torch.long),
        "completion_mask": completion_mask,
    }


# --- DPO ---------------------------------------------------------------------------------


def trl_dpo_sigmoid(
    pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float
) -> tuple[Tensor, Any]:
    """TRL's DPOTrainer._compute_loss with loss_type "sigmoid" (mean over pairs)."""
    trainer = trainer_stand_in(
        beta=beta,
        label_smoothing=0.0,
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        f_divergence_type="reverse_kl",
        ld_alpha=None,
        precompute_ref_logps=True,
        use_weighting=False,
    )
    output = fused_head_output(torch.cat([pc, pr]).unsqueeze(1))
    inputs = {
        **one_token_completions(2 * pc.shape[0]),
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = dpo_compute_loss(trainer, lambda **_: output, inputs, return_outputs=False)
    return loss, trainer


@pytest.mark.parametrize(
    ("beta", "label_smoothing"), [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2), (2.0, 0.45)]
)
def test_dpo_matches_trl(beta: float, label_smoothing: float) -> None:
    pc, pr = leaf(6, scale=3, shift=-20, seed=1), leaf(6, scale=3, shift=-22, seed=2)
    rc, rr = (
        leaf(6, scale=3, shift=-21, seed=3).detach(),
        leaf(6, scale=3, shift=-21, seed=4).detach(),
    )

    ours = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing)
    ours_loss = ours.losses.mean()

    # Conservative DPO = (1 - eps) * sigmoid loss of the pair + eps * that of the swapped pair.
    trl_loss, trainer = trl_dpo_sigmoid(pc, pr, rc, rr, beta)
    if label_smoothing:
        swapped, _ = trl_dpo_sigmoid(pr, pc, rr, rc, beta)
        trl_loss = (1 - label_smoothing) * trl_loss + label_smoothing * swapped

    assert ours.losses.shape == (6,)
    close(ours_loss, trl_loss)
    for a, b in zip(grads(ours_loss, pc, pr), grads(trl_loss, pc, pr), strict=True):
        close(a, b)
    metrics = trainer._metrics["eval"]
    assert ours.chosen_rewards.mean().item() == pytest.approx(
        metrics["rewards/chosen"][-1], rel=1e-9
    )
    assert ours.rejected_rewards.mean().item() == pytest.approx(
        metrics["rewards/rejected"][-1], rel=1e-9
    )
    assert not ours.chosen_rewards.requires_grad
    assert not ours.rejected_rewards.requires_grad


def test_dpo_label_smoothing_matches_trl_aot_on_single_pairs() -> None:
    """TRL 1.x keeps cDPO's smoothed sigmoid in its `aot` loss, which sorts across the batch:
    on a batch of one pair the sort is the identity and the two must agree exactly."""
    beta, eps = 0.3, 0.15
    pc, pr = leaf(4, scale=2, shift=-10, seed=5), leaf(4, scale=2, shift=-11, seed=6)
    rc, rr = (
        leaf(4, scale=2, shift=-10, seed=7).detach(),
        leaf(4, scale=2, shift=-10, seed=8).detach(),
    )
    ours = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps).losses
    for i in range(4):
        trainer = trainer_stand_in(
            beta=beta,
            label_smoothing=eps,
            loss_types=["aot"],
            loss_weights=[1.0],
            f_divergence_type="reverse_kl",
            ld_alpha=None,
            precompute_ref_logps=True,
            use_weighting=False,
        )
        output = fused_head_output(torch.stack([pc[i], pr[i]]).unsqueeze(1))
        inputs = {
            **one_token_completions(2),
            "ref_chosen_logps": rc[i : i + 1],
            "ref_rejected_logps": rr[i : i + 1],
        }
        trl_loss = dpo_compute_loss(
            trainer, lambda _o=output, **_: _o, inputs, return_outputs=False
        )
        close(ours[i], trl_loss)


# --- KTO ---------------------------------------------------------------------------------


def trl_kto(
    pol: Tensor,
    ref: Tensor,
    pol_kl: Tensor,
    ref_kl: Tensor,
    label: Tensor,
    *,
    beta: float,
    dw: float,
    uw: float,
) -> tuple[Tensor, Any]:
    """TRL's KTOTrainer._compute_loss (loss_type "kto") on examples whose log-probs are
    `pol` / `ref`, with mismatched-pair log-probs `pol_kl` / `ref_kl` for the KL estimate."""
    n = pol.shape[0]
    trainer = trainer_stand_in(
        beta=beta,
        desirable_weight=dw,
        undesirable_weight=uw,
        loss_type="kto",
        calculate_KL=True,
        precompute_ref_logps=True,
    )
    trainer._compute_kl_logps = functools.partial(kto_compute_kl_logps, trainer)
    main = fused_head_output(pol.unsqueeze(1))
    # KL sequences are 3 tokens wide (completion: the last 2) to tell the two forwards apart.
    kl = fused_head_output(torch.stack([pol_kl.detach(), torch.zeros_like(pol_kl)], dim=1))
    kl_completion = torch.tensor([[0, 1, 1]] * n)

    def model(**kwargs: torch.Tensor) -> SimpleNamespace:
        return kl if kwargs["input_ids"].shape[1] == 3 else main

    inputs = {
        **one_token_completions(n),
        "KL_input_ids": torch.ones(n, 3, dtype=torch.long),
        "KL_attention_mask": torch.ones(n, 3, dtype=torch.long),
        "KL_completion_mask": kl_completion,
        "label": label,
        "ref_logps": ref,
        "ref_KL_logps": ref_kl,
    }
    return kto_compute_loss(trainer, model, inputs, return_outputs=False), trainer


@pytest.mark.parametrize(
    ("n_chosen", "n_rejected", "beta", "dw", "uw", "kl_shift"),
    [
        (4, 3, 0.1, 1.0, 1.0, 0.5),  # positive KL reference point
        (3, 5, 0.5, 1.33, 0.7, -0.5),  # negative mean: clamped to 0
        (5, 0, 0.2, 1.0, 1.5, 0.3),  # no undesirable example
        (0, 4, 0.2, 2.0, 1.0, 0.3),  # no desirable example
    ],
)
def test_kto_matches_trl(
    n_chosen: int, n_rejected: int, beta: float, dw: float, uw: float, kl_shift: float
) -> None:
    n = n_chosen + n_rejected
    pol, ref = leaf(n, scale=2, shift=-15, seed=11), leaf(n, scale=2, shift=-15, seed=12).detach()
    pol_kl = leaf(n, scale=0.5, shift=-15 + kl_shift, seed=13).detach()
    ref_kl = leaf(n, scale=0.5, shift=-15, seed=14).detach()
    label = torch.tensor([True] * n_chosen + [False] * n_rejected)

    z0 = kto_kl(pol_kl, ref_kl)
    assert z0.item() == pytest.approx(max((pol_kl - ref_kl).mean().item(), 0.0), rel=1e-12)
    ours = kto_loss(
        pol[:n_chosen], pol[n_chosen:], ref[:n_chosen], ref[n_chosen:], z0,
        beta=beta, desirable_weight=dw, undesirable_weight=uw,
    )  # fmt: skip
    ours_loss = ours.losses.mean()
    trl_loss, trainer = trl_kto(pol, ref, pol_kl, ref_kl, label, beta=beta, dw=dw, uw=uw)

    assert ours.losses.shape == (n,)
    assert ours.chosen_rewards.shape == (n_chosen,)
    assert ours.rejected_rewards.shape == (n_rejected,)
    close(ours_loss, trl_loss.to(ours_loss.dtype))
    close(grads(ours_loss, pol)[0], grads(trl_loss, pol)[0])
    metrics = trainer._metrics["eval"]
    assert z0.item() == pytest.approx(metrics["kl"][-1], rel=1e-12)
    if n_chosen:
        assert ours.chosen_rewards.mean().item() == pytest.approx(
            metrics["rewards/chosen"][-1], rel=1e-9
        )
    if n_rejected:
        assert ours.rejected_rewards.mean().item() == pytest.approx(
            metrics["rewards/rejected"][-1], rel=1e-9
        )


def test_kto_kl_reduces_across_processes_before_the_clamp() -> None:
    """One process with a negative local estimate, another with a larger positive one: the
    global mean is positive, and clamping each process first would give another number."""
    policy, ref = torch.tensor([-10.3, -10.3]), torch.tensor([-10.0, -10.0])  # local: -0.3
    other_process = torch.tensor(0.5)
    z0 = kto_kl(policy, ref, reduce=lambda t: (t + other_process) / 2)
    assert z0.item() == pytest.approx(0.1, abs=1e-6)
    assert not z0.requires_grad


# --- GRPO --------------------------------------------------------------------------------


def trl_grpo_dapo(
    logps: Tensor,
    old: Tensor,
    ref: Tensor | None,
    adv: Tensor,
    mask: Tensor,
    *,
    beta: float,
    eps: float,
) -> tuple[Tensor, Any]:
    """TRL's GRPOTrainer._compute_loss, loss_type "dapo", token-level importance sampling,
    one process: sum over masked tokens / num_items_in_batch (here the batch's token count)."""
    trainer = trainer_stand_in(
        beta=beta,
        epsilon_low=eps,
        epsilon_high=eps,
        loss_type="dapo",
        importance_sampling_level="token",
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        use_vllm=False,
        _entropy_bonus_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
    )
    trainer._get_per_token_logps_and_entropies = lambda *_, **__: (
        logps,
        torch.zeros_like(logps),
        None,
    )
    b, t = logps.shape
    inputs = {
        "prompt_ids": torch.ones(b, 2, dtype=torch.long),
        "prompt_mask": torch.ones(b, 2, dtype=torch.long),
        "completion_ids": torch.ones(b, t, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": old,
        "num_items_in_batch": mask.sum().double(),
    }
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    loss = grpo_compute_loss(trainer, lambda **_: None, inputs)
    return loss, trainer._metrics["eval"]


def grpo_inputs(seed: int, *, drift: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    b, t = 6, 7
    logps = leaf(b, t, scale=0.7, shift=-2, seed=seed)
    old = logps.detach() + drift * torch.randn(
        b, t, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64
    )
    ref = logps.detach() + 0.3 * torch.randn(
        b, t, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64
    )
    adv = torch.randn(b, generator=torch.Generator().manual_seed(seed + 3), dtype=torch.float64)
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    return logps, old, ref, adv, mask


@pytest.mark.parametrize(
    ("beta", "eps", "drift", "with_ref"),
    [
        (0.04, 0.2, 0.0, True),  # on-policy step: ratio 1, nothing clipped
        (0.04, 0.2, 0.5, True),  # later iterations: many ratios clipped
        (0.0, 0.2, 0.5, True),  # beta 0: reference given, KL only reported
        (0.0, 0.1, 0.5, False),  # beta 0 without a reference model
        (0.5, 0.3, 0.3, True),
    ],
)
def test_grpo_matches_trl(beta: float, eps: float, drift: float, with_ref: bool) -> None:
    logps, old, ref_logps, adv, mask = grpo_inputs(21, drift=drift)
    ref = ref_logps if with_ref else None
    ours = grpo_token_loss(logps, old, ref, adv, mask, beta=beta, epsilon=eps)
    tokens = int(mask.sum())
    ours_loss = ours.loss_sum / tokens
    trl_loss, metrics = trl_grpo_dapo(logps, old, ref, adv, mask, beta=beta, eps=eps)

    assert int(ours.tokens) == tokens
    close(ours_loss, trl_loss)
    close(grads(ours_loss, logps)[0], grads(trl_loss, logps)[0])
    # TRL averages its clip flags in float32.
    clip_fraction = metrics["clip_ratio/region_mean"][-1]
    assert float(ours.clipped) / tokens == pytest.approx(clip_fraction, abs=1e-6)
    if drift:
        assert int(ours.clipped) > 0  # the clip was active in this setting
    else:
        assert int(ours.clipped) == 0
    if ref is not None and beta:
        assert float(ours.kl_sum) / tokens == pytest.approx(metrics["kl"][-1], rel=1e-9)
    if ref is not None:
        kl = torch.exp(ref - logps.detach()) - (ref - logps.detach()) - 1
        assert float(ours.kl_sum) == pytest.approx(float(kl[mask].sum()), rel=1e-12)
        assert float(ours.kl_sum) > 0
    else:
        assert float(ours.kl_sum) == 0.0
    assert not ours.kl_sum.requires_grad
    assert not ours.clipped.requires_grad


def test_grpo_ignores_non_finite_padding() -> None:
    logps, old, ref, adv, mask = grpo_inputs(31, drift=0.3)
    clean = grpo_token_loss(logps, old, ref, adv, mask, beta=0.1, epsilon=0.2)
    padded_ref = ref.masked_fill(~mask, float("inf"))
    padded = grpo_token_loss(logps, old, padded_ref, adv, mask, beta=0.1, epsilon=0.2)
    torch.testing.assert_close(padded.loss_sum, clean.loss_sum, rtol=0, atol=0)
    assert torch.isfinite(grads(padded.loss_sum, logps)[0]).all()


def test_grpo_needs_a_reference_when_beta_is_not_zero() -> None:
    logps, old, _, adv, mask = grpo_inputs(41, drift=0.0)
    with pytest.raises(ValueError, match=r"beta=0\.04 needs ref_logps"):
        grpo_token_loss(logps, old, None, adv, mask, beta=0.04, epsilon=0.2)


@pytest.mark.parametrize(("group_size", "scale"), [(4, True), (4, False), (3, True), (1, True)])
def test_group_advantages_match_trl(group_size: int, scale: bool) -> None:
    rewards = torch.randn(12, generator=torch.Generator().manual_seed(51), dtype=torch.float64)
    rewards[:group_size] = 0.7  # a group whose completions all scored the same: advantage 0
    ours = group_advantages(rewards, group_size, scale=scale)

    # TRL's GRPOTrainer._generate_and_score_completions (scale_rewards "group" / "none"),
    # inline there, with its own nanstd.
    mean = torch.nanmean(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size)
    if group_size > 1:
        std = nanstd(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size)
    else:
        std = torch.zeros_like(rewards)
    expected = rewards - mean
    if scale:
        expected = expected / (std + 1e-4)
    # nanstd's Bessel factor count / (count - 1) is a float32 division: float32 tolerance.
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-9)

    groups = rewards.numpy().reshape(-1, group_size)
    centred = groups - groups.mean(axis=1, keepdims=True)
    if scale:
        std_np = groups.std(axis=1, ddof=1, keepdims=True) if group_size > 1 else 0.0
        centred = centred / (std_np + 1e-4)
    np.testing.assert_allclose(ours.numpy(), centred.reshape(-1), rtol=1e-9, atol=1e-12)
    assert ours[:group_size].abs().max() < 1e-9


def test_group_advantages_reject_a_partial_group() -> None:
    with pytest.raises(ValueError, match="groups of group_size=4"):
        group_advantages(torch.zeros(10), 4)


# --- token and sequence log-probs --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_logits() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        builtin_config("tiny-llama", vocab_size=96, overrides={"num_hidden_layers": 1})
    )
    input_ids = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    labels = input_ids.clone()
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[1, 7:] = IGNORE_INDEX  # padding
    labels[2, :] = IGNORE_INDEX  # nothing to score
    return logits, labels


def direct_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    full = F.log_softmax(logits[:, :-1].double(), dim=-1)
    logps = full.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logps.masked_fill(~mask, 0.0), mask


def test_token_logps_match_log_softmax(tiny_logits: tuple[Tensor, Tensor]) -> None:
    logits, labels = tiny_logits
    logits = logits.clone().requires_grad_()
    logps, mask = token_logps(logits, labels)
    expected, expected_mask = direct_logps(logits, labels)

    assert logps.dtype == torch.float32
    assert logps.shape == (3, 9)
    assert torch.equal(mask, expected_mask)
    assert mask[0].sum() == 6
    assert mask[1].sum() == 6
    assert mask[2].sum() == 0
    torch.testing.assert_close(logps.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.all(logps[~mask] == 0)
    # TRL's selective_log_softmax on the shifted logits agrees too, and so do the gradients.
    trl_logps = selective_log_softmax(logits[:, :-1], labels[:, 1:].clamp(min=0)) * mask
    torch.testing.assert_close(logps, trl_logps, rtol=1e-5, atol=1e-5)
    (ours_grad,) = grads(logps.sum(), logits)
    (direct_grad,) = grads(expected.sum(), logits)
    torch.testing.assert_close(ours_grad, direct_grad, rtol=1e-5, atol=1e-6)


def test_token_logps_of_bfloat16_logits_are_float32(tiny_logits: tuple[Tensor, Tensor]) -> None:
    logits, labels = tiny_logits
    low = logits.bfloat16()
    logps, _ = token_logps(low, labels)
    expected, _ = direct_logps(low.float(), labels)
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps.double(), expected, rtol=1e-5, atol=1e-5)


def test_sequence_logps_sum_the_labelled_tokens(tiny_logits: tuple[Tensor, Tensor]) -> None:
    logits, labels = tiny_logits
    seq = sequence_logps(logits, labels)
    expected, _ = direct_logps(logits, labels)
    torch.testing.assert_close(seq.double(), expected.sum(-1), rtol=1e-5, atol=1e-5)
    assert seq[2].item() == 0.0
    # The negated total is the summed next-token cross entropy the SFT loop uses.
    torch.testing.assert_close(
        -seq.sum(), next_token_loss_sum(logits, labels), rtol=1e-5, atol=1e-4
    )


def test_token_logps_reject_mismatched_shapes(tiny_logits: tuple[Tensor, Tensor]) -> None:
    logits, labels = tiny_logits
    with pytest.raises(ValueError, match="labels \\(B, T\\)"):
        token_logps(logits, labels[:, :-1])
