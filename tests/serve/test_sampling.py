"""OpenAI's logit adjustments and logprobs as pure functions (serve/sampling.py)."""

from __future__ import annotations

import math

import pytest
import torch

from kubetrain_trainer.serve.sampling import (
    LOGPROB_FLOOR,
    LogitAdjuster,
    adjust_logits,
    token_logprobs,
)

LOGITS = torch.tensor([2.0, 1.0, 0.5, -1.0])
COUNTS = torch.tensor([3.0, 1.0, 0.0, 0.0])


def test_penalties_follow_openai_formula() -> None:
    adjusted = adjust_logits(LOGITS, COUNTS, presence_penalty=0.5, frequency_penalty=0.25)
    # logit - count * frequency - (count > 0) * presence
    expected = torch.tensor([2.0 - 0.75 - 0.5, 1.0 - 0.25 - 0.5, 0.5, -1.0])
    assert torch.allclose(adjusted, expected)
    assert torch.equal(LOGITS, torch.tensor([2.0, 1.0, 0.5, -1.0])), "input left alone"


def test_penalties_move_probability_away_from_generated_tokens() -> None:
    before = torch.softmax(LOGITS, -1)
    after = torch.softmax(adjust_logits(LOGITS, COUNTS, presence_penalty=1.0), -1)
    assert after[0] < before[0]
    assert after[1] < before[1]
    assert after[2] > before[2]
    assert after[3] > before[3]
    # A negative penalty encourages repetition instead.
    encouraged = torch.softmax(adjust_logits(LOGITS, COUNTS, frequency_penalty=-1.0), -1)
    assert encouraged[0] > before[0]


def test_neutral_parameters_change_nothing() -> None:
    assert torch.equal(adjust_logits(LOGITS, COUNTS), LOGITS)
    adjuster = LogitAdjuster(4, torch.device("cpu"))
    assert not adjuster.active
    assert adjuster(LOGITS) is LOGITS


def test_adjuster_counts_generated_tokens_and_applies_the_bias() -> None:
    adjuster = LogitAdjuster(
        4, torch.device("cpu"), frequency_penalty=1.0, logit_bias={3: 100.0, 0: -100.0}
    )
    assert adjuster.active
    for token in (1, 1, 2):
        adjuster.observe(token)
    adjusted = adjuster(LOGITS)
    assert torch.allclose(adjusted, torch.tensor([2.0 - 100, 1.0 - 2, 0.5 - 1, -1.0 + 100]))
    assert int(adjusted.argmax()) == 3, "a +100 bias makes the token the greedy choice"


def test_token_logprobs_are_the_log_softmax_and_its_top_k() -> None:
    found = token_logprobs(LOGITS, token=2, k=2)
    expected = torch.log_softmax(LOGITS, -1)
    assert found.token == 2
    assert found.logprob == pytest.approx(float(expected[2]))
    assert [i for i, _ in found.top] == [0, 1]
    assert [v for _, v in found.top] == pytest.approx([float(expected[0]), float(expected[1])])
    assert math.fsum(math.exp(v) for v in expected.tolist()) == pytest.approx(1.0)
    assert token_logprobs(LOGITS, token=0, k=0).top == ()


def test_impossible_tokens_get_a_finite_floor() -> None:
    found = token_logprobs(torch.tensor([0.0, float("-inf")]), token=1, k=2)
    assert found.logprob == LOGPROB_FLOOR
    assert found.top[1] == (1, LOGPROB_FLOOR)
