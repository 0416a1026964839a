"""Sharded model initialization, the torchtitan way: build the model on the meta device, wrap
LoRA, shard it (FSDP2), then materialize only this rank's shards and fill them, so that no
rank ever holds the full model (a 7B model is 28 GB of fp32 per rank the old way).

Filling is per parameter and independent of the sharding:
- pretrained weights: a rank reads the byte range of its own rows out of the safetensors
  files with plain reads (FSDP2 shards dim 0, so a shard is contiguous). Not a memory map:
  the pages it touches would stay resident, 1.1x the model per rank at world size 2;
- random weights come from Hugging Face's own `_init_weights`, run on a CPU copy of one
  module at a time (Linear and Embedding rows in fixed blocks, so a rank draws only its
  own rows), each under a seed derived from the run's seed and the parameter's name: the
  full weights are the same at any world size (DTensor's RNG tracker is not: it is
  offset-based on CUDA only, and on CPU each rank draws its own stream);
- LoRA adapters start as PEFT starts them (lora_B zero: the wrapped model is the base).
Buffers (rotary `inv_freq`, ...) are built for real with the meta model (they are small)
and copied back after `to_empty`, which leaves every tensor uninitialized.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import json
import logging
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from kubetrain_api import v1alpha1 as api
from kubetrain_trainer import models
from kubetrain_trainer.config import TrainConfig
from kubetrain_trainer.parallelize import parallelize

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
# Rows of a Linear or Embedding weight drawn per seed (4 MiB of fp32): small beside a
# shard, and fixed, so the weights do not depend on the world size.
_ROW_BLOCK_ELEMENTS = 1 << 20
# PEFT's adapter parameters; around them, `x.base_layer.weight` is the checkpoint's `x.weight`.
_LORA_PARAM = re.compile(r"\.lora_(A|B|embedding_A|embedding_B)\.")


@dataclass(frozen=True)
class Stored:
    """Where one tensor's bytes lie in a safetensors file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    """Byte offset of its first element from the start of the file."""


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class InitPlan:
    """How to fill a model: from a pretrained folder's safetensors, or at random."""

    spec: api.ModelSpec
    config: PretrainedConfig
    dtype: torch.dtype
    seed: int
    weights: dict[str, Stored] | None = None
    """Checkpoint key -> where it is stored; None for random init."""


def plan_init(
    model_spec: api.ModelSpec,
    *,
    vocab_size: int | None,
    dropout: float,
    dtype: str,
    cache_dir: Path,
    seed: int,
) -> InitPlan | None:
    """The plan for a sharded build, or None (with the reason logged) where only the full
    build works: a pretrained folder without safetensors files (legacy .bin), or one whose
    embeddings must grow for the tokenizer (transformers' mean-resizing needs all rows)."""
    config, path = models.model_config(
        model_spec, vocab_size=vocab_size, dropout=dropout, cache_dir=cache_dir
    )
    torch_dtype = models.torch_dtype(dtype)
    if path is None or model_spec.init != "pretrained":
        if vocab_size is not None and vocab_size > config.vocab_size:
            config.vocab_size = vocab_size  # random rows either way: no resize needed
        return InitPlan(model_spec, config, torch_dtype, seed)
    weights = safetensors_index(path)
    if weights is None:
        log.warning("%s has no safetensors files: every rank loads the full model", path)
        return None
    if vocab_size is not None and vocab_size > config.vocab_size:
        log.warning(
            "%s: the tokenizer (%d) outgrows the embeddings (%d): every rank loads the full "
            "model to resize them",
            model_spec.source,
            vocab_size,
            config.vocab_size,
        )
        return None
    return InitPlan(model_spec, config, torch_dtype, seed, weights)


def safetensors_index(folder: Path) -> dict[str, Stored] | None:
    """Checkpoint key -> where it is stored, from the files' headers (the sharded index
    names the files); None when the folder has no safetensors files."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / SAFETENSORS_SINGLE).is_file():
        files = [SAFETENSORS_SINGLE]
    else:
        return None
    return {key: stored for name in files for key, stored in _header(folder / name).items()}


def _header(file: Path) -> dict[str, Stored]:
    # The format: an 8-byte little-endian length, a JSON header, then the raw data.
    with file.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    data = 8 + length
    out = {}
    for key, entry in header.items():
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{file}: {key} has dtype {entry['dtype']}, which we cannot load")
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        out[key] = Stored(file, dtype, tuple(entry["shape"]), data + entry["data_offsets"][0])
    return out


def build_empty(plan: InitPlan, lora: api.LoraSpec | None) -> nn.Module:
    """The model on the meta device (buffers real, on the CPU), LoRA-wrapped if asked."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(plan.config, dtype=plan.dtype)
    # The meta context re-registers every parameter, which unties shared ones: tie again.
    model.tie_weights()
    if plan.weights is not None:
        _check_keys(model, plan.weights, plan.spec.source)
    if lora is not None:
        return models.apply_lora(model, lora, low_cpu_mem_usage=True)
    return model


def _check_keys(model: PreTrainedModel, weights: dict[str, Stored], source: str) -> None:
    # Fail before any shard is read, naming what the folder lacks (a renamed architecture,
    # a checkpoint saved from the base model without its head, ...).
    missing = sorted(name for name, _ in model.named_parameters() if name not in weights)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(
            f"spec.model.source: {source} lacks {len(missing)} weights the "
            f"{type(model).__name__} needs ({shown})"
        )


def materialize(model: nn.Module, plan: InitPlan, device: torch.device) -> None:
    """Allocate this rank's shards on `device` (a sharded or a plain model) and fill them."""
    from torch.distributed.fsdp import FSDPModule

    buffers = {name: buf for name, buf in model.named_buffers() if not buf.is_meta}
    model.to_empty(device=device)
    base = models.base_model(model)
    if not isinstance(model, FSDPModule):
        # Plain modules get a new Parameter per module from meta: shared ones come apart.
        # (FSDP2 swaps its DTensors in place; they stay shared.)
        base.tie_weights()
    with torch.no_grad():
        for name, saved in buffers.items():
            model.get_buffer(name).copy_(saved)
        params = dict(base.named_parameters())  # one name per shared (tied) parameter
        if plan.weights is not None:
            _load_pretrained(params, plan.weights)
        else:
            _init_random(base, plan.seed)
        _init_adapters(params, plan.seed)


def _load_pretrained(params: dict[str, nn.Parameter], weights: dict[str, Stored]) -> None:
    """Read each parameter's shard with plain reads, not a memory map: a rank's resident
    memory then holds its shards only, not the file pages it read them from."""
    files: dict[Path, io.FileIO] = {}
    try:
        for name, param in params.items():
            if _LORA_PARAM.search(name):
                continue
            stored = weights[name.replace(".base_layer.", ".")]
            if tuple(param.shape) != stored.shape:
                raise ValueError(
                    f"spec.model.source: {name} is {tuple(stored.shape)} in {stored.file.name}, "
                    f"the model expects {tuple(param.shape)}"
                )
            if stored.file not in files:
                files[stored.file] = io.FileIO(stored.file, "rb")
            f = files[stored.file]
            _fill(param, functools.partial(_read, f, stored))
    finally:
        for f in files.values():
            f.close()


def _read(
    f: io.FileIO, stored: Stored, slices: tuple[slice, ...], into: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The slices of a stored tensor. FSDP2 shards dim 0, so a shard is a contiguous byte
    range: read just that range, straight into `into` when it can hold the bytes as they
    are (then None comes back)."""
    if any(s.start != 0 or s.stop != n for s, n in zip(slices[1:], stored.shape[1:], strict=True)):
        rows = slice(slices[0].start, slices[0].stop) if slices else slice(None)
        whole = _read(f, stored, (rows, *(slice(0, n) for n in stored.shape[1:])))
        assert whole is not None
        return whole[(slice(None), *slices[1:])]
    start, stop = (slices[0].start, slices[0].stop) if slices else (0, 1)
    shape = (stop - start, *stored.shape[1:])
    direct = (
        into is not None
        and into.device.type == "cpu"
        and into.dtype == stored.dtype
        and into.is_contiguous()
        and into.numel() == math.prod(shape)
    )
    out = into if direct else torch.empty(shape, dtype=stored.dtype)
    assert out is not None
    row_bytes = math.prod(stored.shape[1:]) * out.element_size()
    buffer = memoryview(out.detach().view(-1).view(torch.uint8).numpy())
    f.seek(stored.offset + start * row_bytes)
    got = 0
    while got < buffer.nbytes:
        n = f.readinto(buffer[got:])
        if not n:
            raise ValueError(f"{stored.file}: truncated (a tensor's bytes run past its end)")
        got += n
    if direct:
        return None
    return out if slices else out[0]


def _init_random(base: nn.Module, seed: int) -> None:
    """HF's init of each module, on a full-size CPU copy of that module's own parameters,
    seeded by the parameter's name; then each rank keeps its slices."""
    init_weights: Callable[[nn.Module], None] = base._init_weights  # type: ignore[assignment]
    # transformers' generic init draws Linear and Embedding weights element by element
    # (normal, zeros), so blocks of rows can be drawn apart: each rank draws only the blocks
    # of its rows, not the whole embedding. A model's own init may not: whole modules then.
    by_rows = type(base)._init_weights is PreTrainedModel._init_weights
    done: set[int] = set()
    for module_name, module in base.named_modules():
        own = {
            n: p
            for n, p in module.named_parameters(recurse=False)
            if id(p) not in done and not _LORA_PARAM.search(f".{module_name}.{n}")
        }
        if not own:
            continue
        done.update(id(p) for p in own.values())
        prefix = f"{module_name}." if module_name else ""
        if by_rows and isinstance(module, (nn.Linear, nn.Embedding)):
            for n, p in own.items():
                draw = functools.partial(_draw_rows, module, n, prefix + n, seed, init_weights)
                _fill(p, lambda slices, _, draw=draw, shape=tuple(p.shape): draw(shape, slices))
            continue
        with _seeded(seed, prefix + next(iter(own))):
            full = _full_size_copy(module)
            init_weights(full)
        for n, p in own.items():
            whole = full.get_parameter(n).detach()
            _fill(p, lambda slices, _, whole=whole: whole[slices])
        del full, whole  # one module's full-size copy at a time


def _draw_rows(
    module: nn.Module,
    param_name: str,
    name: str,
    seed: int,
    init_weights: Callable[[nn.Module], None],
    shape: tuple[int, ...],
    slices: tuple[slice, ...],
) -> Iterator[torch.Tensor]:
    """The rows `slices` asks for of one parameter, in order, drawn in fixed blocks of rows
    (each from its own seed), so the values do not depend on how the rows are split; one
    block at a time."""
    per = max(1, _ROW_BLOCK_ELEMENTS // max(1, math.prod(shape[1:])))
    first, stop = slices[0].start, slices[0].stop
    for block in range(first // per, -(-stop // per)):
        low, high = block * per, min(shape[0], (block + 1) * per)
        piece = _full_size_copy(module, only=param_name)
        piece._parameters[param_name] = nn.Parameter(
            torch.empty((high - low, *shape[1:]), dtype=module._parameters[param_name].dtype)
        )
        if isinstance(module, nn.Embedding):
            pad = module.padding_idx
            piece.padding_idx = pad - low if pad is not None and low <= pad < high else None
        with _seeded(seed, f"{name}/rows{block}"):
            init_weights(piece)
        drawn = piece.get_parameter(param_name).detach()
        yield drawn[max(first, low) - low : min(stop, high) - low][(slice(None), *slices[1:])]


def _full_size_copy(module: nn.Module, only: str | None = None) -> nn.Module:
    """`module` with only its own parameters, real and full-size on the CPU: what HF's init
    functions (they dispatch on the module's class and read its attributes) expect. With
    `only`, the other parameters are None (HF's init skips absent ones)."""
    full = copy.copy(module)
    full._parameters = {
        n: None
        if p is None or only is not None
        else nn.Parameter(torch.empty(p.shape, dtype=p.dtype))
        for n, p in module._parameters.items()
    }
    full._buffers = {}
    full._modules = {}
    return full


def _init_adapters(params: dict[str, nn.Parameter], seed: int) -> None:
    """PEFT's default init (`reset_lora_parameters`, init_lora_weights=True)."""
    for name, p in params.items():
        kind = _LORA_PARAM.search(name)
        if kind is None:
            continue
        whole = torch.empty(p.shape, dtype=p.dtype)
        with _seeded(seed, name):
            if kind.group(1) == "A":
                nn.init.kaiming_uniform_(whole, a=math.sqrt(5))
            elif kind.group(1) == "embedding_B":
                nn.init.normal_(whole)
            else:  # lora_B (weight and bias) and lora_embedding_A start at zero
                nn.init.zeros_(whole)
        _fill(p, lambda slices, _, whole=whole: whole[slices])


def _fill(
    param: torch.Tensor,
    read: Callable[[tuple[slice, ...], torch.Tensor], torch.Tensor | Iterator[torch.Tensor] | None],
) -> None:
    """Fill this rank's part of a parameter from slices of the full tensor: `read(slices,
    local)` returns them as one tensor or as consecutive runs of rows, or None when it
    wrote them into `local` itself."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(
            param.shape, param.device_mesh, param.placements
        )
        local = param.to_local()
    else:
        shape, offset, local = tuple(param.shape), (0,) * param.dim(), param
    if local.numel() == 0:
        return
    slices = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
    parts = read(slices, local)
    if parts is None:
        return
    if isinstance(parts, torch.Tensor):
        local.copy_(parts)
        return
    row = 0
    for part in parts:
        local[row : row + part.shape[0]].copy_(part)
        row += part.shape[0]
    if row != local.shape[0]:
        raise AssertionError(f"filled {row} of {local.shape[0]} rows")


@contextmanager
def _seeded(seed: int, name: str) -> Iterator[None]:
    """The global CPU generator seeded from (seed, name), restored afterwards: HF's init
    functions draw from it, and training's own random stream must not depend on them."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        yield


def build_for_training(
    config: TrainConfig, device: torch.device, vocab_size: int
) -> tuple[nn.Module, models.ModelShape]:
    """The model to train, parallelized, and its shape: built on the meta device and
    materialized shard by shard (FSDP2; under DDP or on one process the whole model, which
    each rank needs anyway). Falls back to the full build where `plan_init` says so."""
    spec, hp = config.spec, config.hp
    plan = plan_init(
        spec.model,
        vocab_size=vocab_size,
        dropout=hp.dropout,
        dtype=config.param_dtype,
        cache_dir=config.output_dir / "cache",
        seed=hp.seed,
    )
    if plan is None:
        model = models.build_model(
            spec.model,
            vocab_size=vocab_size,
            dropout=hp.dropout,
            dtype=config.param_dtype,
            cache_dir=config.output_dir / "cache",
        )
        if spec.data.packing:
            models.check_packed_attention(model)
        if spec.lora is not None:
            model = models.apply_lora(model, spec.lora)
        shape = models.model_shape(model)
        model.to(device)
        return parallelize(model, models.transformer_blocks(model), config, device), shape

    model = build_empty(plan, spec.lora)
    shape = models.model_shape(model)  # DTensors report global shapes, meta ones too
    blocks = models.transformer_blocks(model)
    if dist.is_initialized() and spec.distributed.strategy == "fsdp":
        model = parallelize(model, blocks, config, device)
        materialize(model, plan, device)
        if spec.data.packing:
            _check_packed_sharded(model)
        return model, shape
    materialize(model, plan, device)
    if spec.data.packing:
        models.check_packed_attention(model)
    return parallelize(model, blocks, config, device), shape


def _check_packed_sharded(model: nn.Module) -> None:
    """`check_packed_attention` on the sharded model (a collective: every rank runs it),
    eagerly, then resharded: FSDP2 leaves the root unsharded after a forward, and the
    optimizer must see the sharded parameters."""
    from torch.distributed.fsdp import FSDPModule

    with torch.compiler.set_stance("force_eager"):
        models.check_packed_attention(model)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
