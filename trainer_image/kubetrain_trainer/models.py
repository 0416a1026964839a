"""Models: where weights come from, how a `spec.model` becomes a transformers model, LoRA,
and the shape facts the FSDP2 code and the MFU meter need.

Every architecture is a plain Hugging Face causal LM, so checkpoints convert to and from the
exported folder without a mapping table (torchtitan keeps its own model and pays for a
converter; at this scale the HF classes are the better trade).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import fsspec
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

from kubetrain_api import contract
from kubetrain_api import v1alpha1 as api
from kubetrain_trainer.exits import SpecFailure

if TYPE_CHECKING:  # peft costs ~2 s of import per process; only LoRA runs load it
    from peft import PeftModel

IGNORE_INDEX = -100  # label that takes no part in the loss (HF and torch convention)
PVC_ROOT_ENV = contract.PVC_ROOT_ENV

# ~0.9M parameters at a 512-token vocabulary, ~2.9M at 8k: a few seconds per hundred steps
# on two CPU cores, yet a real GQA decoder with RoPE, RMSNorm and SwiGLU.
_TINY_SHAPE: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 352,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}
BUILTIN_CONFIGS: dict[str, type[PretrainedConfig]] = {
    "tiny-llama": LlamaConfig,
    "tiny-qwen2": Qwen2Config,
}

_DTYPES = {
    # `auto` keeps fp32 master weights; bf16 compute comes from FSDP2 mixed precision.
    "auto": torch.float32,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# attention_dropout, hidden_dropout, resid_pdrop, embd_pdrop, dropout, dropout_rate, ...
# but not `layerdrop`, which skips whole layers and is a different regulariser.
_DROPOUT_FIELD = re.compile(r"(^|_)(dropout|pdrop)(_rate)?$")


# --------------------------------------------------------------------------------------
# Where the files are
# --------------------------------------------------------------------------------------


def resolve_model_path(uri: str, cache_dir: Path, *, revision: str | None = None) -> Path:
    """A local folder holding the Hugging Face model at `uri` (downloaded if remote).

    `file:///abs/path` and `pvc://CLAIM/PATH` (under `$KUBETRAIN_PVC_ROOT`, default
    /mnt/pvc) are read in place; `hf://ORG/NAME[/SUBFOLDER]` goes through the Hub cache under
    `cache_dir`; `s3://`, `gs://` and other fsspec URLs are copied into `cache_dir` once.
    """
    path = _local_folder(uri, cache_dir, revision)
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"{uri}: {path} has no config.json, so it is not a model folder")
    return path


class ModelNotFound(SpecFailure, FileNotFoundError):
    """A model or tokenizer URI that names no model folder: the spec's mistake (one line,
    exit code invalid spec), still a FileNotFoundError for callers that probe."""


def _local_folder(uri: str, cache_dir: Path, revision: str | None) -> Path:
    scheme = urlsplit(uri).scheme
    if scheme == "file":
        path = Path(unquote(urlsplit(uri).path))
    elif scheme == "pvc":
        path = _pvc_path(uri)
    elif scheme == "hf":
        path = _hub_snapshot(uri, cache_dir, revision)
    elif scheme == "builtin":
        raise ValueError(f"{uri} is a built-in config, not a folder")
    else:
        path = _copy_to_cache(uri, cache_dir)
    if not path.is_dir():
        raise ModelNotFound(f"{uri}: no folder at {path}")
    return path


def _pvc_path(uri: str) -> Path:
    """pvc://CLAIM/PATH -> $KUBETRAIN_PVC_ROOT/CLAIM/PATH, where the pod mounts each claim."""
    return Path(contract.pvc_path(uri))


def hf_token() -> str | None:
    """The token in the file named by HF_TOKEN_PATH (the mounted Secret), if any; without
    one huggingface_hub falls back to its own sources (HF_TOKEN, a cached login)."""
    token_path = os.environ.get("HF_TOKEN_PATH")
    return Path(token_path).read_text().strip() if token_path else None


def _hub_snapshot(uri: str, cache_dir: Path, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    org, name, *subfolder = uri.removeprefix("hf://").split("/")
    try:
        snapshot = snapshot_download(
            f"{org}/{name}",
            revision=revision,
            token=hf_token(),
            cache_dir=cache_dir / "hf",
            # Meta's repos repeat the weights as consolidated .pth files for their own code.
            ignore_patterns=["original/*"],
        )
    except Exception as exc:  # the Hub raises a dozen types; the URI is what the user needs
        raise RuntimeError(f"{uri}: download from the Hugging Face Hub failed: {exc}") from exc
    return Path(snapshot, *subfolder)


def _copy_to_cache(uri: str, cache_dir: Path) -> Path:
    """Copy a remote folder into the cache once. Each process copies into its own temporary
    folder and renames it into place, so ranks that race never see a partial copy."""
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = cache_dir / "remote" / f"{Path(uri.rstrip('/')).name}-{digest}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fs, remote = fsspec.core.url_to_fs(uri)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if not fs.isdir(remote):
            raise FileNotFoundError(f"{uri}: no folder there")
        fs.get(remote.rstrip("/") + "/", f"{partial}/", recursive=True)
        partial.rename(target)
    except PermissionError as err:
        # An object store's 403: the credentials are wrong, retrying will not help.
        raise SpecFailure(
            f"{uri}: access denied ({err}); check the object store credentials "
            "(secrets.objectStore: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)"
        ) from err
    except OSError:
        if not target.is_dir():  # not a lost race with another process: a real failure
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------


def builtin_config(
    name: str, vocab_size: int, overrides: dict[str, Any] | None = None
) -> PretrainedConfig:
    """The tiny config called `name`, sized for the tokenizer, with `overrides` applied
    before derived fields (head_dim) are computed."""
    if name not in BUILTIN_CONFIGS:
        raise ValueError(f"unknown built-in model {name!r} (known: {', '.join(BUILTIN_CONFIGS)})")
    config_class = BUILTIN_CONFIGS[name]
    overrides = overrides or {}
    _reject_unknown_fields(config_class(), overrides)
    return config_class(**{**_TINY_SHAPE, "vocab_size": vocab_size, **overrides})


def _reject_unknown_fields(config: PretrainedConfig, overrides: dict[str, Any]) -> None:
    # A config stores any keyword it is given, so a typo would otherwise pass silently.
    unknown = sorted(key for key in overrides if not hasattr(config, key))
    if unknown:
        raise ValueError(
            f"spec.model.configOverrides: {', '.join(unknown)} not a field of the "
            f"{config.model_type} config"
        )


def folder_config(path: Path, overrides: dict[str, Any]) -> PretrainedConfig:
    config, unused = AutoConfig.from_pretrained(path, return_unused_kwargs=True, **overrides)
    _reject_unknown_fields(config, unused)
    return config


def set_dropout(config: PretrainedConfig, dropout: float) -> list[str]:
    """Set every dropout probability the architecture has; returns the field names."""
    fields = sorted(key for key in config.to_dict() if _DROPOUT_FIELD.search(key))
    for key in fields:
        setattr(config, key, dropout)
    return fields


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of `spec.model.dtype`."""
    return _DTYPES[dtype]


def model_config(
    model_spec: api.ModelSpec, *, vocab_size: int | None, dropout: float, cache_dir: Path
) -> tuple[PretrainedConfig, Path | None]:
    """The config `model_spec` describes, and the local folder it came from (None for a
    built-in config, which `vocab_size`, the tokenizer's length, sizes)."""
    overrides = model_spec.config_overrides
    if model_spec.source.startswith("builtin://"):
        if vocab_size is None:
            raise ValueError("a built-in model needs the tokenizer's vocab_size")
        config = builtin_config(model_spec.source.removeprefix("builtin://"), vocab_size, overrides)
        set_dropout(config, dropout)
        return config, None
    path = resolve_model_path(model_spec.source, cache_dir, revision=model_spec.revision)
    config = folder_config(path, overrides)
    set_dropout(config, dropout)
    return config, path


def build_model(
    model_spec: api.ModelSpec,
    *,
    vocab_size: int | None,
    dropout: float,
    dtype: str,
    cache_dir: Path,
) -> PreTrainedModel:
    """The full model `model_spec` describes, on the CPU (the trainer builds it sharded
    instead: `sharded_init`). Random weights depend only on the torch seed, so every rank
    builds the same model. `vocab_size` is the tokenizer's length: it sizes a built-in
    model and grows a loaded model's embeddings when it is larger."""
    config, path = model_config(
        model_spec, vocab_size=vocab_size, dropout=dropout, cache_dir=cache_dir
    )
    if path is not None and model_spec.init == "pretrained":
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch_dtype(dtype))
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    if vocab_size is not None and vocab_size > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab_size)
    return model


def load_tokenizer(model_spec: api.ModelSpec, cache_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a loaded model: `spec.model.tokenizer` when set, else the model's
    own. Built-in models have none; the data step trains one on the run's data."""
    uri = model_spec.tokenizer or model_spec.source
    if uri.startswith("builtin://"):
        raise ValueError(f"{uri} has no tokenizer; built-in models train one on the run's data")
    revision = None if model_spec.tokenizer else model_spec.revision
    tokenizer = AutoTokenizer.from_pretrained(_local_folder(uri, cache_dir, revision))
    if tokenizer.pad_token is None:
        # Many causal LMs ship without one; batching and generation need it, and padded
        # positions are masked out of the loss anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --------------------------------------------------------------------------------------
# Packed documents
# --------------------------------------------------------------------------------------


def uses_flash_attention(model: torch.nn.Module) -> bool:
    """Whether the model attends with a flash_attention_* kernel (under DDP, PEFT or not)."""
    inner = getattr(model, "module", model)  # DDP
    config = getattr(_base(inner), "config", None)
    return str(getattr(config, "_attn_implementation", None) or "").startswith("flash_attention")


def flatten_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The rows of a packed batch as one row of B x S tokens, for flash attention: it reads
    document boundaries from position_ids only when the batch has one row (transformers'
    `_is_packed_sequence`, as `DataCollatorWithFlattening` feeds it). Position ids restart
    at every row, so rows stay apart; each row's first label is ignored, because in one
    row it would be predicted from the previous row's last token. Losses are unchanged."""
    labels = batch["labels"].clone()
    labels[:, 0] = IGNORE_INDEX
    flat = {k: v.reshape(1, -1) for k, v in batch.items() if k != "labels"}
    return {**flat, "labels": labels.reshape(1, -1)}


def check_packed_attention(model: PreTrainedModel | PeftModel) -> None:
    """Raise unless `model` keeps packed documents apart: the data step restarts
    `position_ids` at each document, and transformers (>= 4.56) turns a restart into a
    block-diagonal causal mask for sdpa/eager/flex and into varlen kernels for
    flash_attention_2, when no attention_mask is passed. An architecture that ignores
    this (remote code, or its own mask) would let documents attend to each other silently,
    so a 2 x 4-token probe compares the second document packed and alone."""
    if uses_flash_attention(model):
        return  # varlen kernels on flattened rows (`flatten_rows`); and they need a GPU
    probe = torch.arange(1, 9)[None] % model.get_input_embeddings().num_embeddings
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(input_ids=probe, position_ids=positions, use_cache=False).logits
            alone = model(input_ids=probe[:, 4:], use_cache=False).logits
    finally:
        model.train(was_training)
    tolerance = 1e-4 if alone.dtype == torch.float32 else 2e-2  # bf16/fp16 weights
    packed, alone = packed[:, 4:].float(), alone.float()
    if not torch.allclose(packed, alone, atol=tolerance * (1 + alone.abs().max().item())):
        name = type(_base(model)).__name__
        implementation = getattr(_base(model).config, "_attn_implementation", None)
        raise ValueError(
            f"spec.data.packing: {name} with attention {implementation!r} lets packed "
            "documents attend to each other (it ignores per-document position_ids); "
            "set packing: false"
        )


# --------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------


def apply_lora(
    model: PreTrainedModel, lora: api.LoraSpec, *, low_cpu_mem_usage: bool = False
) -> PeftModel:
    """Wrap `model` with LoRA adapters; the base weights are frozen, only adapters train.
    `low_cpu_mem_usage` creates the adapters on the meta device (a meta-built model)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft probes the attribute transformers renamed; its deprecation is not ours to fix.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        return get_peft_model(model, config, low_cpu_mem_usage=low_cpu_mem_usage)


def merge_lora(model: PreTrainedModel | PeftModel) -> PreTrainedModel:
    """A plain model with the adapters folded into the base weights (in place: the PEFT
    wrapper is spent afterwards). A model without adapters comes back unchanged."""
    if is_peft(model):
        return model.merge_and_unload()
    return model


# --------------------------------------------------------------------------------------
# Shape facts for FSDP2 and MFU
# --------------------------------------------------------------------------------------


def is_peft(model: object) -> bool:
    """A PEFT-wrapped model; without importing peft, since none exists until it is."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def base_model(model: PreTrainedModel | PeftModel) -> PreTrainedModel:
    """The transformers model, inside its PEFT wrapper if it has one."""
    return model.get_base_model() if is_peft(model) else model


_base = base_model


def transformer_blocks(model: PreTrainedModel | PeftModel) -> list[torch.nn.Module]:
    """The decoder layers, in order: the units FSDP2 shards and checkpointing wraps.
    Found by the block classes the model names in `_no_split_modules`, as accelerate does."""
    base = _base(model)
    block_names = set(base._no_split_modules or ())
    blocks = [m for m in base.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(f"{type(base).__name__} names no transformer block class")
    return blocks


@dataclass(frozen=True)
class ModelShape:
    """What the FLOPs-per-token formula needs (nanoGPT / torchtitan's estimate)."""

    n_params: int
    """All parameters, adapters included, shared ones once."""
    n_embedding_params: int
    """Parameters used only as lookup tables (no matmul FLOPs): the input embeddings,
    unless tied to the output head."""
    n_layers: int
    n_heads: int
    head_dim: int
    n_frozen_params: int = 0
    """Matmul parameters (input embeddings excluded) that get no weight gradient: the
    frozen base of a LoRA model."""


def model_shape(model: PreTrainedModel | PeftModel) -> ModelShape:
    base = _base(model)
    config = base.config
    output = base.get_output_embeddings()
    output_weight = output.weight if output is not None else None
    lookups = [
        m.weight
        for m in base.modules()
        if isinstance(m, torch.nn.Embedding) and m.weight is not output_weight
    ]
    lookup_ids = {id(w) for w in lookups}
    n_heads = config.num_attention_heads
    return ModelShape(
        n_params=sum(p.numel() for p in model.parameters()),
        n_embedding_params=sum(w.numel() for w in lookups),
        n_layers=len(transformer_blocks(model)),
        n_heads=n_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // n_heads,
        n_frozen_params=sum(
            p.numel() for p in model.parameters() if not p.requires_grad and id(p) not in lookup_ids
        ),
    )
