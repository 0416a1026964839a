"""Two processes over gloo on CPU, FSDP2 (`fully_shard`) on a tiny Llama: a sharded save loads
into freshly built sharded models with identical full parameters and optimizer state, and
into one unsharded process too (elastic resume)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kubetrain_trainer.checkpoint import CheckpointManager

WORLD = 2
SAVE_STEP = 2


def sharded_llama(seed: int, shard: bool = True) -> nn.Module:
    """Each decoder layer sharded, then the root (embeddings, norm, head)."""
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    if not shard:
        return model
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, rank: int) -> None:
    tokens = torch.randint(
        0, 256, (2, 16), generator=torch.Generator().manual_seed(step * 10 + rank)
    )
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Unsharded parameters and AdamW moments (gathering is a collective: every rank calls)."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = p.full_tensor().detach().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{name}/{key}"] = optimizer.state[p][key].full_tensor().clone()
    return out


def worker(rank: int, init_file: str, root: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = sharded_llama(seed=0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(SAVE_STEP):
            train_step(model, optimizer, step, rank)
        manager = CheckpointManager(root, keep_last=2, rank=rank, world_size=WORLD)
        info = manager.save(SAVE_STEP, model, optimizer, extra={"data_position": 100 + rank})
        saved = full_state(model, optimizer)

        fresh = sharded_llama(seed=1)
        fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
        before = {name: p.full_tensor().detach().clone() for name, p in fresh.named_parameters()}
        extra = manager.load(manager.latest(), fresh, fresh_optimizer)
        loaded = full_state(fresh, fresh_optimizer)

        # One more identical step on both: the restored moments and step counts must agree.
        train_step(model, optimizer, SAVE_STEP, rank)
        train_step(fresh, fresh_optimizer, SAVE_STEP, rank)
        after = (full_state(model, optimizer), full_state(fresh, fresh_optimizer))
        torch.save(
            {
                "info_step": info.step,
                "extra": extra,
                "saved": saved,
                "before": before,
                "loaded": loaded,
                "after": after,
                "local_numel": sum(p.to_local().numel() for p in model.parameters()),
                "total_numel": sum(p.numel() for p in model.parameters()),
            },
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.trainer
def test_fsdp2_sharded_save_and_load(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    mp.spawn(
        worker, args=(str(tmp_path / "store"), str(root), str(tmp_path)), nprocs=WORLD, join=True
    )
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    for rank, res in enumerate(results):
        assert res["info_step"] == SAVE_STEP
        assert res["extra"] == {"data_position": 100 + rank, "step": SAVE_STEP}
        # The fresh model (and empty optimizer) started elsewhere, and ended exactly where the
        # saved one was.
        assert all(not torch.equal(value, res["saved"][k]) for k, value in res["before"].items())
        assert res["saved"].keys() == res["loaded"].keys()
        for key, value in res["saved"].items():
            assert torch.equal(value, res["loaded"][key]), key
        continued, resumed = res["after"]
        for key, value in continued.items():
            assert torch.equal(value, resumed[key]), key
        # Each rank held (and wrote) about half of the parameters.
        assert res["local_numel"] == pytest.approx(res["total_numel"] / WORLD, rel=0.05)
    assert results[0]["saved"]["lm_head.weight"].shape == (256, 64)

    folder = root / "step-000002"
    shards = sorted(folder.glob("*.distcp"))
    assert [p.name for p in shards] == ["__0_0.distcp", "__1_0.distcp"]
    sizes = [p.stat().st_size for p in shards]
    assert sizes[0] == pytest.approx(sizes[1], rel=0.1)
    assert {p.name for p in folder.glob("extra-rank*.pt")} == {"extra-rank0.pt", "extra-rank1.pt"}

    # Elastic: one process without sharding loads the two processes' shards (DCP reshards);
    # it takes rank 0's extras, the only ones a world of one has a place for.
    single_model = sharded_llama(seed=1, shard=False)
    single_optimizer = torch.optim.AdamW(single_model.parameters(), lr=1e-2)
    single = CheckpointManager(root, keep_last=2)
    extra = single.load(single.latest(), single_model, single_optimizer)
    assert extra == {"data_position": 100, "step": SAVE_STEP}
    for name, p in single_model.named_parameters():
        assert torch.equal(p.detach(), results[0]["saved"][name]), name
        for key in ("exp_avg", "exp_avg_sq"):
            moment = single_optimizer.state[p][key]
            assert torch.equal(moment, results[0]["saved"][f"{name}/{key}"]), name
