"""The model side of the memory plan: a model's size without its weights.

The model is built from its config on the meta device (`accelerate.init_empty_weights`,
LoRA-wrapped as the trainer wraps it) and sized with accelerate's module-size utilities;
nothing but the config is read. The arithmetic of the plan is `kubetrain_api.memory`.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from kubetrain_api import memory
from kubetrain_api import v1alpha1 as api
from kubetrain_trainer import models
from kubetrain_trainer.data.tokenize import DEFAULT_VOCAB_SIZE
from kubetrain_trainer.exits import SpecFailure

HUB_ENDPOINT = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
# A model's config.json is a few KiB; a file far larger than that is not one.
MAX_CONFIG_BYTES = 1 << 20


def _reachable(url: str, timeout: float = 3.0) -> bool:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=timeout).close()
    except OSError:
        return False
    return True


class ConfigUnavailable(SpecFailure):
    """The model's config cannot be read from here (no network, a claim not mounted)."""


def config_for(
    model_spec: api.ModelSpec, cache_dir: Path, model_configs: Path | None = None
) -> tuple[PretrainedConfig, str]:
    """The config the run would train, and where it was read. Built-in configs are sized
    for the tokenizer the trainer trains for them; `model_configs` is a folder of
    `SCHEME/PATH/config.json` files used where the model's own folder cannot be read."""
    overrides = model_spec.config_overrides
    source = model_spec.source
    if source.startswith("builtin://"):
        name = source.removeprefix("builtin://")
        return models.builtin_config(name, DEFAULT_VOCAB_SIZE, overrides), "built-in"
    local = _local_config(source, model_configs)
    if local is not None:
        return _config_file(local, overrides), str(local)
    try:
        path = _config_only(model_spec, cache_dir)
    except Exception as exc:  # the Hub, fsspec and botocore each raise their own types
        hint = f" (or put one at {model_configs})" if model_configs else ""
        raise ConfigUnavailable(
            f"spec.model.source: cannot read the config of {source}: {exc}; give a local "
            f"config with --model-configs DIR{hint}"
        ) from exc
    return _config_file(path, overrides), str(path)


def _local_config(source: str, model_configs: Path | None) -> Path | None:
    if model_configs is None:
        return None
    parts = urlsplit(source)
    candidate = model_configs / parts.scheme / parts.netloc / parts.path.strip("/") / "config.json"
    return candidate if candidate.is_file() else None


def _config_only(model_spec: api.ModelSpec, cache_dir: Path) -> Path:
    """config.json of the source, without its weights: hub configs are a few KiB."""
    source = model_spec.source
    scheme = urlsplit(source).scheme
    if scheme == "hf":
        from huggingface_hub import hf_hub_download

        org, name, *sub = source.removeprefix("hf://").split("/")
        filename = "/".join([*sub, "config.json"])
        # Without a network the Hub client retries for half a minute: ask the cache only.
        offline = os.environ.get("HF_HUB_OFFLINE") or not _reachable(HUB_ENDPOINT)
        try:
            return Path(
                hf_hub_download(
                    f"{org}/{name}",
                    filename,
                    revision=model_spec.revision,
                    cache_dir=cache_dir / "hf",
                    token=models.hf_token(),
                    local_files_only=bool(offline),
                )
            )
        except Exception as exc:  # the Hub raises a dozen types; one line is enough
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if offline:
                reason = f"no network to reach {HUB_ENDPOINT}, and not in the cache"
            raise RuntimeError(reason) from exc
    if scheme in ("file", "pvc"):
        return models.resolve_model_path(source, cache_dir) / "config.json"
    import fsspec

    fs, remote = fsspec.core.url_to_fs(source.rstrip("/") + "/config.json")
    with fs.open(remote, "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)  # the bucket is the user's: read a bounded amount
    if len(data) > MAX_CONFIG_BYTES:
        raise RuntimeError(f"config.json is over {MAX_CONFIG_BYTES} bytes: not a model config")
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    target = cache_dir / "configs" / f"{digest}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


def _config_file(path: Path, overrides: dict[str, object]) -> PretrainedConfig:
    # AutoConfig reads a folder; a config named by its file is read the same way.
    folder = path.parent
    if path.name != "config.json":
        return AutoConfig.for_model(**{**json.loads(path.read_text()), **overrides})
    return models.folder_config(folder, dict(overrides))


def build_meta(config: PretrainedConfig, lora: api.LoraSpec | None) -> torch.nn.Module:
    """The model as the trainer builds it, on the meta device: no memory, no weights."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()
    if lora is not None:
        model = models.apply_lora(model, lora, low_cpu_mem_usage=True)
    return model


def measure(model: torch.nn.Module) -> memory.ModelSize:
    """accelerate's module sizes (float32: 4 bytes a parameter) and the shapes FSDP2
    shards."""
    from accelerate.utils import compute_module_sizes

    base = models.base_model(model)
    config = base.config
    sizes = compute_module_sizes(model, dtype=torch.float32)
    names = {id(m): name for name, m in model.named_modules()}
    blocks = models.transformer_blocks(model)
    block_params = max(sizes[names[id(b)]] for b in blocks) // 4
    total = sum(p.numel() for p in model.parameters())
    in_blocks = sum(sizes[names[id(b)]] for b in blocks) // 4
    groups: dict[tuple[int, int, bool], int] = {}
    for p in model.parameters():  # shared (tied) parameters once
        key = (int(p.shape[0]) if p.dim() else 1, p.numel(), p.requires_grad)
        groups[key] = groups.get(key, 0) + 1
    heads = config.num_attention_heads
    return memory.ModelSize(
        architecture=type(base).__name__,
        parameters=total,
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        root_parameters=total - in_blocks,
        block_parameters=block_params,
        layers=len(blocks),
        hidden_size=config.hidden_size,
        intermediate_size=getattr(config, "intermediate_size", None) or 4 * config.hidden_size,
        vocab_size=config.vocab_size,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        tensors=[
            memory.TensorGroup(rows=rows, numel=numel, count=count, trainable=trainable)
            for (rows, numel, trainable), count in sorted(groups.items())
        ],
    )


def model_size(
    spec: api.TrainingRunSpec, cache_dir: Path, model_configs: Path | None = None
) -> tuple[memory.ModelSize, str]:
    """The size of the model `spec` trains, and where its config came from."""
    config, where = config_for(spec.model, cache_dir, model_configs)
    return measure(build_meta(config, spec.lora)), where


def plan_run(
    spec: api.TrainingRunSpec,
    cache_dir: Path,
    model_configs: Path | None = None,
    *,
    world: int | None = None,
    gpu: bool | None = None,
) -> tuple[memory.MemoryPlan, str]:
    """The plan of `spec`; `world` and `gpu` as the trainer resolved them, when it did."""
    size, where = model_size(spec, cache_dir, model_configs)
    return memory.plan(spec, size, world=world, gpu=gpu), where
