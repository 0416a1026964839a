"""Fixtures for the model tests: a tiny byte-level BPE tokenizer trained here (the real one
comes from the data package) and a tiny model saved as a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from kubetrain_api import v1alpha1 as api
from kubetrain_trainer.models import build_model

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a small model learns to continue plain text",
    "kubernetes schedules pods onto nodes with free gpus",
    "training loss goes down as the tokens go by",
] * 8


def train_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>"
    )


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer()


def tiny(
    tokenizer: PreTrainedTokenizerFast,
    cache_dir: Path,
    *,
    source: str = "builtin://tiny-llama",
    seed: int = 0,
    dropout: float = 0.0,
    **spec: object,
) -> PreTrainedModel:
    torch.manual_seed(seed)
    return build_model(
        api.ModelSpec(source=source, **spec),
        vocab_size=len(tokenizer),
        dropout=dropout,
        dtype="float32",
        cache_dir=cache_dir,
    )


@pytest.fixture
def model_folder(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> Path:
    """A tiny model and its tokenizer, saved the way the Hub stores models."""
    folder = tmp_path / "saved"
    tiny(tokenizer, tmp_path / "cache", seed=7).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def logits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    model.eval()
    ids = tokenizer(CORPUS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**ids).logits
