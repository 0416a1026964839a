"""Loss, perplexity, likelihood-based label prediction, greedy answers, the serving gate."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from transformers import PreTrainedTokenizerFast

from kubetrain_api.v1alpha1 import EvalDataset, GateResult, GateThreshold
from kubetrain_trainer import evaluate
from kubetrain_trainer.evaluate import (
    chat_prompts,
    check_gate,
    evaluate_loss,
    exact_match_predictions,
    label_log_likelihoods,
    perplexity,
    predict_labels,
    score_dataset,
    scoring_of,
)
from tests.trainer.metrics import dist_worker
from tests.trainer.metrics.conftest import tiny_llama
from tests.trainer.metrics.dist_worker import VOCAB, make_batches

# ---- perplexity ------------------------------------------------------------------------


def test_perplexity_is_exp_of_loss_and_never_overflows():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(30.0)) == pytest.approx(30.0)
    assert perplexity(2.5) == pytest.approx(math.e**2.5)
    assert perplexity(1e6) == math.inf


# ---- evaluate_loss ---------------------------------------------------------------------


def hand_loss(model: nn.Module, batches) -> tuple[float, int]:
    """Cross entropy written out token by token: position t predicts label t+1."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            for row in range(logits.shape[0]):
                for t in range(logits.shape[1] - 1):
                    target = int(b["labels"][row, t + 1])
                    if target == -100:
                        continue
                    row_logits = logits[row, t].double()
                    total += float(torch.logsumexp(row_logits, 0) - row_logits[target])
                    count += 1
    return total / count, count


def test_evaluate_loss_is_token_weighted_and_ignores_minus_100():
    # Dropout on: a result equal to the eval-mode hand count proves eval mode was used.
    model = tiny_llama(VOCAB, attention_dropout=0.5).train()
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_grad_enabled())))
    batches = make_batches()
    loss, count = evaluate_loss(model, batches, "cpu")
    assert seen == [(False, False)] * len(batches)
    assert model.training  # restored
    expected_loss, expected_count = hand_loss(model, batches)
    assert count == expected_count == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    assert loss == pytest.approx(expected_loss, rel=1e-5)


def test_evaluate_loss_matches_the_models_own_shifted_loss():
    model = tiny_llama(VOCAB)
    batch = make_batches()[0]
    batch.pop("attention_mask")
    loss, _ = evaluate_loss(model, [batch], torch.device("cpu"))
    with torch.no_grad():
        hf_loss = model(**batch).loss  # HF shifts labels inside: same convention
    assert loss == pytest.approx(float(hf_loss), rel=1e-5)
    assert not model.training  # an eval-mode model stays in eval mode


def test_evaluate_loss_without_labelled_tokens_is_an_error():
    batch = make_batches()[0]
    batch["labels"][:] = -100
    with pytest.raises(ValueError, match="no labelled tokens"):
        evaluate_loss(tiny_llama(VOCAB), [batch], "cpu")


@pytest.mark.trainer
def test_evaluate_loss_reduces_over_ranks(tmp_path):
    out = str(tmp_path / "result")
    mp.spawn(dist_worker.run, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"result.{r}").read_text()) for r in range(2)]
    expected_loss, expected_count = hand_loss(dist_worker.TinyLM(), make_batches())
    for r in results:  # every rank holds the global numbers
        assert r["count"] == expected_count
        assert r["loss"] == pytest.approx(expected_loss, rel=1e-5)


# ---- predict_labels --------------------------------------------------------------------


class BiasLM(nn.Module):
    """Logits are a constant bias whatever the input: the model's preference is rigged."""

    def __init__(self, vocab_size: int, favoured: dict[int, float]):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 4)
        self.head = nn.Linear(4, vocab_size)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            for token, bias in favoured.items():
                self.head.bias[token] = bias

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=self.head(self.embed(input_ids)))


PROMPTS = ["review : the film was great . sentiment :", "review : the film was awful sentiment :"]


@pytest.mark.parametrize("favoured", ["positive", "negative"])
def test_predict_labels_picks_the_label_the_model_prefers(word_tokenizer, favoured):
    token = word_tokenizer.convert_tokens_to_ids(favoured)
    model = BiasLM(len(word_tokenizer), {token: 5.0}).train()
    preds = predict_labels(model, word_tokenizer, PROMPTS, ["positive", "negative"])
    assert preds == [favoured, favoured]
    assert model.training


def test_label_log_likelihood_is_the_sum_over_label_tokens(word_tokenizer):
    vocab = len(word_tokenizer)
    good = word_tokenizer.convert_tokens_to_ids("good")
    model = BiasLM(vocab, {good: 3.0})
    labels = ["good", "very good", "bad"]
    scores = label_log_likelihoods(model, word_tokenizer, PROMPTS, labels, batch_size=2)
    log_z = math.log(vocab - 1 + math.exp(3.0))
    expected = [3.0 - log_z, (0.0 - log_z) + (3.0 - log_z), 0.0 - log_z]
    np.testing.assert_allclose(scores, [expected, expected], rtol=1e-5)
    # A sum, not a mean: the longer label loses although its last token is the favourite.
    assert predict_labels(model, word_tokenizer, PROMPTS, labels) == ["good", "good"]


def test_label_scores_do_not_depend_on_batching(bpe_tokenizer):
    model = tiny_llama(len(bpe_tokenizer), seed=3)
    prompts = [*PROMPTS, "question : what is two plus two ? answer :"]
    labels = ["positive", "negative", "four", "the quick brown fox"]
    one = label_log_likelihoods(model, bpe_tokenizer, prompts, labels, batch_size=1)
    many = label_log_likelihoods(model, bpe_tokenizer, prompts, labels, batch_size=5)
    np.testing.assert_allclose(one, many, rtol=1e-4, atol=1e-4)
    # Against an unpadded forward pass over prompt + " " + label.
    ids = bpe_tokenizer(prompts[2] + " four")["input_ids"]
    start = len(bpe_tokenizer(prompts[2])["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
    direct = sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))
    assert one[2, 2] == pytest.approx(direct, rel=1e-5)


# ---- exact_match_predictions -----------------------------------------------------------


def greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = tokenizer(prompt)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(token)
            if token == tokenizer.eos_token_id:
                break
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def test_exact_match_predictions_are_greedy_answers_only(word_tokenizer):
    model = tiny_llama(len(word_tokenizer), seed=1, initializer_range=0.5)
    prompts = ["review : the film was", "sentiment :", "the film was great . review"]
    answers = exact_match_predictions(model, word_tokenizer, prompts, max_new_tokens=5)
    expected = [greedy(model, word_tokenizer, p, 5) for p in prompts]
    assert answers == expected
    assert all(a == a.strip() for a in answers)
    # Batched (left-padded) and one-by-one generation agree.
    single = [exact_match_predictions(model, word_tokenizer, [p], 5)[0] for p in prompts]
    assert single == answers


def test_exact_match_works_with_a_tokenizer_without_pad_token(word_tokenizer):
    no_pad = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>"
    )
    assert no_pad.pad_token_id is None
    model = tiny_llama(len(no_pad), seed=1, initializer_range=0.5)
    prompts = ["review : the film was", "sentiment :"]
    answers = exact_match_predictions(model, no_pad, prompts, max_new_tokens=4)
    assert answers == [greedy(model, no_pad, p, 4) for p in prompts]


# ---- the serving gate ------------------------------------------------------------------


def gate(*thresholds: dict) -> list[GateThreshold]:
    return [GateThreshold.model_validate(t) for t in thresholds]


def test_gate_passes_when_every_threshold_holds():
    result = check_gate(
        {"perplexity": 12.0, "accuracy": 0.9},
        gate({"metric": "perplexity", "max": 30}, {"metric": "accuracy", "min": 0.8}),
    )
    assert result == GateResult(passed=True, failures=[])


def test_empty_gate_passes():
    assert check_gate({}, []).passed is True


def test_gate_failures_name_metric_value_and_bound():
    result = check_gate(
        {"perplexity": 41.2, "accuracy": 0.5, "f1": 0.95, "loss": 30.00004},
        gate(
            {"metric": "perplexity", "max": 30},
            {"metric": "accuracy", "min": 0.8},
            {"metric": "f1", "min": 0.5, "max": 0.99},
            {"metric": "loss", "max": 30},
        ),
    )
    assert result.passed is False
    assert result.failures == [
        "perplexity 41.2 > max 30",
        "accuracy 0.5 < min 0.8",
        "loss 30.00004 > max 30",  # enough digits not to read "30 > max 30"
    ]


def test_gate_fails_on_missing_or_nan_metrics():
    result = check_gate(
        {"loss": float("nan")},
        gate({"metric": "accuracy", "min": 0.1}, {"metric": "loss", "max": 3}),
    )
    assert result.passed is False
    assert result.failures == ["accuracy missing", "loss nan is not a number"]


def test_gate_bounds_are_inclusive():
    result = check_gate({"accuracy": 0.8}, gate({"metric": "accuracy", "min": 0.8, "max": 0.8}))
    assert result.passed is True


@pytest.mark.trainer
def test_exact_match_generates_from_a_lora_model_sharded_by_fsdp2(tmp_path):
    from tests.trainer.metrics import lora_worker

    out = str(tmp_path / "answers")
    mp.spawn(lora_worker.run, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    tokenizer = lora_worker.word_tokenizer()
    reference = lora_worker.lora_model(len(tokenizer))
    base_answers = []
    for rank, prompts in enumerate(lora_worker.PROMPTS):
        sharded = json.loads((tmp_path / f"answers.{rank}").read_text())
        expected = [greedy(reference, tokenizer, p, lora_worker.MAX_NEW_TOKENS) for p in prompts]
        assert sharded == expected
        with reference.disable_adapter():
            base_answers += [
                greedy(reference, tokenizer, p, lora_worker.MAX_NEW_TOKENS) for p in prompts
            ]
    # The adapters change the answers, so the sharded run really used them.
    sharded_all = [a for r in range(2) for a in json.loads((tmp_path / f"answers.{r}").read_text())]
    assert sharded_all != base_answers


# ---- scoring: normalized likelihood, chat prompts, per-dataset scoring ------------------


def test_normalized_likelihood_divides_by_label_characters(word_tokenizer):
    # "good" is favoured: "very good" has the better log-prob per character, "bad" (one
    # token) the better sum. acc picks "bad", acc_norm "very good", as in lm-eval-harness.
    good = word_tokenizer.convert_tokens_to_ids("good")
    model = BiasLM(len(word_tokenizer), {good: 3.0})
    labels = ["bad", "very good"]
    scores = label_log_likelihoods(model, word_tokenizer, PROMPTS, labels)
    per_char = scores / np.array([3.0, 9.0])
    assert scores[0].argmax() == 0
    assert per_char[0].argmax() == 1
    assert predict_labels(model, word_tokenizer, PROMPTS, labels) == ["bad", "bad"]
    normalized = predict_labels(model, word_tokenizer, PROMPTS, labels, normalize=True)
    assert normalized == ["very good", "very good"]


def test_chat_prompts_use_the_tokenizers_template_or_the_default(bpe_tokenizer):
    assert not bpe_tokenizer.chat_template
    assert chat_prompts(bpe_tokenizer, ["what is two plus two ?"]) == [
        "<s><|user|>what is two plus two ?</s><|assistant|>"
    ]
    own = copy.deepcopy(bpe_tokenizer)
    own.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    assert chat_prompts(own, ["hi"]) == ["[user] hi\n[assistant] "]


def test_chat_scoring_reads_the_answer_right_after_the_assistant_turn(bpe_tokenizer):
    model = tiny_llama(len(bpe_tokenizer), seed=3)
    prompt = "question : what is two plus two ? answer :"
    [rendered] = chat_prompts(bpe_tokenizer, [prompt])
    scores = label_log_likelihoods(model, bpe_tokenizer, [prompt], ["four", "positive"], chat=True)
    ids = bpe_tokenizer(rendered + "four", add_special_tokens=False)["input_ids"]
    start = len(bpe_tokenizer(rendered, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
    direct = sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))
    assert scores[0, 0] == pytest.approx(direct, rel=1e-5)
    # Generation continues the rendered chat too.
    answers = exact_match_predictions(model, bpe_tokenizer, [prompt], 4, chat=True)
    assert answers == [greedy(model, bpe_tokenizer, rendered, 4)]
    assert answers != exact_match_predictions(model, bpe_tokenizer, [prompt], 4)


def test_score_dataset_follows_the_datasets_scoring(word_tokenizer):
    good = word_tokenizer.convert_tokens_to_ids("good")
    model = BiasLM(len(word_tokenizer), {good: 3.0})
    truth = ["very good", "very good"]

    def dataset(**fields) -> EvalDataset:
        return EvalDataset(
            name="reviews", uri="file:///r.jsonl", labels=["bad", "very good"], **fields
        )

    plain = score_dataset(model, word_tokenizer, dataset(), PROMPTS, truth, "macro")
    assert scoring_of(dataset()) == "loglikelihood"
    assert plain["accuracy"] == 0.0
    norm = dataset(scoring="loglikelihood-normalized")
    assert score_dataset(model, word_tokenizer, norm, PROMPTS, truth, "macro")["accuracy"] == 1.0
    assert scoring_of(EvalDataset(name="qa", uri="file:///q.jsonl", task="exact-match")) == (
        "generate"
    )


def test_gate_checks_one_datasets_metric():
    metrics = {"f1": 0.9, "intents/f1": 0.4, "qa/accuracy": 0.8}
    gate = [
        GateThreshold(metric="intents/f1", min=0.5),
        GateThreshold(metric="qa/accuracy", min=0.5),
    ]
    assert check_gate(metrics, gate) == GateResult(
        passed=False, failures=["intents/f1 0.4 < min 0.5"]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_next_token_loss_sum_is_the_shifted_cross_entropy_without_copying_logits(
    dtype: torch.dtype,
) -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11).to(dtype)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, 2:5] = evaluate.IGNORE_INDEX
    labels[2] = evaluate.IGNORE_INDEX  # a row with nothing to train on
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 11).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=evaluate.IGNORE_INDEX,
        reduction="sum",
    )
    got = evaluate.next_token_loss_sum(logits, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)
    nothing = torch.full_like(labels, evaluate.IGNORE_INDEX)
    assert evaluate.next_token_loss_sum(logits, nothing).item() == 0.0  # never NaN
