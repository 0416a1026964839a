"""`parallelize` on one process: a single-GPU run must still get FSDP2's mixed-precision
policy. (It once returned the bare model at world size 1, and an H200 trained a 0.6B model
in fp32 at 4% MFU; with the policy, 26%.) Checked here on CPU over gloo, where bf16
matmuls exist too."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerFast

from kubetrain_api import validation
from kubetrain_trainer.config import resolve
from kubetrain_trainer.parallelize import parallelize
from tests.support.runs import quickstart

from .conftest import tiny

pytestmark = pytest.mark.trainer


@pytest.fixture
def one_process(tmp_path: Path) -> Iterator[None]:
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def _compute_dtypes(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path, precision: str, strategy: str = "fsdp"
) -> set[torch.dtype]:
    doc = quickstart("one", hyperparameters__precision=precision, distributed__strategy=strategy)
    config = resolve(validation.parse(doc), tmp_path / "out", use_gpu=False, world_size=1)
    model = tiny(tokenizer, tmp_path)
    blocks = list(model.model.layers)
    seen: set[torch.dtype] = set()
    hook = blocks[0].mlp.down_proj.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    model = parallelize(model, blocks, config, torch.device("cpu"))
    ids = torch.randint(0, len(tokenizer), (2, 16))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    hook.remove()
    return seen


def test_one_process_computes_in_bf16_under_bf16_mixed(
    one_process: None, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    assert _compute_dtypes(tokenizer, tmp_path, "bf16-mixed") == {torch.bfloat16}


def test_one_process_in_fp32_stays_fp32(
    one_process: None, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    assert _compute_dtypes(tokenizer, tmp_path, "fp32") == {torch.float32}
