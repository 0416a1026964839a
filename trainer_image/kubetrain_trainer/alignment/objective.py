"""The step and the evaluation of methods dpo, kto and grpo, for `loop.Trainer`.

One `Objective` per run, built by `build`. `accumulate` replaces the language-modelling
`loop.accumulate_gradients`: backward over this process's micro-batches so that the reduced
gradients are those of the global batch's mean loss (over pairs for dpo, over examples for
kto, over completion tokens for grpo: TRL's `dapo` normalization), whatever the split into
micro-batches and processes. Every rank runs the same number of forwards (FSDP2: each is a
collective). Numbers users watch (`NUMBERS`) come back as 0-d device tensors, read by the
loop at its logging steps only.

The reference model is a frozen, sharded copy of the starting model; under LoRA it is the
policy itself with its adapters disabled (the base), which costs no memory.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from kubetrain_api import v1alpha1 as api
from kubetrain_trainer.data import preference as pref_data
from kubetrain_trainer.evaluate import _eval_mode  # eval mode without autograd, restored
from kubetrain_trainer.parallelize import set_gradient_sync

from . import losses

if TYPE_CHECKING:
    from kubetrain_trainer.loop import Trainer

# The step event's keys for these methods (api.Progress has the same, camelCased).
NUMBERS = ("reward_mean", "reward_std", "reward_margin", "reward_accuracy", "kl")

Batch = dict[str, Tensor]


@dataclass
class StepOut:
    loss: Tensor
    trained: Tensor  # pairs (dpo), examples (kto), completion tokens (grpo), global
    tokens: int  # tokens this process ran forward for training (throughput)
    numbers: dict[str, Tensor]


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _all_sum(t: Tensor) -> Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def _all_mean(t: Tensor) -> Tensor:
    return _all_sum(t) / _world()


class Reference:
    """Log-probabilities under the frozen reference model, without autograd."""

    def __init__(self, trainer: Trainer) -> None:
        self.policy = trainer.model
        self.model: nn.Module | None = None
        if trainer.spec.lora is None:
            from kubetrain_trainer import sharded_init

            # The same starting weights, sharded the same way; never trained or saved.
            frozen = dataclasses.replace(
                trainer.config,
                spec=trainer.spec.model_copy(update={"lora": None}),
            )
            self.model, _ = sharded_init.build_for_training(
                frozen, trainer.device, vocab_size=len(trainer.tokenizer)
            )
            self.model.requires_grad_(False)
            self.model.eval()

    @contextlib.contextmanager
    def _forward_model(self) -> Iterator[nn.Module]:
        if self.model is not None:
            yield self.model
            return
        # PEFT: the base is the policy with its adapters off (and in eval mode: no dropout).
        was_training = self.policy.training
        self.policy.eval()
        try:
            with self.policy.disable_adapter():  # type: ignore[operator]
                yield self.policy
        finally:
            self.policy.train(was_training)

    @torch.no_grad()
    def token_logps(self, input_ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        with self._forward_model() as model:
            logits = model(input_ids=input_ids, use_cache=False).logits
        return losses.token_logps(logits, labels)

    def sequence_logps(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        logps, _ = self.token_logps(input_ids, labels)
        return logps.sum(-1)


def _sequence_logps(model: nn.Module, input_ids: Tensor, labels: Tensor) -> Tensor:
    logits = model(input_ids=input_ids, use_cache=False).logits
    return losses.sequence_logps(logits, labels)


class Objective(abc.ABC):
    """What the loop calls; subclasses per method."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.device = trainer.device
        self.reference: Reference | None = Reference(trainer) if self.needs_reference() else None

    def needs_reference(self) -> bool:
        return True

    @abc.abstractmethod
    def accumulate(
        self, model: nn.Module, micro: Sequence[tuple[np.ndarray, Batch]]
    ) -> StepOut: ...

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, metrics: Sequence[str]) -> dict[str, float]: ...

    def _val_batches(self) -> Iterator[tuple[np.ndarray, Batch]]:
        """The validation rows every rank evaluates (the same on all: FSDP2)."""
        data, ev = self.trainer.val_data, self.trainer.spec.evaluation
        size = self.trainer.config.micro_batch_size
        rows = min(data.rows, size * ev.max_batches)
        for start in range(0, rows, size):
            at = np.arange(start, min(start + size, rows))
            yield at, self._tensors(data.take(at))

    def _tensors(self, rows: dict[str, np.ndarray]) -> Batch:
        return {k: torch.from_numpy(v.astype(np.int64)).to(self.device) for k, v in rows.items()}


# --------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------


class Dpo(Objective):
    """Pairs: one forward of chosen and rejected rows together, per micro-batch."""

    def __init__(self, trainer: Trainer) -> None:
        super().__init__(trainer)
        self.settings = trainer.spec.dpo or api.DpoSpec()

    def _terms(self, model: nn.Module, b: Batch) -> tuple[losses.DpoTerms, Tensor, Tensor]:
        n = b["chosen_input_ids"].shape[0]
        ids = torch.cat([b["chosen_input_ids"], b["rejected_input_ids"]])
        labels = torch.cat([b["chosen_labels"], b["rejected_labels"]])
        logps = _sequence_logps(model, ids, labels)
        assert self.reference is not None
        ref = self.reference.sequence_logps(ids, labels)
        terms = losses.dpo_loss(
            logps[:n],
            logps[n:],
            ref[:n],
            ref[n:],
            beta=self.settings.beta,
            label_smoothing=self.settings.label_smoothing,
        )
        return terms, ids, labels

    def accumulate(self, model: nn.Module, micro: Sequence[tuple[np.ndarray, Batch]]) -> StepOut:
        pairs = _all_sum(torch.tensor(sum(len(r) for r, _ in micro), device=self.device))
        scale = _world() / pairs.clamp(min=1).double()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, margin, right
        tokens = 0
        for m, (_, b) in enumerate(micro):
            set_gradient_sync(model, m == len(micro) - 1)
            terms, ids, _ = self._terms(model, b)
            (terms.losses.sum() * scale.to(terms.losses.dtype)).backward()
            margin = terms.chosen_rewards - terms.rejected_rewards
            sums += torch.stack(
                [terms.losses.detach().sum(), margin.sum(), (margin > 0).sum()]
            ).double()
            tokens += int(ids.numel())
        _all_sum(sums)
        divisor = pairs.clamp(min=1).double()
        return StepOut(
            loss=sums[0] / divisor,
            trained=pairs,
            tokens=tokens,
            numbers={"reward_margin": sums[1] / divisor, "reward_accuracy": sums[2] / divisor},
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module, metrics: Sequence[str]) -> dict[str, float]:
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, n, nll, tokens
        with _eval_mode(model):
            for _, b in self._val_batches():
                terms, _, _ = self._terms(model, b)
                nll, count = _nll(model, b["chosen_input_ids"], b["chosen_labels"])
                sums += torch.stack([terms.losses.sum().double(), _n(terms.losses), nll, count])
        return _loss_and_perplexity(sums, metrics)


# --------------------------------------------------------------------------------------
# KTO
# --------------------------------------------------------------------------------------


class Kto(Objective):
    """Unpaired examples; the reference point is the KL of mismatched pairs (the rows'
    prompts with the next row's completion, prepared with the data), per micro-batch,
    averaged over processes, as TRL does per batch."""

    def __init__(self, trainer: Trainer) -> None:
        super().__init__(trainer)
        self.settings = trainer.spec.kto or api.KtoSpec()

    def _terms(self, model: nn.Module, b: Batch) -> tuple[losses.KtoTerms, Tensor]:
        assert self.reference is not None
        with torch.no_grad():
            policy_kl = _sequence_logps(model, b["kl_input_ids"], b["kl_labels"])
            ref_kl = self.reference.sequence_logps(b["kl_input_ids"], b["kl_labels"])
        kl = losses.kto_kl(policy_kl, ref_kl, reduce=_all_mean)
        logps = _sequence_logps(model, b["input_ids"], b["labels"])
        ref = self.reference.sequence_logps(b["input_ids"], b["labels"])
        good = b["desirable"].bool()
        terms = losses.kto_loss(
            logps[good],
            logps[~good],
            ref[good],
            ref[~good],
            kl,
            beta=self.settings.beta,
            desirable_weight=self.settings.desirable_weight,
            undesirable_weight=self.settings.undesirable_weight,
        )
        return terms, kl

    def accumulate(self, model: nn.Module, micro: Sequence[tuple[np.ndarray, Batch]]) -> StepOut:
        examples = _all_sum(torch.tensor(sum(len(r) for r, _ in micro), device=self.device))
        scale = _world() / examples.clamp(min=1).double()
        # loss, kl, chosen reward sum and count, rejected reward sum and count
        sums = torch.zeros(6, dtype=torch.float64, device=self.device)
        tokens = 0
        for m, (_, b) in enumerate(micro):
            set_gradient_sync(model, m == len(micro) - 1)
            terms, kl = self._terms(model, b)
            (terms.losses.sum() * scale.to(terms.losses.dtype)).backward()
            sums += _kto_sums(terms, kl)
            tokens += int(b["input_ids"].numel() + b["kl_input_ids"].numel())
        kl_mean = sums[1] / len(micro)  # each micro-batch's kl is already a global mean
        _all_sum(sums)
        return StepOut(
            loss=sums[0] / examples.clamp(min=1).double(),
            trained=examples,
            tokens=tokens,
            numbers={"reward_margin": _margin(sums), "kl": kl_mean},
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module, metrics: Sequence[str]) -> dict[str, float]:
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, n, nll, tokens
        with _eval_mode(model):
            for _, b in self._val_batches():
                terms, _ = self._terms(model, b)
                good = b["desirable"].bool()
                nll, count = _nll(model, b["input_ids"][good], b["labels"][good])
                sums += torch.stack([terms.losses.sum().double(), _n(terms.losses), nll, count])
        return _loss_and_perplexity(sums, metrics)


def _kto_sums(terms: losses.KtoTerms, kl: Tensor) -> Tensor:
    return torch.stack(
        [
            terms.losses.detach().sum().double(),
            kl.double(),
            terms.chosen_rewards.sum().double(),
            _n(terms.chosen_rewards),
            terms.rejected_rewards.sum().double(),
            _n(terms.rejected_rewards),
        ]
    )


def _margin(sums: Tensor) -> Tensor:
    """Mean desirable minus mean undesirable implicit reward (0 for a side not seen)."""
    return sums[2] / sums[3].clamp(min=1) - sums[4] / sums[5].clamp(min=1)


# --------------------------------------------------------------------------------------
# GRPO
# --------------------------------------------------------------------------------------


class Grpo(Objective):
    """Per micro-batch of prompts, `generations` sampled completions each, scored by the
    rewards; advantages within each prompt's group. Sampling for the whole step comes
    first, so that the loss divides by the step's global completion-token count (TRL's
    `dapo`). One optimization pass per sample: the old policy is the current one, so the
    importance ratio is 1 in value and its gradient that of the log-probability."""

    def __init__(self, trainer: Trainer) -> None:
        from .rewards import Rewards

        self.settings = trainer.spec.grpo
        assert self.settings is not None, "validation requires spec.grpo for method grpo"
        super().__init__(trainer)
        self.rewards = Rewards(
            self.settings.rewards,
            cache_dir=trainer.config.output_dir / "cache",
            device=trainer.device,
        )
        data_dir = trainer.config.data_dir
        self.answers = {
            "train": pref_data.read_answers(data_dir, "train"),
            "validation": pref_data.read_answers(data_dir, "validation"),
        }
        tokenizer = trainer.tokenizer
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.eos_id = int(tokenizer.eos_token_id)

    def needs_reference(self) -> bool:
        return self.settings is not None and self.settings.beta > 0

    def _rollout(
        self, model: nn.Module, rows: np.ndarray, b: Batch, split: str, greedy: bool = False
    ) -> tuple[Any, np.ndarray]:
        from .rollout import sample

        s = self.settings
        assert s is not None
        lengths = b["prompt_length"].tolist()
        prompts = [b["input_ids"][i, :n].tolist() for i, n in enumerate(lengths)]
        groups = 1 if greedy else s.generations
        out = sample(
            model,
            self.trainer.tokenizer,
            prompts,
            generations=groups,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            device=self.device,
            greedy=greedy,
            pad_id=self.pad_id,
            eos_id=self.eos_id,
        )
        answers = self.answers[split]
        texts = self.trainer.tokenizer.batch_decode(prompts, skip_special_tokens=True)
        total, _ = self.rewards.score(
            [texts[i // groups] for i in range(len(out.texts))],
            out.texts,
            [answers[int(rows[i // groups])] for i in range(len(out.texts))],
        )
        return out, total

    def accumulate(self, model: nn.Module, micro: Sequence[tuple[np.ndarray, Batch]]) -> StepOut:
        s = self.settings
        assert s is not None
        rollouts = []
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)  # n, sum, sum of squares
        local_tokens = torch.zeros((), dtype=torch.int64, device=self.device)
        for rows, b in micro:
            out, total = self._rollout(model, rows, b, "train")
            rewards = torch.tensor(total, dtype=torch.float32, device=self.device)
            advantages = losses.group_advantages(rewards, s.generations)
            rollouts.append((out, advantages))
            r = rewards.double()
            stats += torch.stack([_n(r), r.sum(), (r * r).sum()])
            local_tokens += (out.labels[:, 1:] != -100).sum().to(self.device)
        _all_sum(stats)
        total_tokens = _all_sum(local_tokens.clone())
        scale = _world() / total_tokens.clamp(min=1).double()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss, kl
        tokens = 0
        model.train()
        for m, (out, advantages) in enumerate(rollouts):
            set_gradient_sync(model, m == len(rollouts) - 1)
            ids, labels = out.input_ids.to(self.device), out.labels.to(self.device)
            logits = model(input_ids=ids, use_cache=False).logits
            logps, mask = losses.token_logps(logits, labels)
            ref = None
            if self.reference is not None:
                ref, _ = self.reference.token_logps(ids, labels)
            terms = losses.grpo_token_loss(
                logps,
                logps.detach(),
                ref,
                advantages,
                mask,
                beta=s.beta,
                epsilon=s.epsilon,
            )
            (terms.loss_sum * scale.to(terms.loss_sum.dtype)).backward()
            sums += torch.stack([terms.loss_sum.detach().double(), terms.kl_sum.double()])
            tokens += int(ids.numel())
        _all_sum(sums)
        divisor = total_tokens.clamp(min=1).double()
        n = stats[0].clamp(min=1)
        mean = stats[1] / n
        variance = (stats[2] / n - mean * mean).clamp(min=0)
        return StepOut(
            loss=sums[0] / divisor,
            trained=total_tokens,
            tokens=tokens,
            numbers={"reward_mean": mean, "reward_std": variance.sqrt(), "kl": sums[1] / divisor},
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module, metrics: Sequence[str]) -> dict[str, float]:
        """`reward`: the mean reward of greedy completions of the validation prompts."""
        if "reward" not in metrics or not self.trainer.val_data.rows:
            return {}
        total, count = 0.0, 0
        for rows, b in self._val_batches():
            _, rewards = self._rollout(model, rows, b, "validation", greedy=True)
            total, count = total + float(rewards.sum()), count + len(rewards)
        return {"reward": total / max(count, 1)}


# --------------------------------------------------------------------------------------


def _n(t: Tensor) -> Tensor:
    """len(t) as a float64 0-d tensor on t's device."""
    return torch.tensor(float(len(t)), dtype=torch.float64, device=t.device)


def _nll(model: nn.Module, input_ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed negative log-likelihood of the labelled tokens, and their count."""
    if not len(input_ids):
        zero = torch.zeros((), dtype=torch.float64, device=input_ids.device)
        return zero, zero
    logits = model(input_ids=input_ids, use_cache=False).logits
    logps, mask = losses.token_logps(logits, labels)
    return -logps.sum().double(), mask.sum().double()


def _loss_and_perplexity(sums: Tensor, metrics: Sequence[str]) -> dict[str, float]:
    """Validation loss (the method's, per example) and the perplexity of the chosen or
    desirable completions, from [loss sum, examples, nll sum, tokens]; every rank ran the
    same rows, so nothing is reduced."""
    out: dict[str, float] = {}
    if sums[1] > 0 and "loss" in metrics:
        out["loss"] = float(sums[0] / sums[1])
    if sums[3] > 0 and "perplexity" in metrics:
        out["perplexity"] = math.exp(min(float(sums[2] / sums[3]), 700.0))
    return out


METHODS: dict[str, type[Objective]] = {"dpo": Dpo, "kto": Kto, "grpo": Grpo}


def build(trainer: Trainer) -> Objective | None:
    """The run's objective, or None for the language-modelling methods."""
    cls = METHODS.get(trainer.spec.method)
    return cls(trainer) if cls is not None else None


def preference_accuracy(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[pref_data.PreferenceExample],
    seq_len: int,
    batch_size: int,
) -> float:
    """Share of pairs whose chosen completion the model finds more likely (summed token
    log-probabilities) than the rejected one. Every rank must call it with the same
    examples (FSDP2)."""
    if not examples:
        raise ValueError("no preference pairs to evaluate")
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    device = next(model.parameters()).device
    right = 0
    with _eval_mode(model):
        for start in range(0, len(examples), batch_size):
            part = examples[start : start + batch_size]
            rows = [
                pref_data.encode_completion(tokenizer, e.prompt, completion, seq_len)
                for e in part
                for completion in (e.chosen, e.rejected)
            ]
            ids, labels = _padded(rows, pad, device)
            logps = _sequence_logps(model, ids, labels).view(-1, 2)
            right += int((logps[:, 0] > logps[:, 1]).sum())
    return right / len(examples)


def _padded(
    rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(list(row_ids))
        labels[i, : len(row_labels)] = torch.tensor(list(row_labels))
    return ids.to(device), labels.to(device)
