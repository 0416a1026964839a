"""Export: the finished model as a Hugging Face folder that `from_pretrained`, the model
server and other tools load directly, plus `kubetrain-run.json` saying where it came from.

The folder appears whole or not at all: it is written beside its final place and renamed.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from kubetrain_api.contract import LINEAGE_FILE, TRAINING_SUMMARY_FILE
from kubetrain_api.lineage import ModelLineage
from kubetrain_trainer.model_folder import RUN_INFO_FILE
from kubetrain_trainer.models import merge_lora

if TYPE_CHECKING:
    from peft import PeftModel

# Room for a paragraph; the server caps requests with spec.serve.maxTokens anyway.
DEFAULT_MAX_NEW_TOKENS = 256


def export_model(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    run_info: dict[str, Any],
    lineage: ModelLineage | None = None,
    training_summary: dict[str, Any] | None = None,
) -> Path:
    """Write `model` (LoRA merged, in place) and `tokenizer` to `out_dir` as a Hugging Face
    folder with a generation config and `run_info` (resolved spec, data summary, metrics,
    lineage) and, when given, its `lineage` record (contract.LINEAGE_FILE) and the training
    texts' drift summary (contract.TRAINING_SUMMARY_FILE, served by the engine). `model` must
    hold full, unsharded weights. An earlier export is replaced."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    info_text = json.dumps(run_info, indent=2)  # fail before writing anything
    summary_text = json.dumps(training_summary) if training_summary is not None else None
    model = merge_lora(model)
    _align_special_tokens(model, tokenizer)

    partial = Path(
        tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent)
    )
    try:
        model.save_pretrained(partial)  # safetensors, the default since transformers 4.35
        tokenizer.save_pretrained(partial)
        (partial / RUN_INFO_FILE).write_text(info_text)
        if lineage is not None:
            (partial / LINEAGE_FILE).write_text(lineage.to_json())
        if summary_text is not None:
            (partial / TRAINING_SUMMARY_FILE).write_text(summary_text)
        _fsync_tree(partial)
        _publish(partial, out_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out_dir


def _align_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make config and generation config agree with the tokenizer: a built-in model's config
    carries its architecture's default ids, not those of the tokenizer trained for it.
    Other generation settings (a chat model's sampling defaults) are kept."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    ids["pad_token_id"] = pad
    for key, value in ids.items():
        setattr(model.config, key, value)
    context = getattr(model.config, "max_position_embeddings", DEFAULT_MAX_NEW_TOKENS)
    generation = copy.deepcopy(model.generation_config)
    generation.update(**ids, max_new_tokens=min(DEFAULT_MAX_NEW_TOKENS, context))
    model.generation_config = generation


def _fsync_tree(root: Path) -> None:
    # The rename publishes the folder; the data must be on disk before it, not after.
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())


def _publish(partial: Path, out_dir: Path) -> None:
    """Rename the finished folder into place. A previous export is moved aside first (a
    directory cannot be replaced atomically), so a crash leaves the old or the new one."""
    if not out_dir.exists():
        partial.rename(out_dir)
        return
    previous = partial.with_suffix(".previous")
    out_dir.rename(previous)
    partial.rename(out_dir)
    shutil.rmtree(previous)


def load_exported(
    model_dir: Path,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """An exported folder back as (model in eval mode, tokenizer, run info)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    run_info = json.loads((Path(model_dir) / RUN_INFO_FILE).read_text())
    return model, tokenizer, run_info


@torch.no_grad()
def generate_sample(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_new_tokens: int = 40,
    *,
    add_special_tokens: bool = True,
) -> str:
    """The greedy plain-text continuation of `prompt` (without the prompt), for eyeballing
    a model in logs and reports."""
    was_training = model.training
    model.eval()  # no dropout while sampling
    try:
        # A rendered chat already holds its special tokens.
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens).to(
            model.device
        )
        pad = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
        )
    finally:
        model.train(was_training)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True)
