"""A process of the loss-weighting tests: FSDP2 over gloo, the trainer's own data order,
parallelize and `accumulate_gradients`, on a tiny Llama and SFT-like rows whose answers
have very unequal lengths."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from kubetrain_api import validation
from kubetrain_trainer.config import resolve
from kubetrain_trainer.loop import accumulate_gradients
from kubetrain_trainer.parallelize import parallelize
from kubetrain_trainer.sampler import DataOrder

ROOT = Path(__file__).resolve().parents[3]
VOCAB, SEQ, ROWS, GLOBAL_BATCH, MICRO = 48, 24, 16, 8, 2
# Trained (answer) tokens per row: a micro-batch with 1+2 answer tokens next to one with 23+22.
ANSWERS = [1, 23, 2, 22, 0, 0, 3, 20, 1, 18, 5, 4, 12, 2, 23, 1]


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (ROWS, SEQ), generator=g)
    labels = torch.full_like(ids, -100)  # the prompt
    for row, answer in enumerate(ANSWERS):
        if answer:
            labels[row, SEQ - answer :] = ids[row, SEQ - answer :]
    return {"input_ids": ids, "labels": labels}


def config(world_size: int, tmp: str):
    (doc,) = validation.load_documents((ROOT / "examples" / "quickstart.yaml").read_text())
    hp = doc["spec"]["hyperparameters"]
    hp["globalBatchSize"], hp["microBatchSize"] = GLOBAL_BATCH, MICRO
    run = validation.parse(doc)
    return resolve(run, Path(tmp) / "out", use_gpu=False, world_size=world_size)


def global_rows(world_size: int, tmp: str) -> list[int]:
    """Every row of step 0, over all processes and micro-batches."""
    order = DataOrder(ROWS, config(world_size, tmp), seed=0)
    return sorted(
        int(r) for rank in range(world_size) for m in order.micro_batches(0, rank) for r in m
    )


def run(rank: int, world_size: int, tmp: str) -> None:
    """Rank 0 saves the full gradients and the returned loss and token count."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world_size
    )
    try:
        cfg = config(world_size, tmp)
        model = tiny_model()
        model = parallelize(model, list(model.model.layers), cfg, torch.device("cpu"))
        split = data()
        order = DataOrder(ROWS, cfg, seed=0)
        micro_batches = [
            {k: v[rows] for k, v in split.items()} for rows in order.micro_batches(0, rank)
        ]
        loss, count = accumulate_gradients(model, micro_batches, torch.device("cpu"))
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save({"grads": grads, "loss": loss, "count": count}, f"{tmp}/result.pt")
    finally:
        dist.destroy_process_group()
