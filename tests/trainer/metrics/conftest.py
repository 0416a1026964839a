"""Tiny tokenizers and models for the evaluation tests (no downloads)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
WORDS = [
    *("the", "film", "was", "great", "awful", "fine", "review", "sentiment", ":"),
    *("positive", "negative", "very", "good", "bad", "ok"),
]
CORPUS = [
    "review : the film was great . sentiment : positive",
    "review : the film was awful . sentiment : negative",
    "the quick brown fox jumps over the lazy dog",
    "question : what is two plus two ? answer : four",
] * 20


@pytest.fixture(scope="session")
def word_tokenizer() -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word: label tokens are easy to rig."""
    vocab = {tok: i for i, tok in enumerate([*SPECIALS.values(), *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)


@pytest.fixture(scope="session")
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE, the kind the data pipeline trains: merges can cross word boundaries."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=list(SPECIALS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)


def tiny_llama(vocab_size: int, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random two-layer Llama. A large init spreads the logits so greedy choices are
    not near-ties that float noise could flip."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        **overrides,
    )
    return LlamaForCausalLM(config).eval()
