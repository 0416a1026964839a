"""Model initialization memory: peak host memory per rank at world size 2 (FSDP2 over gloo),
the old way (every rank builds the full model, then shards it) vs the sharded way
(`sharded_init`: meta build, shard, fill each rank's shards), for random init and for a
pretrained folder. Target: the sharded way's peak RSS growth <= 0.6x the full model's bytes.

RSS growth is VmHWM (the kernel's peak resident set, reset through /proc/self/clear_refs)
minus VmRSS before the build: file pages of a memory-mapped checkpoint count, as they do
against a pod's memory. Run: `python -m bench.bench_init [--quick]`.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
# ~207M parameters (827 MB fp32): a Llama shape large enough that RSS noise is small.
FULL_SHAPE = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 12,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}
QUICK_SHAPE = {**FULL_SHAPE, "num_hidden_layers": 4, "vocab_size": 16000}
# Built first the same way, unmeasured: imports, lazy modules and gloo buffers are a fixed
# cost of the process, not of the model's size.
WARMUP_SHAPE = {**FULL_SHAPE, "hidden_size": 64, "intermediate_size": 128, "vocab_size": 256}
WARMUP_SHAPE.update(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _build(way: str, spec: Any, vocab: int, cache: Path) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    from kubetrain_trainer import models, sharded_init

    if way == "old":
        model = models.build_model(
            spec, vocab_size=vocab, dropout=0.0, dtype="float32", cache_dir=cache
        )
        for block in models.transformer_blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    plan = sharded_init.plan_init(
        spec, vocab_size=vocab, dropout=0.0, dtype="float32", cache_dir=cache, seed=0
    )
    assert plan is not None
    model = sharded_init.build_empty(plan, None)
    for block in models.transformer_blocks(model):
        fully_shard(block)
    fully_shard(model)
    sharded_init.materialize(model, plan, torch.device("cpu"))
    return model


def worker(rank: int, store: str, way: str, init: str, folders: tuple[str, str], out: str) -> None:
    from kubetrain_api import v1alpha1 as api

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        for folder in folders:  # the warm-up, then the measured build
            vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
            spec = api.ModelSpec(source=f"file://{folder}", init=init)
            if folder == folders[0]:
                _build(way, spec, vocab, Path(out) / "cache")
        dist.barrier()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _status_kb("VmRSS")
        start = time.perf_counter()
        model = _build(way, spec, vocab, Path(out) / "cache")
        seconds = time.perf_counter() - start
        peak = _status_kb("VmHWM")
        local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
        result = {"peak_rss_growth": (peak - before) * 1024, "local_bytes": local, "s": seconds}
        (Path(out) / f"{way}-{init}-rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _save_model(folder: Path, shape: dict[str, Any]) -> int:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**shape))
    model.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run(quick: bool = False) -> dict[str, Any]:
    shape = QUICK_SHAPE if quick else FULL_SHAPE
    with tempfile.TemporaryDirectory() as tmp:
        folder, warmup = Path(tmp) / "model", Path(tmp) / "warmup"
        model_bytes = _save_model(folder, shape)
        _save_model(warmup, WARMUP_SHAPE)
        cases: dict[str, Any] = {}
        for init in ("random", "pretrained"):
            for way in ("old", "sharded"):
                out = Path(tmp) / f"{way}-{init}"
                out.mkdir()
                args = (str(out / "store"), way, init, (str(warmup), str(folder)), str(out))
                mp.spawn(worker, args=args, nprocs=WORLD, join=True)
                ranks = [
                    json.loads((out / f"{way}-{init}-rank{r}.json").read_text())
                    for r in range(WORLD)
                ]
                peak = max(r["peak_rss_growth"] for r in ranks)
                cases[f"{way}_{init}"] = {
                    "peak_rss_growth_bytes_max_rank": peak,
                    "ratio_to_model": round(peak / model_bytes, 3),
                    "init_s_max_rank": round(max(r["s"] for r in ranks), 2),
                    "local_param_bytes": [r["local_bytes"] for r in ranks],
                }
    worst = max(cases[f"sharded_{init}"]["ratio_to_model"] for init in ("random", "pretrained"))
    return {
        "world_size": WORLD,
        "model_params": model_bytes // 4,
        "model_bytes": model_bytes,
        "cases": cases,
        "ratio": worst,
        "target": 0.6,
        "ok": worst <= 0.6,
    }


def plot_bars(results: dict[str, Any]) -> list[tuple[str, float, float, str]]:
    """The sharded way's peak RSS growth per rank / model bytes (random, pretrained)."""
    cases = results["cases"]
    return [
        (f"init RSS/model\n{init}, world 2", cases[f"sharded_{init}"]["ratio_to_model"], 0.6, "max")
        for init in ("random", "pretrained")
    ]


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    result = run(quick=quick)
    if not quick:  # a quick run's smaller model is a smoke test, not the recorded figure
        results_dir = Path(__file__).resolve().parent / "results"
        (results_dir / "model_init.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
