"""A process of the LoRA + FSDP2 generation test: greedy answers from a sharded LoRA model."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
from peft import PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.distributed.fsdp import fully_shard
from transformers import PreTrainedTokenizerFast

from kubetrain_api import v1alpha1 as api
from kubetrain_trainer import models as kt_models
from kubetrain_trainer.evaluate import exact_match_predictions
from tests.trainer.metrics.conftest import SPECIALS, WORDS, tiny_llama

# Per rank: same batch count (each generate step is a collective), different prompts, so
# the ranks' answers end at different steps.
PROMPTS = [["review : the film was", "sentiment :"], ["the film was great . review"]]
MAX_NEW_TOKENS = 5


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate([*SPECIALS.values(), *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)


def lora_model(vocab_size: int) -> PeftModel:
    model = kt_models.apply_lora(
        tiny_llama(vocab_size, seed=1, initializer_range=0.5),
        api.LoraSpec(rank=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"]),
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at zero: give the adapters a say in the answers
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    return model


def run(rank: int, world_size: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        tokenizer = word_tokenizer()
        model = lora_model(len(tokenizer))
        for block in kt_models.transformer_blocks(model):
            fully_shard(block)
        fully_shard(model)  # as parallelize does: blocks, then the root
        answers = exact_match_predictions(model, tokenizer, PROMPTS[rank], MAX_NEW_TOKENS)
        with open(f"{out}.{rank}", "w") as f:
            json.dump(answers, f)
        # Both ranks done before either tears gloo down: a rank that destroys the group
        # while the other still talks to it can abort ("terminate called without an
        # active exception"), as seen once in CI.
        dist.barrier()
    finally:
        dist.destroy_process_group()
