"""Packed documents do not attend to each other on the trainer's own model path: rows and
position ids from the data step's packer, the model from `build_model`, the loss from the
loop's `loss_sum` and the validation loss from `evaluate_loss`."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from kubetrain_trainer import evaluate, loop, models
from kubetrain_trainer.data import tokenize

from .conftest import CORPUS, tiny

pytestmark = pytest.mark.trainer

SEQ = 128


def _docs(tokenizer: PreTrainedTokenizerFast) -> list[list[int]]:
    eos = tokenizer.eos_token_id
    return [[*tokenizer(text)["input_ids"], eos] for text in CORPUS[:3]]


def _packed(tokenizer: PreTrainedTokenizerFast) -> tuple[dict[str, torch.Tensor], list[int]]:
    docs = _docs(tokenizer)
    rows = tokenize.pack(docs, docs, SEQ, tokenizer.pad_token_id)
    assert rows.input_ids.shape[0] == 1, "the three documents share one row"
    batch = {
        "input_ids": torch.from_numpy(rows.input_ids).long(),
        "labels": torch.from_numpy(rows.labels).long(),
        "position_ids": torch.from_numpy(rows.position_ids).long(),
    }
    starts = [0]
    for doc in docs:
        starts.append(starts[-1] + len(doc))
    return batch, starts


@pytest.mark.parametrize("source", ["builtin://tiny-llama", "builtin://tiny-qwen2"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_documents_logits_are_the_same_packed_as_alone(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path, source: str, attention: str
) -> None:
    model = tiny(tokenizer, tmp_path, source=source).eval()
    model.set_attn_implementation(attention)
    batch, starts = _packed(tokenizer)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits[0]
        crossed = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
        for doc, (lo, hi) in enumerate(pairwise(starts)):
            alone = model(input_ids=batch["input_ids"][:, lo:hi], use_cache=False).logits[0]
            torch.testing.assert_close(packed[lo:hi], alone, rtol=1e-4, atol=1e-5)
            if doc:  # without the position ids the later documents do see the earlier ones
                assert not torch.allclose(crossed[lo:hi], alone, atol=1e-3)
    models.check_packed_attention(model)


def test_training_and_validation_loss_of_a_packed_row_are_those_of_its_documents(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    model = tiny(tokenizer, tmp_path).eval()
    batch, starts = _packed(tokenizer)
    with torch.no_grad():
        packed_sum = loop.loss_sum(model, batch)
        expected = sum(
            loop.loss_sum(model, {k: v[:, lo:hi] for k, v in batch.items()})
            for lo, hi in pairwise(starts)
        )
        # Each document's EOS predicts the next document's first token: that pair is
        # trained on in a packed row and has no counterpart alone.
        boundary = torch.nn.functional.cross_entropy(
            torch.stack(
                [
                    model(input_ids=batch["input_ids"][:, lo:hi]).logits[0, -1]
                    for lo, hi in pairwise(starts[:3])
                ]
            ),
            batch["labels"][0, starts[1:3]],
            reduction="sum",
        )
    torch.testing.assert_close(packed_sum, expected + boundary, rtol=1e-5, atol=1e-4)
    count = loop.trained_tokens(batch["labels"])
    val_loss, val_count = evaluate.evaluate_loss(model, [batch], "cpu")
    assert val_count == count
    assert val_loss == pytest.approx(float(packed_sum) / count, rel=1e-5)


def test_a_model_that_lets_documents_attend_to_each_other_is_refused(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    model = tiny(tokenizer, tmp_path)

    class IgnoresPositions(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner, self.config = inner, inner.config

        def get_input_embeddings(self) -> torch.nn.Module:
            return self.inner.get_input_embeddings()

        def forward(self, input_ids, position_ids=None, **kwargs):
            return self.inner(input_ids=input_ids, **kwargs)

    with pytest.raises(ValueError, match=r"spec\.data\.packing"):
        models.check_packed_attention(IgnoresPositions(model))  # type: ignore[arg-type]


def test_flattened_rows_for_flash_attention_give_the_same_losses(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    # Flash attention sees document boundaries only in a one-row batch, so the loop
    # flattens rows for it; checked here with sdpa, which honours both layouts.
    model = tiny(tokenizer, tmp_path).eval()
    docs = _docs(tokenizer)
    rows = tokenize.pack(docs, docs, 20, tokenizer.pad_token_id)
    batch = {
        k: torch.from_numpy(getattr(rows, k)).long()
        for k in ("input_ids", "labels", "position_ids")
    }
    assert batch["input_ids"].shape[0] > 2
    flat = models.flatten_rows(batch)
    assert flat["input_ids"].shape == (1, batch["input_ids"].numel())
    assert loop.trained_tokens(flat["labels"]) == loop.trained_tokens(batch["labels"])
    with torch.no_grad():
        torch.testing.assert_close(loop.loss_sum(model, flat), loop.loss_sum(model, batch))
    assert evaluate.evaluate_loss(model, [flat], "cpu") == pytest.approx(
        evaluate.evaluate_loss(model, [batch], "cpu"), rel=1e-6
    )
    assert not models.uses_flash_attention(model)
    model.config._attn_implementation = "flash_attention_2"
    assert models.uses_flash_attention(model)
