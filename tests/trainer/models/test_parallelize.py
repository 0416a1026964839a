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

from kubetrain_api import v1alpha1 as api
from kubetrain_api import validation
from kubetrain_trainer.config import resolve
from kubetrain_trainer.optim import build_optimizer
from kubetrain_trainer.parallelize import compute_dtype, parallelize
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


def _one_step(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path, precision: str, strategy: str = "fsdp"
) -> tuple[set[torch.dtype], torch.nn.Module, torch.optim.Optimizer]:
    """One optimizer step; returns the dtypes a block's matmul produced, model, optimizer."""
    doc = quickstart("one", hyperparameters__precision=precision, distributed__strategy=strategy)
    config = resolve(validation.parse(doc), tmp_path / "out", use_gpu=False, world_size=1)
    model = tiny(tokenizer, tmp_path)
    blocks = list(model.model.layers)
    seen: set[torch.dtype] = set()
    hook = blocks[0].mlp.down_proj.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    model = parallelize(model, blocks, config, torch.device("cpu"))
    optimizer = build_optimizer(model, config.hp)
    ids = torch.randint(0, len(tokenizer), (2, 16))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    optimizer.step()
    hook.remove()
    return seen, model, optimizer


def _compute_dtypes(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path, precision: str, strategy: str = "fsdp"
) -> set[torch.dtype]:
    return _one_step(tokenizer, tmp_path, precision, strategy)[0]


def test_one_process_computes_in_bf16_under_bf16_mixed(
    one_process: None, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    assert _compute_dtypes(tokenizer, tmp_path, "bf16-mixed") == {torch.bfloat16}


def test_one_process_in_fp32_stays_fp32(
    one_process: None, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    assert _compute_dtypes(tokenizer, tmp_path, "fp32") == {torch.float32}


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_bf16_mixed_computes_in_bf16_with_fp32_weights_and_optimizer_state(
    one_process: None, tokenizer: PreTrainedTokenizerFast, tmp_path: Path, strategy: str
) -> None:
    """DDP once trained in fp32 under bf16-mixed (while MFU was measured against the bf16
    peak); both strategies must compute in bf16 and keep fp32 master weights and moments."""
    seen, model, optimizer = _one_step(tokenizer, tmp_path, "bf16-mixed", strategy)
    assert seen == {torch.bfloat16}
    params = list(model.parameters())
    assert {p.dtype for p in params} == {torch.float32}
    assert {p.grad.dtype for p in params if p.grad is not None} == {torch.float32}
    moments = {key: state[key].dtype for state in optimizer.state.values() for key in state}
    assert set(moments) >= {"exp_avg", "exp_avg_sq"}
    assert {moments["exp_avg"], moments["exp_avg_sq"]} == {torch.float32}


def test_ddp_in_fp32_stays_fp32(
    one_process: None, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    assert _compute_dtypes(tokenizer, tmp_path, "fp32", "ddp") == {torch.float32}


def test_fp16_mixed_is_refused_before_training(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    doc = quickstart("one", hyperparameters__precision="fp16-mixed")
    errors = validation.validate_document(doc)
    assert [e.path for e in errors] == ["spec.hyperparameters.precision"]
    assert "bf16-mixed" in errors[0].message
    # And the trainer refuses it too when handed an unvalidated config.
    run = api.TrainingRun.model_validate(doc)
    config = resolve(run, tmp_path / "out", use_gpu=False, world_size=1)
    with pytest.raises(ValueError, match="fp16-mixed is not supported"):
        parallelize(tiny(tokenizer, tmp_path), [], config, torch.device("cpu"))


@pytest.mark.parametrize(
    ("precision", "dtype", "expected"),
    [
        ("bf16-mixed", "auto", torch.bfloat16),
        ("fp32", "auto", torch.float32),
        ("fp32", "bfloat16", torch.bfloat16),  # low-precision weights compute in their dtype
    ],
)
def test_compute_dtype_is_what_the_matmuls_run_in(
    tmp_path: Path, precision: str, dtype: str, expected: torch.dtype
) -> None:
    doc = quickstart("one", hyperparameters__precision=precision, model__dtype=dtype)
    config = resolve(validation.parse(doc), tmp_path, use_gpu=False, world_size=1)
    assert compute_dtype(config) == expected
