"""Sharded initialization (`sharded_init`) over gloo on CPU, FSDP2 at world sizes 1 and 2:
the model built on the meta device and filled shard by shard computes the same logits as
the full model built the old way (`models.build_model`), for a pretrained folder with tied
embeddings, for random init (the same full weights at any world size) and for LoRA over a
pretrained folder; and no rank ever allocates the full model."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import PreTrainedTokenizerFast

from kubetrain_api import v1alpha1 as api
from kubetrain_trainer import models, sharded_init

from .conftest import CORPUS, logits, tiny

pytestmark = pytest.mark.trainer

LORA = api.LoraSpec(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
# ~16M parameters (64 MB fp32): large enough that allocator noise is small beside it.
BIG = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 16,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            *("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks"),
            *("fsmblks", "uordblks", "fordblks", "keepcost"),
        )
    ]


class PeakHeap(TorchDispatchMode):
    """Peak of the bytes glibc has handed out (heap and mmap'd blocks), sampled after every
    torch op: allocated bytes, not RSS, so it does not depend on what pages are resident."""

    def __init__(self) -> None:
        super().__init__()
        self._mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
        self._mallinfo2.restype = _MallInfo2
        self.start = self.peak = self.in_use()

    def in_use(self) -> int:
        info = self._mallinfo2()
        return int(info.uordblks + info.hblkhd)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.in_use())
        return out

    @property
    def delta(self) -> int:
        return self.peak - self.start


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _spec(case: str, folder: str) -> api.ModelSpec:
    if case == "random":
        return api.ModelSpec(source="builtin://tiny-llama", init="random")
    if case == "folder-random":  # the folder's config, weights drawn at random
        return api.ModelSpec(source=f"file://{folder}", init="random")
    return api.ModelSpec(source=f"file://{folder}")


def _build(case: str, folder: str, vocab: int, cache: Path, device: torch.device) -> Any:
    """The sharded build, as the trainer does it: plan, meta model, FSDP2, materialize."""
    from torch.distributed.fsdp import fully_shard

    plan = sharded_init.plan_init(
        _spec(case, folder), vocab_size=vocab, dropout=0.0, dtype="float32", cache_dir=cache, seed=3
    )
    assert plan is not None
    model = sharded_init.build_empty(plan, LORA if case == "lora" else None)
    for block in models.transformer_blocks(model):
        fully_shard(block)
    fully_shard(model)
    sharded_init.materialize(model, plan, device)
    return model


def _memory(folder: str, vocab: int, cache: Path) -> dict[str, int]:
    """Peak heap growth while building: the sharded way (random and pretrained) and the old
    way (random: transformers memory-maps a pretrained folder, which the heap does not see)."""
    cpu = torch.device("cpu")
    with PeakHeap() as new_random:
        model = _build("folder-random", folder, vocab, cache, cpu)
    local = sum(p.to_local().numel() * 4 for p in model.parameters())
    del model
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    rss_before = _status_bytes("VmRSS")
    with PeakHeap() as new_pretrained:
        model = _build("pretrained", folder, vocab, cache, cpu)
    # Resident memory too: a memory-mapped read of the file would not show on the heap.
    rss_growth = _status_bytes("VmHWM") - rss_before
    del model
    with PeakHeap() as old_random:
        models.build_model(
            _spec("folder-random", folder),
            vocab_size=vocab,
            dropout=0.0,
            dtype="float32",
            cache_dir=cache,
        )
    return {
        "new_random": new_random.delta,
        "new_pretrained": new_pretrained.delta,
        "old_random": old_random.delta,
        "new_pretrained_rss": rss_growth,
        "local": local,
    }


def _through_the_trainer(folder: str, world: int, out: Path) -> dict[str, Any]:
    """`build_for_training` as the Trainer calls it: LoRA, packing (its check runs a
    forward on the sharded model), FSDP2 through `parallelize`."""
    from kubetrain_api import validation
    from kubetrain_trainer.config import resolve
    from tests.support.runs import quickstart

    doc = quickstart(
        "init",
        model={"source": f"file://{folder}"},
        lora={"rank": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]},
        data__packing=True,
    )
    config = resolve(validation.parse(doc), out, use_gpu=False, world_size=world)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    model, shape = sharded_init.build_for_training(config, torch.device("cpu"), len(tokenizer))
    from torch.distributed.tensor import DTensor

    return {
        # The packing check's forward must not leave the root's parameters unsharded: the
        # optimizer is built over what `parameters()` returns next.
        "all_sharded": all(isinstance(p, DTensor) for p in model.parameters()),
        "n_params": shape.n_params,
        "logits": logits(model, tokenizer),
    }


def worker(rank: int, world: int, store: str, folders: dict[str, str], out: str) -> None:
    """Each case in turn on this rank; results in OUT/CASE-rankR.pt."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    # Blocks of 23 rows of 128: rank 1's half of the 320-row embedding starts mid-block.
    sharded_init._ROW_BLOCK_ELEMENTS = 23 * 128
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folders["pretrained"])
        vocab, cache = len(tokenizer), Path(out) / f"cache{rank}"
        for case, folder in folders.items():
            if case == "memory":
                result: dict[str, Any] = _memory(folder, vocab, cache)
            elif case == "trainer":
                result = _through_the_trainer(folder, world, Path(out) / f"run{rank}")
            else:
                model = _build(case, folder, vocab, cache, torch.device("cpu"))
                base = models.base_model(model)
                full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
                result = {
                    "full": full,  # gathered before a forward leaves the root unsharded
                    "logits": logits(model, tokenizer),
                    "tied": base.lm_head.weight is base.model.embed_tokens.weight,
                    "buffers": {n: b.clone() for n, b in model.named_buffers()},
                    "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
                }
            torch.save(result, Path(out) / f"{case}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run(world: int, folders: dict[str, Path], out: Path) -> dict[str, list[dict[str, Any]]]:
    """One spawn per world size (each process pays seconds of imports), every case in it."""
    named = {case: str(folder) for case, folder in folders.items()}
    mp.spawn(worker, args=(world, str(out / "store"), named, str(out)), nprocs=world, join=True)
    return {
        case: [torch.load(out / f"{case}-rank{r}.pt", weights_only=True) for r in range(world)]
        for case in folders
    }


def _save(tokenizer: PreTrainedTokenizerFast, folder: Path, **overrides: Any) -> Path:
    model = tiny(tokenizer, folder.parent / "cache", seed=7, config_overrides=overrides)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tied_folder(
    tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerFast
) -> Path:
    return _save(tokenizer, tmp_path_factory.mktemp("tied") / "model", tie_word_embeddings=True)


@pytest.fixture(scope="module")
def big_folder(
    tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerFast
) -> Path:
    return _save(tokenizer, tmp_path_factory.mktemp("big") / "model", **BIG)


@pytest.fixture(scope="module")
def world2(
    tmp_path_factory: pytest.TempPathFactory, tied_folder: Path, big_folder: Path
) -> dict[str, list[dict[str, Any]]]:
    folders = {  # memory last: the first build pays one-time allocations (imports, caches)
        "pretrained": tied_folder,
        "random": tied_folder,
        "lora": tied_folder,
        "trainer": tied_folder,
        "memory": big_folder,
    }
    return _run(2, folders, tmp_path_factory.mktemp("world2"))


@pytest.fixture(scope="module")
def world1(
    tmp_path_factory: pytest.TempPathFactory, tied_folder: Path
) -> dict[str, list[dict[str, Any]]]:
    return _run(
        1, {"pretrained": tied_folder, "random": tied_folder}, tmp_path_factory.mktemp("world1")
    )


def _old_way(tokenizer: PreTrainedTokenizerFast, spec: api.ModelSpec, tmp_path: Path) -> Any:
    return models.build_model(
        spec, vocab_size=len(tokenizer), dropout=0.0, dtype="float32", cache_dir=tmp_path
    )


def test_pretrained_shards_give_the_full_models_logits(
    tokenizer: PreTrainedTokenizerFast, tied_folder: Path, tmp_path: Path, world2: Any
) -> None:
    old = _old_way(tokenizer, _spec("pretrained", str(tied_folder)), tmp_path)
    expected = logits(old, tokenizer)
    for res in world2["pretrained"]:
        torch.testing.assert_close(res["logits"], expected, rtol=1e-5, atol=1e-5)
        assert res["tied"]  # one parameter, read once from embed_tokens.weight
        for name, value in old.named_parameters():
            torch.testing.assert_close(res["full"][name], value, rtol=0, atol=0)
        # Rotary frequencies recomputed, not left as to_empty's garbage.
        for name, value in old.named_buffers():
            torch.testing.assert_close(res["buffers"][name], value, rtol=0, atol=0)


def test_random_init_is_the_same_at_world_size_1_and_2(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path, world1: Any, world2: Any
) -> None:
    one, two = world1["random"], world2["random"]
    full = one[0]["full"]
    for res in two:
        assert res["full"].keys() == full.keys()
        for name, value in full.items():
            assert torch.equal(res["full"][name], value), name
        torch.testing.assert_close(res["logits"], one[0]["logits"], rtol=1e-5, atol=1e-5)
    # HF's init: normal(0, initializer_range) matrices, unit norms.
    assert full["model.layers.0.mlp.up_proj.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.equal(full["model.norm.weight"], torch.ones_like(full["model.norm.weight"]))
    # The same weights in a model built the old way give the same logits: buffers are right.
    old = _old_way(tokenizer, _spec("random", ""), tmp_path)
    old.load_state_dict(full)
    torch.testing.assert_close(two[0]["logits"], logits(old, tokenizer), rtol=1e-5, atol=1e-5)
    # Not the old path's weights by accident (nor uninitialized memory): a different seed.
    assert not torch.equal(
        old.model.embed_tokens.weight, tiny(tokenizer, tmp_path).model.embed_tokens.weight
    )


def test_lora_over_pretrained_starts_as_the_base_model(
    tokenizer: PreTrainedTokenizerFast, tied_folder: Path, tmp_path: Path, world2: Any
) -> None:
    old = models.apply_lora(_old_way(tokenizer, _spec("lora", str(tied_folder)), tmp_path), LORA)
    expected = logits(old, tokenizer)
    res = world2["lora"][0]
    torch.testing.assert_close(res["logits"], expected, rtol=1e-5, atol=1e-5)
    assert res["trainable"] == sorted(n for n, p in old.named_parameters() if p.requires_grad)
    lora_a = [v for n, v in res["full"].items() if ".lora_A." in n]
    lora_b = [v for n, v in res["full"].items() if ".lora_B." in n]
    assert lora_a
    assert all(v.abs().sum() > 0 for v in lora_a)
    assert lora_b
    assert all(not v.any() for v in lora_b)
    for name, value in old.named_parameters():
        if "lora_" not in name:
            assert torch.equal(res["full"][name], value), name


def test_no_rank_allocates_the_full_model(
    tokenizer: PreTrainedTokenizerFast, big_folder: Path, tmp_path: Path, world2: Any
) -> None:
    old = _old_way(tokenizer, _spec("pretrained", str(big_folder)), tmp_path)
    model_bytes = sum(p.numel() * 4 for p in old.parameters())
    for res in world2["memory"]:
        assert res["local"] == pytest.approx(model_bytes / 2, rel=0.05)
        # The measure sees a full model when one is built ...
        assert res["old_random"] >= 0.9 * model_bytes, res
        # ... and the sharded builds stay near this rank's half.
        assert res["new_random"] <= 0.6 * model_bytes, (res, model_bytes)
        assert res["new_pretrained"] <= 0.6 * model_bytes, (res, model_bytes)
        # RSS moves with more than us (the margin): a memory-mapped read would be ~1.0.
        assert res["new_pretrained_rss"] <= 0.75 * model_bytes, (res, model_bytes)


def test_pretrained_matches_at_world_size_1(
    tokenizer: PreTrainedTokenizerFast, tied_folder: Path, tmp_path: Path, world1: Any
) -> None:
    old = _old_way(tokenizer, _spec("pretrained", str(tied_folder)), tmp_path)
    torch.testing.assert_close(
        world1["pretrained"][0]["logits"], logits(old, tokenizer), rtol=1e-5, atol=1e-5
    )


def test_build_model_keeps_its_full_cpu_model(
    tokenizer: PreTrainedTokenizerFast, tied_folder: Path, tmp_path: Path
) -> None:
    """Export and serving still build the whole model the old way."""
    model = _old_way(tokenizer, _spec("pretrained", str(tied_folder)), tmp_path)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert (
        logits(model, tokenizer).shape[:2]
        == tokenizer(CORPUS[:2], return_tensors="pt", padding=True)["input_ids"].shape
    )


def test_unsharded_materialize_matches_the_old_build(
    tokenizer: PreTrainedTokenizerFast, tied_folder: Path, tmp_path: Path
) -> None:
    """DDP and a single process without a process group materialize the whole model the
    same way: no DTensors, the same weights and buffers as `build_model`."""
    spec = _spec("pretrained", str(tied_folder))
    plan = sharded_init.plan_init(
        spec, vocab_size=len(tokenizer), dropout=0.0, dtype="float32", cache_dir=tmp_path, seed=3
    )
    assert plan is not None
    model = sharded_init.build_empty(plan, None)
    sharded_init.materialize(model, plan, torch.device("cpu"))
    old = _old_way(tokenizer, spec, tmp_path)
    torch.testing.assert_close(logits(model, tokenizer), logits(old, tokenizer), rtol=0, atol=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_folder_without_a_weight_the_model_needs_names_it(
    tokenizer: PreTrainedTokenizerFast, tied_folder: Path, tmp_path: Path
) -> None:
    # Untied, the model needs lm_head.weight; the tied folder stores embed_tokens only.
    spec = api.ModelSpec(
        source=f"file://{tied_folder}", config_overrides={"tie_word_embeddings": False}
    )
    plan = sharded_init.plan_init(
        spec, vocab_size=len(tokenizer), dropout=0.0, dtype="float32", cache_dir=tmp_path, seed=0
    )
    assert plan is not None
    with pytest.raises(ValueError, match=r"spec.model.source: .* lacks 1 weights .*lm_head"):
        sharded_init.build_empty(plan, None)


def test_the_trainers_build_is_sharded_and_starts_as_the_base_model(
    tokenizer: PreTrainedTokenizerFast, tied_folder: Path, tmp_path: Path, world2: Any
) -> None:
    old = _old_way(tokenizer, _spec("pretrained", str(tied_folder)), tmp_path)
    expected = logits(old, tokenizer)
    for res in world2["trainer"]:
        assert res["all_sharded"]
        lora_params = 4 * (4 * (128 + 128) + 4 * (128 + 64))  # 4 layers: q_proj, v_proj, r=4
        assert res["n_params"] == sum(p.numel() for p in old.parameters()) + lora_params
        torch.testing.assert_close(res["logits"], expected, rtol=1e-5, atol=1e-5)
