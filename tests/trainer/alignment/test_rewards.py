"""GRPO's rewards: each type on hand-written completions with known answers, their weighted
sum, a tiny reward model loaded from a file:// folder, and the errors a user can cause."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from kubetrain_api import v1alpha1 as api
from kubetrain_trainer.alignment.rewards import Rewards
from kubetrain_trainer.data import train_tokenizer
from kubetrain_trainer.data.readers import DataError
from kubetrain_trainer.exits import SpecFailure

pytestmark = pytest.mark.trainer

CPU = torch.device("cpu")


def rewards(tmp_path: Path, *specs: dict[str, Any]) -> Rewards:
    return Rewards(
        [api.RewardSpec.model_validate(s) for s in specs], cache_dir=tmp_path, device=CPU
    )


def one(tmp_path: Path, spec: dict[str, Any], completions: list[str], answers=None) -> list[float]:
    """The values of a single reward over `completions` (the prompts do not matter)."""
    scored = rewards(tmp_path, spec)
    answers = answers or [None] * len(completions)
    total, values = scored.score(["q"] * len(completions), completions, answers)
    assert np.array_equal(total, values[scored.names[0]])  # weight 1
    return total.tolist()


def test_names_are_the_types_numbered_when_repeated(tmp_path):
    scored = rewards(
        tmp_path,
        {"type": "exact-match"},
        {"type": "regex", "pattern": "a"},
        {"type": "regex", "pattern": "b"},
        {"type": "length", "maxChars": 5},
        {"type": "regex", "pattern": "c"},
    )
    assert scored.names == ["exact-match", "regex", "regex-2", "length", "regex-3"]


def test_exact_match_trims_and_ignores_case(tmp_path):
    completions = [" Four \n", "four.", "FOUR", "five", "STRASSE"]
    answers = ["four", "four", "four", "four", "straße"]  # casefold, not just lower
    assert one(tmp_path, {"type": "exact-match"}, completions, answers) == [1, 0, 1, 0, 1]


def test_exact_match_without_a_reference_answer_names_the_label_field(tmp_path):
    with pytest.raises(DataError, match=r"row 1.*`label` field") as caught:
        one(tmp_path, {"type": "exact-match"}, ["4", "5"], ["4", None])
    assert isinstance(caught.value, ValueError)
    assert "spec.grpo.rewards[0]" in str(caught.value)


def test_regex_searches_anywhere_unless_anchored(tmp_path):
    assert one(tmp_path, {"type": "regex", "pattern": r"\d+"}, ["answer: 42", "none"]) == [1, 0]
    assert one(tmp_path, {"type": "regex", "pattern": r"^yes"}, ["yes sir", "oh yes"]) == [1, 0]


def test_json_schema_validates_parsed_json_under_draft_2020_12(tmp_path):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    completions = ['{"n": 3}', ' {"n": 1}\n', '{"n": "3"}', '{"m": 1}', "n = 3", '{"n": 3']
    assert one(tmp_path, {"type": "json-schema", "jsonSchema": schema}, completions) == [
        *(1, 1),
        *(0, 0, 0, 0),
    ]
    # prefixItems + items: false is 2020-12 (an older draft would reject any array).
    pair = {"type": "array", "prefixItems": [{"type": "string"}], "items": False}
    spec = {"type": "json-schema", "jsonSchema": pair}
    assert one(tmp_path, spec, ['["a"]', '["a", 1]', "[1]"]) == [1, 0, 0]


def test_length_is_one_inside_the_bounds_and_falls_linearly_to_twice_them(tmp_path):
    texts = ["x" * n for n in (0, 2, 4, 6, 8, 12, 16, 20)]
    assert one(tmp_path, {"type": "length", "minChars": 4, "maxChars": 8}, texts) == [
        *(0.0, 0.5, 1.0, 1.0, 1.0, 0.5, 0.0, 0.0)
    ]
    assert one(tmp_path, {"type": "length", "maxChars": 8}, texts[:1] + texts[-3:]) == [
        *(1.0, 0.5, 0.0, 0.0)
    ]
    assert one(tmp_path, {"type": "length", "minChars": 4}, ["x", "x" * 1000]) == [0.25, 1.0]


def test_total_is_the_weighted_sum_and_negative_weights_penalize(tmp_path):
    scored = rewards(
        tmp_path,
        {"type": "regex", "pattern": "yes", "weight": 2.0},
        {"type": "length", "maxChars": 4, "weight": -0.5},
        {"type": "exact-match", "weight": 0.25},
    )
    completions = ["yes", "yes yes", "no"]
    total, values = scored.score(["p"] * 3, completions, ["yes", "yes", "yes"])
    assert values["regex"].tolist() == [1, 1, 0]
    assert values["length"].tolist() == [1, 0.25, 1]
    assert values["exact-match"].tolist() == [1, 0, 0]
    assert total.tolist() == pytest.approx([2 - 0.5 + 0.25, 2 - 0.125, -0.5])
    assert total.shape == (3,)


def test_rows_must_line_up(tmp_path):
    scored = rewards(tmp_path, {"type": "regex", "pattern": "a"})
    with pytest.raises(ValueError, match=r"prompts \(2\), completions \(1\) and answers \(2\)"):
        scored.score(["p", "q"], ["a"], [None, None])


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ({"type": "regex", "pattern": "(unclosed"}, "pattern", "not a regular expression"),
        ({"type": "json-schema", "jsonSchema": {"type": "nope"}}, "jsonSchema", "not a valid"),
        ({"type": "regex"}, "pattern", "needs a pattern"),
        ({"type": "length", "minChars": 9, "maxChars": 3}, "minChars", "<= maxChars"),
    ],
)
def test_bad_reward_settings_name_their_field(tmp_path, spec, field, message):
    ok = {"type": "exact-match"}
    with pytest.raises(SpecFailure, match=rf"spec\.grpo\.rewards\[1\]\.{field}: .*{message}"):
        rewards(tmp_path, ok, spec)


# ---- reward models ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return train_tokenizer(["what is two plus two ? four", "the film was great"] * 10, 300)


def reward_model_folder(
    tmp_path: Path, tok: PreTrainedTokenizerFast, num_labels: int, *, chat: bool
) -> tuple[Path, LlamaForSequenceClassification]:
    torch.manual_seed(num_labels)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=num_labels,
        # Without one the loader takes the tokenizer's; with one, it is the config's.
        pad_token_id=tok.pad_token_id if chat else None,
    )
    model = LlamaForSequenceClassification(config).eval()
    folder = tmp_path / f"rm-{num_labels}-{chat}"
    model.save_pretrained(folder)
    saved = copy.deepcopy(tok)
    saved.chat_template = tok.chat_template if chat else None
    saved.save_pretrained(folder)
    return folder, model


PROMPTS = ["what is two plus two ?", "the film was", "two"]
COMPLETIONS = ["four", "great , the film was great", ""]


@pytest.mark.parametrize(
    ("num_labels", "chat"), [(1, True), (3, True), (2, False)], ids=["logit", "prob", "plain"]
)
def test_model_reward_is_the_models_own_score(tmp_path, tok, num_labels, chat):
    folder, model = reward_model_folder(tmp_path, tok, num_labels, chat=chat)
    scored = rewards(tmp_path, {"type": "model", "model": f"file://{folder}"})
    assert scored.names == ["model"]
    prompts, completions = PROMPTS * 6, COMPLETIONS * 6  # more rows than one batch holds
    total, _ = scored.score(prompts, completions, [None] * len(prompts))
    expected = []
    for prompt, completion in zip(prompts, completions, strict=True):
        if chat:
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": completion},
            ]
            text = tok.apply_chat_template(messages, tokenize=False)
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        else:
            ids = tok(f"{prompt}\n{completion}", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]  # one unpadded row at a time
        expected.append(logits[0] if num_labels == 1 else logits.softmax(-1)[-1])
    assert total == pytest.approx(torch.stack(expected).tolist(), abs=1e-5)
    assert len(set(np.round(total, 5))) == 3  # the rows' scores differ: a real signal
    if num_labels > 1:
        assert ((total > 0) & (total < 1)).all()


def test_reward_model_errors_name_the_field(tmp_path, tok):
    with pytest.raises(SpecFailure, match=r"spec\.grpo\.rewards\[0\]\.model: .*no folder"):
        rewards(tmp_path, {"type": "model", "model": f"file://{tmp_path}/absent"})
    causal = tmp_path / "causal"
    small = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2}
    config = LlamaConfig(vocab_size=len(tok), num_hidden_layers=1, **small)
    LlamaForCausalLM(config).save_pretrained(causal)
    with pytest.raises(SpecFailure, match=r"LlamaForCausalLM, not a sequence-classification"):
        rewards(tmp_path, {"type": "model", "model": f"file://{causal}"})
