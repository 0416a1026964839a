"""Evaluation: token-weighted validation loss, perplexity, label prediction by likelihood,
greedy exact-match answers, classification metrics, and the serving gate.

A labelled dataset is scored one of three ways (`EvalDataset.scoring`), as
lm-evaluation-harness does for multiple choice and generation tasks:

- `loglikelihood` (classification's default; lm-eval's `acc`): the label with the highest
  sum of token log-probabilities after the prompt;
- `loglikelihood-normalized` (lm-eval's `acc_norm`): that sum divided by the label's length
  in characters, so long labels are not penalized for having more tokens;
- `generate` (exact-match's default): the greedy answer, compared with the label as text.

Precision, recall and F1 are over the dataset's label set (its `labels`, or the true labels
seen): an answer outside it is wrong for its true class, not a class of its own. Models
trained on chats (`sft`, `instruction`) see each prompt as a user turn rendered with the
tokenizer's chat template (or `DEFAULT_CHAT_TEMPLATE`), as in training and serving.

Under FSDP2 a forward pass is a collective, so every rank must call `evaluate_loss`,
`label_log_likelihoods`/`predict_labels` and `exact_match_predictions` with the same number
of batches (the same prompts, or equally sized shards).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from kubetrain_api.v1alpha1 import EvalDataset, GateResult, GateThreshold
from kubetrain_trainer.model_folder import DEFAULT_CHAT_TEMPLATE

IGNORE_INDEX = -100  # label value that takes no part in the loss (HF and torch convention)

Average = Literal["macro", "micro", "weighted", "binary"]
Scoring = Literal["generate", "loglikelihood", "loglikelihood-normalized"]
MAX_ANSWER_TOKENS = 32


# --------------------------------------------------------------------------------------
# classification metrics
# --------------------------------------------------------------------------------------


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise division with x/0 = 0 (scikit-learn's zero_division=0)."""
    out = np.zeros(numerator.shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def classification_metrics(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    labels: Sequence[str],
    average: Average,
    pos_label: str | None = None,
) -> dict[str, float]:
    """Accuracy, precision, recall and F1, equal to scikit-learn's `accuracy_score` and
    `precision_recall_fscore_support(labels=labels, average=average, zero_division=0)`.

    Precision, recall and F1 count only the classes in `labels` (a prediction outside them
    is simply wrong); accuracy counts every example. `binary` scores the first label, or
    `pos_label`, as the positive class.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    if not y_true:
        raise ValueError("no examples to score")
    if len(set(labels)) != len(labels) or not labels:
        raise ValueError(f"labels must be non-empty and distinct, got {list(labels)}")

    index = {label: i for i, label in enumerate(labels)}
    true_idx = np.array([index.get(y, -1) for y in y_true])
    pred_idx = np.array([index.get(y, -1) for y in y_pred])
    correct = np.array([t == p for t, p in zip(y_true, y_pred, strict=True)])

    k = len(labels)
    true_sum = np.bincount(true_idx[true_idx >= 0], minlength=k)
    pred_sum = np.bincount(pred_idx[pred_idx >= 0], minlength=k)
    tp_sum = np.bincount(true_idx[correct & (true_idx >= 0)], minlength=k)

    if average == "binary":
        positive = labels[0] if pos_label is None else pos_label
        if positive not in index:
            raise ValueError(f"pos_label {positive!r} is not one of {list(labels)}")
        keep = [index[positive]]
        tp_sum, pred_sum, true_sum = tp_sum[keep], pred_sum[keep], true_sum[keep]
    elif average == "micro":
        tp_sum, pred_sum, true_sum = (np.array([a.sum()]) for a in (tp_sum, pred_sum, true_sum))

    precision = _safe_divide(tp_sum, pred_sum)
    recall = _safe_divide(tp_sum, true_sum)
    f1 = _safe_divide(2 * tp_sum, pred_sum + true_sum)  # = 2tp / (2tp + fp + fn)

    if average == "weighted":
        if true_sum.sum() == 0:
            scores = (0.0, 0.0, 0.0)
        else:
            scores = tuple(float(np.average(a, weights=true_sum)) for a in (precision, recall, f1))
    else:
        scores = (float(precision.mean()), float(recall.mean()), float(f1.mean()))

    return {
        "accuracy": float(correct.mean()),
        "precision": scores[0],
        "recall": scores[1],
        "f1": scores[2],
    }


def perplexity(mean_loss: float) -> float:
    """exp(mean token loss); +inf instead of OverflowError for a diverged model."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf


# --------------------------------------------------------------------------------------
# model evaluation
# --------------------------------------------------------------------------------------


@contextmanager
def _root_unsharded(model: nn.Module) -> Iterator[None]:
    """Gather an FSDP2 root's own parameters (embeddings, final norm, head) for the length
    of the block. `generate` of a PEFT model calls the inner model, not the root's forward,
    so the root's pre-forward hook that would gather them never runs and the embedding
    would meet a sharded DTensor. The blocks gather their own in their hooks."""
    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode without autograd, then back to whatever mode the model was in."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def next_token_loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed cross entropy of position t's logits against token t+1 over the labels that
    are not IGNORE_INDEX (0 when there are none); bf16 logits are upcast for an accurate sum.

    The labels move left, not the logits: slicing `logits[:, :-1]` would copy the largest
    tensor of the step (batch x sequence x vocabulary) once per micro-batch."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def evaluate_loss(
    model: nn.Module, batches: Iterable[dict[str, Tensor]], device: torch.device | str
) -> tuple[float, int]:
    """Token-weighted mean cross entropy over the labels that are not -100, and that token
    count, summed over all ranks when torch.distributed is initialized.

    Batches hold `input_ids`, `labels` (aligned with the inputs, the way HF causal LMs take
    them: the shift happens here) and optionally `attention_mask`. Cap the number of
    batches with `itertools.islice`.
    """
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # [loss sum, token count]
    with _eval_mode(model):
        for batch in batches:
            input_ids = batch["input_ids"].to(device)
            labels = batch["labels"].to(device)
            mask = batch.get("attention_mask")
            # Per-document positions of packed rows keep their documents apart.
            positions = {k: batch[k].to(device) for k in ("position_ids",) if k in batch}
            logits = model(
                input_ids=input_ids,
                attention_mask=None if mask is None else mask.to(device),
                use_cache=False,
                **positions,
            ).logits
            totals[0] += next_token_loss_sum(logits, labels).double()
            totals[1] += (labels[:, 1:] != IGNORE_INDEX).sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    loss_sum, count = float(totals[0]), int(totals[1])
    if count == 0:
        raise ValueError("no labelled tokens to evaluate (every label is -100 or no batches)")
    return loss_sum / count, count


def chat_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[str]:
    """Each prompt as a user turn followed by the assistant's generation prompt, rendered
    with the tokenizer's chat template (`DEFAULT_CHAT_TEMPLATE` when it has none), the way
    `data.tokenize` renders training chats and the server renders requests."""
    template = None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            chat_template=template,
            tokenize=False,
            add_generation_prompt=True,
        )
        for prompt in prompts
    ]


def _ids(tokenizer: Any, text: str, chat: bool) -> list[int]:
    # A rendered chat already holds its special tokens (BOS, role markers), as in training.
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])


def _encode_pairs(
    tokenizer: Any, prompts: Sequence[str], continuations: Sequence[str], chat: bool = False
) -> list[tuple[list[int], int]]:
    """(token ids of prompt + continuation, index where the continuation starts) per pair.

    The whole string is encoded once and the prompt's encoding marks the split, the way
    lm-evaluation-harness does, so BPE merges across the boundary stay as in training.
    """
    pairs = []
    for prompt, continuation in zip(prompts, continuations, strict=True):
        context = _ids(tokenizer, prompt, chat)
        whole = _ids(tokenizer, prompt + continuation, chat)
        if not context:
            raise ValueError(f"prompt {prompt[:40]!r} encodes to no tokens")
        if len(whole) <= len(context):
            raise ValueError(f"continuation {continuation!r} adds no tokens to the prompt")
        pairs.append((whole, len(context)))
    return pairs


def _pad_id(tokenizer: Any) -> int:
    """Pad positions are masked out, so any id does; many causal LMs ship without a pad."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def _pad(rows: Sequence[list[int]], pad_id: int, *, left: bool) -> tuple[Tensor, Tensor]:
    """input_ids and attention_mask of token rows padded to the longest."""
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        span = slice(width - len(ids), width) if left else slice(0, len(ids))
        input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids, attention_mask


def _continuation_log_probs(
    model: nn.Module, pairs: list[tuple[list[int], int]], pad_id: int
) -> list[float]:
    """Sum of the log-probabilities of each pair's continuation tokens, one batch."""
    device = _model_device(model)
    # Right padding: causal attention keeps real positions blind to the pads after them.
    input_ids, attention_mask = _pad([ids for ids, _ in pairs], pad_id, left=False)
    logits = model(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
    ).logits
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    sums = []
    for row, (ids, start) in enumerate(pairs):
        targets = torch.tensor(ids[start:], device=device)
        # logits at position t score token t+1
        picked = log_probs[row, start - 1 : len(ids) - 1].gather(-1, targets[:, None])
        sums.append(float(picked.sum()))
    return sums


def label_log_likelihoods(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    labels: Sequence[str],
    batch_size: int = 8,
    delimiter: str = " ",
    chat: bool = False,
) -> np.ndarray:
    """log P(delimiter + label | prompt) summed over the label's tokens, shape
    [len(prompts), len(labels)]. With `chat`, prompts go through the chat template and the
    label is the assistant's answer right after it (no delimiter)."""
    if not labels:
        raise ValueError("no labels to score")
    pad_id = _pad_id(tokenizer)
    if chat:
        prompts, delimiter = chat_prompts(tokenizer, prompts), ""
    pairs = _encode_pairs(
        tokenizer,
        [p for p in prompts for _ in labels],
        [delimiter + label for _ in prompts for label in labels],
        chat,
    )
    scores: list[float] = []
    with _eval_mode(model):
        for start in range(0, len(pairs), batch_size):
            scores += _continuation_log_probs(model, pairs[start : start + batch_size], pad_id)
    return np.array(scores, dtype=np.float64).reshape(len(prompts), len(labels))


def predict_labels(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    labels: Sequence[str],
    batch_size: int = 8,
    delimiter: str = " ",
    *,
    normalize: bool = False,
    chat: bool = False,
) -> list[str]:
    """For each prompt, the label whose continuation the model finds most likely: the sum
    of its token log-probs, or with `normalize` that sum per character of the label
    (lm-evaluation-harness's `acc_norm`). Ties go to the earlier label."""
    if not prompts:
        return []
    scores = label_log_likelihoods(
        model, tokenizer, prompts, labels, batch_size, delimiter, chat=chat
    )
    if normalize:
        scores = scores / np.array([max(len(label), 1) for label in labels], dtype=np.float64)
    return [labels[i] for i in scores.argmax(axis=1)]


def exact_match_predictions(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 8,
    *,
    chat: bool = False,
) -> list[str]:
    """Greedy answers to each prompt: the generated text only, special tokens dropped,
    whitespace stripped. Works on an FSDP2-sharded model, LoRA or not: ranks keep stepping
    together until every rank's batch is done (`synced_gpus`), since each step is a
    collective."""
    pad_id = _pad_id(tokenizer)
    device = _model_device(model)
    answers: list[str] = []
    synced = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if chat:
        prompts = chat_prompts(tokenizer, prompts)
    with _eval_mode(model), _root_unsharded(model):
        for start in range(0, len(prompts), batch_size):
            rows = [_ids(tokenizer, p, chat) for p in prompts[start : start + batch_size]]
            # Left padding so every row's generated tokens start at the same column.
            input_ids, attention_mask = _pad(rows, pad_id, left=True)
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                synced_gpus=synced,
            )
            new_tokens = out[:, input_ids.shape[1] :]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            answers += [t.strip() for t in texts]
    return answers


def scoring_of(ds: EvalDataset) -> Scoring:
    """The dataset's scoring, or its task's default."""
    if ds.scoring is not None:
        return ds.scoring
    return "loglikelihood" if ds.task == "classification" else "generate"


def labelled_scores(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    labels: Sequence[str] | None,
    average: Average,
) -> dict[str, float]:
    """`classification_metrics` over the dataset's label set: `labels` when the dataset
    lists them, else the true labels seen. Never the predictions: a hallucinated answer
    is a miss for its true class, not a new class with a precision of its own."""
    label_set = list(labels) if labels else sorted(set(y_true))
    return classification_metrics(y_true, y_pred, label_set, average)


def score_dataset(
    model: nn.Module,
    tokenizer: Any,
    ds: EvalDataset,
    prompts: Sequence[str],
    truth: Sequence[str],
    average: Average,
    *,
    chat: bool = False,
) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of the model on one labelled dataset, scored as
    `ds.scoring` says. Every rank must call it with the same prompts (FSDP2)."""
    scoring = scoring_of(ds)
    if scoring == "generate":
        preds = exact_match_predictions(model, tokenizer, prompts, MAX_ANSWER_TOKENS, chat=chat)
    else:
        if not ds.labels:
            raise ValueError(f"evaluation dataset {ds.name}: {scoring} scoring needs labels")
        preds = predict_labels(
            model,
            tokenizer,
            prompts,
            ds.labels,
            normalize=scoring == "loglikelihood-normalized",
            chat=chat,
        )
    return labelled_scores(truth, preds, ds.labels, average)


# --------------------------------------------------------------------------------------
# the serving gate
# --------------------------------------------------------------------------------------


def _shown(value: float, bound: float) -> str:
    """`value` with just enough digits not to print equal to the bound it broke."""
    for digits in (4, 8):
        text = f"{value:.{digits}g}"
        if float(text) != bound:
            return text
    return repr(value)


def _violation(threshold: GateThreshold, value: float | None) -> str | None:
    name = threshold.metric
    if value is None:
        return f"{name} missing"
    if math.isnan(value):
        return f"{name} nan is not a number"
    if threshold.min is not None and value < threshold.min:
        return f"{name} {_shown(value, threshold.min)} < min {threshold.min:g}"
    if threshold.max is not None and value > threshold.max:
        return f"{name} {_shown(value, threshold.max)} > max {threshold.max:g}"
    return None


def check_gate(metrics: Mapping[str, float], gate: Sequence[GateThreshold]) -> GateResult:
    """Passes when every threshold holds; a missing or NaN metric fails its threshold.
    An empty gate passes."""
    failures = [f for t in gate if (f := _violation(t, metrics.get(t.metric))) is not None]
    return GateResult(passed=not failures, failures=failures)
