"""The rewards of sampled completions (GRPO): verifiable checks and reward models.

Each reward turns (prompt, completion, reference answer) rows into one number per row;
a completion's reward is their weighted sum (`spec.grpo.rewards`, whose `type` docstring
in kubetrain_api.v1alpha1 is the contract). Verifiable rewards are 1/0 or a score in
[0, 1]; a reward model scores what its head says, unbounded for a single logit.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from kubetrain_api import v1alpha1 as api
from kubetrain_trainer.data.readers import DataError
from kubetrain_trainer.exits import SpecFailure
from kubetrain_trainer.models import resolve_model_path

# (prompts, completions, answers) -> one value per row
Scorer = Callable[[Sequence[str], Sequence[str], Sequence[str | None]], np.ndarray]

_MODEL_BATCH = 16  # rows per reward-model forward


class Rewards:
    """The run's rewards, built once (reward models loaded onto `device`)."""

    def __init__(
        self, specs: Sequence[api.RewardSpec], *, cache_dir: Path, device: torch.device
    ) -> None:
        if not specs:
            raise SpecFailure("spec.grpo.rewards: method grpo needs at least one reward")
        self.names: list[str] = _names([spec.type for spec in specs])
        """One per reward, unique: its type, suffixed -2, -3 when the type repeats."""
        self.weights = np.array([spec.weight for spec in specs], dtype=np.float64)
        self._scorers = [
            _scorer(f"spec.grpo.rewards[{i}]", spec, cache_dir, device)
            for i, spec in enumerate(specs)
        ]

    def score(
        self, prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str | None]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(weighted total per row, unweighted value of each reward per row), for rows of
        (prompt text, completion text, the row's reference answer or None)."""
        if not len(prompts) == len(completions) == len(answers):
            raise ValueError(
                f"score needs as many prompts ({len(prompts)}), completions "
                f"({len(completions)}) and answers ({len(answers)})"
            )
        values = {
            name: np.asarray(scorer(prompts, completions, answers), dtype=np.float64)
            for name, scorer in zip(self.names, self._scorers, strict=True)
        }
        total = self.weights @ np.stack(list(values.values()))
        return total, values


def _names(types: Sequence[str]) -> list[str]:
    seen: Counter[str] = Counter()
    names = []
    for kind in types:
        seen[kind] += 1
        names.append(kind if seen[kind] == 1 else f"{kind}-{seen[kind]}")
    return names


def _scorer(path: str, spec: api.RewardSpec, cache_dir: Path, device: torch.device) -> Scorer:
    if spec.type == "exact-match":
        return _exact_match(path)
    if spec.type == "regex":
        return _regex(path, spec.pattern)
    if spec.type == "json-schema":
        return _json_schema(path, spec.json_schema)
    if spec.type == "length":
        return _length(path, spec.min_chars, spec.max_chars)
    if spec.type == "model":
        if not spec.model:
            raise SpecFailure(f"{path}.model: reward type model needs a model folder")
        return RewardModel(spec.model, cache_dir=cache_dir, device=device, field=f"{path}.model")
    raise SpecFailure(f"{path}.type: unknown reward type {spec.type!r}")


def _per_row(fn: Callable[[str], float]) -> Scorer:
    def score(
        prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str | None]
    ) -> np.ndarray:
        return np.array([fn(c) for c in completions], dtype=np.float64)

    return score


def _exact_match(path: str) -> Scorer:
    def score(
        prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str | None]
    ) -> np.ndarray:
        missing = [i for i, answer in enumerate(answers) if answer is None]
        if missing:
            raise DataError(
                f"{path}: exact-match compares with each prompt's reference answer, but "
                f"{len(missing)} of {len(answers)} rows have none (first: row {missing[0]}); "
                "give every prompt-only record its answer in the `label` field "
                "(spec.data.sources[].fields.label names it)"
            )
        return np.array(
            [
                float(c.strip().casefold() == str(a).strip().casefold())
                for c, a in zip(completions, answers, strict=True)
            ],
            dtype=np.float64,
        )

    return score


def _regex(path: str, pattern: str | None) -> Scorer:
    if pattern is None:
        raise SpecFailure(f"{path}.pattern: reward type regex needs a pattern")
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise SpecFailure(f"{path}.pattern: not a regular expression: {exc}") from None
    return _per_row(lambda c: float(compiled.search(c) is not None))


def _json_schema(path: str, schema: dict[str, Any] | None) -> Scorer:
    if schema is None:
        raise SpecFailure(f"{path}.jsonSchema: reward type json-schema needs a schema")
    validator_class = jsonschema.Draft202012Validator
    try:
        validator_class.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise SpecFailure(f"{path}.jsonSchema: not a valid JSON Schema: {exc.message}") from None
    validator = validator_class(schema)

    def valid(completion: str) -> float:
        try:
            document = json.loads(completion)
        except ValueError:  # not JSON (json.JSONDecodeError), or a number too long to parse
            return 0.0
        return float(validator.is_valid(document))

    return _per_row(valid)


def _length(path: str, min_chars: int | None, max_chars: int | None) -> Scorer:
    """1 within [min, max] characters, falling linearly to 0 at 0 characters below and at
    twice `max` above."""
    if min_chars is None and max_chars is None:
        raise SpecFailure(f"{path}.minChars: reward type length needs minChars or maxChars")
    low = min_chars or 0
    if max_chars is not None and low > max_chars:
        raise SpecFailure(f"{path}.minChars: must be <= maxChars")

    def reward(completion: str) -> float:
        n = len(completion)
        if n < low:
            return n / low
        if max_chars is not None and n > max_chars:
            return max(0.0, 1.0 - (n - max_chars) / max_chars)
        return 1.0

    return _per_row(reward)


class RewardModel:
    """A transformers sequence-classification model as a reward: its one label's logit,
    or the probability of its last label when it has two or more. It reads the user
    prompt and the assistant completion through its tokenizer's chat template when it
    has one (as it was trained), else `prompt + "\\n" + completion`."""

    def __init__(self, uri: str, *, cache_dir: Path, device: torch.device, field: str) -> None:
        try:
            folder = resolve_model_path(uri, cache_dir)
        except (FileNotFoundError, ValueError) as exc:
            raise SpecFailure(f"{field}: {exc}") from None
        architectures = _architectures(folder)
        if architectures and not any(
            a.endswith("ForSequenceClassification") for a in architectures
        ):
            # Loading anyway would give it a new, random score head: a reward of noise.
            raise SpecFailure(
                f"{field}: {uri} is a {', '.join(architectures)}, not a sequence-"
                "classification model (a reward model has a *ForSequenceClassification head)"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        if self.tokenizer.pad_token is None:
            # Batches need one; the model pools at the last token that is not padding.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(folder).to(device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = device

    def inputs(self, prompts: Sequence[str], completions: Sequence[str]) -> dict[str, Any]:
        """The tokenized rows, padded: what the model reads."""
        if self.tokenizer.chat_template:
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                    tokenize=False,
                )
                for p, c in zip(prompts, completions, strict=True)
            ]
            # The template writes the special tokens it wants itself.
            return dict(
                self.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
            )
        texts = [f"{p}\n{c}" for p, c in zip(prompts, completions, strict=True)]
        return dict(self.tokenizer(texts, padding=True, return_tensors="pt"))

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str | None]
    ) -> np.ndarray:
        scores: list[torch.Tensor] = []
        with torch.no_grad():
            for start in range(0, len(completions), _MODEL_BATCH):
                end = start + _MODEL_BATCH
                batch = self.inputs(prompts[start:end], completions[start:end])
                logits = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits
                logits = logits.float()
                if logits.shape[-1] == 1:
                    scores.append(logits[:, 0])
                else:
                    scores.append(logits.softmax(-1)[:, -1])
        if not scores:
            return np.zeros(0)
        return torch.cat(scores).cpu().numpy().astype(np.float64)


def _architectures(folder: Path) -> list[str]:
    """The classes a model folder's config.json names (none for some hand-made folders)."""
    config = json.loads((folder / "config.json").read_text())
    return [str(a) for a in config.get("architectures") or []]
