"""The dpo and kto steps of `alignment.objective` on one process: the loss they report is
the losses module's mean over the global batch, and the gradients do not depend on how the
batch splits into micro-batches (the normalization a gradient accumulation must get right;
the Ray test runs them over two FSDP2 ranks)."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from kubetrain_api import v1alpha1 as api
from kubetrain_trainer.alignment import losses, objective
from tests.trainer.alignment.rollout_worker import policy

pytestmark = pytest.mark.trainer

ROWS, WIDTH, VOCAB = 4, 12, 64


def rows(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows: a prompt of 4 tokens, a completion labelled after it."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (ROWS, WIDTH), generator=generator)
    labels = ids.clone()
    labels[:, :4] = -100
    for i, end in enumerate((12, 10, 9, 11)):
        ids[i, end:], labels[i, end:] = 0, -100
    return ids, labels


def build(cls: type[objective.Objective], model: torch.nn.Module, settings: Any) -> Any:
    """An objective without a Trainer: the policy, a frozen copy as the reference."""
    obj = cls.__new__(cls)
    obj.device = torch.device("cpu")
    obj.settings = settings
    reference = objective.Reference.__new__(objective.Reference)
    reference.policy, reference.model = model, copy.deepcopy(model).requires_grad_(False)
    obj.reference = reference
    return obj


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """The policy a few updates away from the reference, so the losses are not at 0."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def logp(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return losses.sequence_logps(model(input_ids=ids).logits, labels)


def grads(model: torch.nn.Module) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return out


def split(batch: dict[str, torch.Tensor], sizes: list[int]) -> list[tuple[np.ndarray, Any]]:
    out, at = [], 0
    for n in sizes:
        out.append((np.arange(at, at + n), {k: v[at : at + n] for k, v in batch.items()}))
        at += n
    return out


@pytest.fixture
def model(tmp_path: Path) -> torch.nn.Module:
    base = policy(VOCAB, tmp_path).train()
    return base


def test_dpo_step_is_the_mean_pair_loss_whatever_the_split(model: torch.nn.Module) -> None:
    settings = api.DpoSpec(beta=0.5, label_smoothing=0.1)
    dpo = build(objective.Dpo, model, settings)
    perturbed(model)
    chosen, chosen_labels = rows(1)
    rejected, rejected_labels = rows(2)
    batch = {
        "chosen_input_ids": chosen,
        "chosen_labels": chosen_labels,
        "rejected_input_ids": rejected,
        "rejected_labels": rejected_labels,
    }
    whole = dpo.accumulate(model, split(batch, [4]))
    g_whole = grads(model)
    parts = dpo.accumulate(model, split(batch, [1, 3]))
    g_parts = grads(model)
    for a, b in zip(g_whole, g_parts, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert float(parts.loss) == pytest.approx(float(whole.loss), rel=1e-5)

    with torch.no_grad():
        ref = dpo.reference.model
        terms = losses.dpo_loss(
            logp(model, chosen, chosen_labels),
            logp(model, rejected, rejected_labels),
            logp(ref, chosen, chosen_labels),
            logp(ref, rejected, rejected_labels),
            beta=0.5,
            label_smoothing=0.1,
        )
    assert float(whole.loss) == pytest.approx(float(terms.losses.mean()), rel=1e-5)
    margin = terms.chosen_rewards - terms.rejected_rewards
    assert float(whole.numbers["reward_margin"]) == pytest.approx(float(margin.mean()), rel=1e-5)
    assert float(whole.numbers["reward_accuracy"]) == float((margin > 0).float().mean())
    assert int(whole.trained) == ROWS


def test_kto_step_is_the_mean_example_loss_whatever_the_split(model: torch.nn.Module) -> None:
    settings = api.KtoSpec(beta=0.3, desirable_weight=1.5, undesirable_weight=0.5)
    kto = build(objective.Kto, model, settings)
    perturbed(model)
    ids, labels = rows(3)
    kl_ids, kl_labels = rows(4)
    batch = {
        "input_ids": ids,
        "labels": labels,
        "kl_input_ids": kl_ids,
        "kl_labels": kl_labels,
        "desirable": torch.tensor([1, 0, 1, 1]),
    }
    # One micro-batch: the KL reference point is the batch's own, as in TRL.
    whole = kto.accumulate(model, split(batch, [4]))
    g_whole = grads(model)
    with torch.no_grad():
        ref = kto.reference.model
        good = batch["desirable"].bool()
        policy_logps, ref_logps = logp(model, ids, labels), logp(ref, ids, labels)
        kl = losses.kto_kl(logp(model, kl_ids, kl_labels), logp(ref, kl_ids, kl_labels))
        terms = losses.kto_loss(
            policy_logps[good],
            policy_logps[~good],
            ref_logps[good],
            ref_logps[~good],
            kl,
            beta=0.3,
            desirable_weight=1.5,
            undesirable_weight=0.5,
        )
    assert float(whole.loss) == pytest.approx(float(terms.losses.mean()), rel=1e-5)
    assert float(whole.numbers["kl"]) == pytest.approx(float(kl), rel=1e-5)
    assert any(float(g.abs().sum()) > 0 for g in g_whole)
    # Split in two, each half has its own reference point (a per-micro-batch KL, as TRL's
    # per-device batch): the loss still averages over all four examples.
    parts = kto.accumulate(model, split(batch, [2, 2]))
    grads(model)
    assert int(parts.trained) == ROWS
    assert float(parts.loss) == pytest.approx(float(whole.loss), rel=0.2)


def test_build_picks_the_methods_objective() -> None:
    trainer: Any = SimpleNamespace(spec=SimpleNamespace(method="sft"))
    assert objective.build(trainer) is None
    assert set(objective.METHODS) == set(api.METHOD_FORMATS)
