"""LoRA checkpoints: the adapters and their optimizer state only, never the frozen base; a
resumed run reproduces a straight run's adapters exactly."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from torch.distributed.checkpoint import FileSystemReader

from kubetrain_api import v1alpha1 as api
from kubetrain_trainer import models
from kubetrain_trainer.checkpoint import CheckpointManager

from .helpers import assert_same_tensors

VOCAB = 64
LORA = api.LoraSpec(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


def lora_setup(tmp_path: Path) -> tuple[PeftModel, torch.optim.Optimizer]:
    torch.manual_seed(0)  # the base is rebuilt from the same seed, as the trainer does
    base = models.build_model(
        api.ModelSpec(source="builtin://tiny-llama"),
        vocab_size=VOCAB,
        dropout=0.0,
        dtype="float32",
        cache_dir=tmp_path / "cache",
    )
    model = models.apply_lora(base, LORA)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trainable, lr=1e-2)


def lora_train(model: PeftModel, optimizer: torch.optim.Optimizer, steps: int) -> None:
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (2, 12))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def adapters(model: PeftModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_lora_checkpoint_holds_only_adapters_and_their_optimizer_state(tmp_path: Path) -> None:
    model, optimizer = lora_setup(tmp_path)
    torch.manual_seed(1)
    lora_train(model, optimizer, steps=2)
    info = CheckpointManager(tmp_path / "ckpt", keep_last=1).save(2, model, optimizer)

    keys = set(FileSystemReader(info.path).read_metadata().state_dict_metadata)
    model_keys = {k.removeprefix("model.") for k in keys if k.startswith("model.")}
    optim_keys = {k for k in keys if k.startswith("optim.state.")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert model_keys == trainable
    assert all("lora_" in k for k in model_keys)
    assert optim_keys
    assert all("lora_" in k for k in optim_keys)

    saved = sum(f.stat().st_size for f in Path(info.path).glob("*.distcp"))
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    # Adapters plus AdamW's two moments (fp32) and per-tensor framing: a small fraction of the
    # fp32 weights a full save writes (about 3 MB here).
    assert 3 * 4 * n_trainable < saved < 4 * n_all / 10


def test_lora_resume_reproduces_a_straight_run(tmp_path: Path) -> None:
    straight, straight_optimizer = lora_setup(tmp_path)
    torch.manual_seed(1)
    lora_train(straight, straight_optimizer, steps=2)
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=1)
    manager.save(2, straight, straight_optimizer)  # the RNG state too
    lora_train(straight, straight_optimizer, steps=3)

    resumed, resumed_optimizer = lora_setup(tmp_path)
    assert CheckpointManager(tmp_path / "ckpt", keep_last=1).resume(resumed, resumed_optimizer) == {
        "step": 2
    }
    lora_train(resumed, resumed_optimizer, steps=3)
    assert_same_tensors(adapters(resumed), adapters(straight))
    # The frozen base is untouched by loading: the same as the straight run's.
    assert_same_tensors(
        {n: p for n, p in resumed.named_parameters() if not p.requires_grad},
        {n: p for n, p in straight.named_parameters() if not p.requires_grad},
    )
