"""The tiny policy of the rollout tests, and a process of their two-rank FSDP2 test."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from kubetrain_api import v1alpha1 as api
from kubetrain_trainer import models
from kubetrain_trainer.alignment.rollout import sample
from kubetrain_trainer.data import train_tokenizer

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is two plus two ? four",
    "review : the film was great . sentiment : positive",
] * 10
PROMPTS = ["the quick brown", "what is two plus two ?", "review : the film", "the lazy dog jumps"]
MAX_NEW_TOKENS = 8
# builtin://tiny-llama cut down; a large init spreads the logits so that greedy choices
# are not near-ties that a batch's float noise could flip.
SHAPE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "initializer_range": 0.5,
}


def tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(CORPUS, vocab_size=300)


def policy(vocab_size: int, tmp: Path, *, lora: bool = False) -> torch.nn.Module:
    """The same random model in every process (seeded), LoRA-wrapped with adapters that
    change its answers when `lora`."""
    torch.manual_seed(0)
    spec = api.ModelSpec(source="builtin://tiny-llama", config_overrides=SHAPE)
    model: torch.nn.Module = models.build_model(
        spec, vocab_size=vocab_size, dropout=0.0, dtype="float32", cache_dir=tmp
    )
    if lora:
        assert isinstance(model, PreTrainedModel)
        model = models.apply_lora(
            model, api.LoraSpec(rank=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
        )
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():  # B starts at zero: give the adapters a say
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator))
    return model.eval()


def run(rank: int, world_size: int, store: str, job: str) -> None:
    """Sample greedily from the plain and the LoRA policy, both FSDP2-sharded over the
    ranks, each rank on its own prompts; write the rows' token ids and texts."""
    spec = json.loads(Path(job).read_text())
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),  # a rank left waiting fails instead of hanging
    )
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(spec["tokenizer"])
        results = {}
        for lora in (False, True):
            model = policy(len(tok), Path(spec["tmp"]), lora=lora)
            for block in models.transformer_blocks(model):
                fully_shard(block)
            fully_shard(model)  # as parallelize does: blocks, then the root
            rollout = sample(
                model,
                tok,
                spec["prompts"][rank],
                generations=2,
                max_new_tokens=MAX_NEW_TOKENS,
                temperature=1.0,
                device=torch.device("cpu"),
                greedy=True,
                pad_id=tok.pad_token_id,
                eos_id=spec["eos_id"],
            )
            results["lora" if lora else "plain"] = {
                "input_ids": rollout.input_ids.tolist(),
                "labels": rollout.labels.tolist(),
                "texts": rollout.texts,
            }
        Path(f"{job}.{rank}").write_text(json.dumps(results))
        dist.barrier()  # both done before either tears gloo down
    finally:
        dist.destroy_process_group()
