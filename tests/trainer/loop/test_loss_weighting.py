"""The training loss is the mean over every trained token of the global batch, whatever
its split into processes and accumulation steps (it once averaged per-micro-batch means,
so 3 answer tokens weighed as much as 45)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from kubetrain_trainer.loop import accumulate_gradients

from . import grad_worker

pytestmark = pytest.mark.trainer


def _reference(rows: list[int]) -> tuple[dict[str, torch.Tensor], float, int]:
    """One forward over the whole global batch: the mean loss over its trained tokens."""
    model = grad_worker.tiny_model()
    split = grad_worker.data()
    labels = split["labels"][rows]
    loss = model(input_ids=split["input_ids"][rows], labels=labels, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return grads, float(loss.detach()), int((labels[:, 1:] != -100).sum())


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_gradients_match_one_batch_at_any_split(world_size: int, tmp_path: Path) -> None:
    # 1 process x 4 micro-batches, 2 x 2, 4 x 1: the same 8 rows, the same gradients.
    if world_size == 1:  # in this process: a spawned one re-imports torch and transformers
        grad_worker.run(0, 1, str(tmp_path))
    else:
        mp.spawn(grad_worker.run, args=(world_size, str(tmp_path)), nprocs=world_size)
    result = torch.load(tmp_path / "result.pt")
    rows = grad_worker.global_rows(world_size, str(tmp_path))
    assert len(rows) == grad_worker.GLOBAL_BATCH
    grads, loss, count = _reference(rows)
    assert result["count"] == count
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_all_masked_micro_batch_is_finite_and_adds_no_gradient() -> None:
    split = grad_worker.data()
    trained = {k: v[[1, 3]] for k, v in split.items()}
    masked = {k: v[[4, 5]] for k, v in split.items()}  # answers of length 0: all -100
    assert (masked["labels"] == -100).all()

    def grads(micro_batches):
        model = grad_worker.tiny_model()
        loss, count = accumulate_gradients(model, micro_batches, torch.device("cpu"))
        return loss, count, {n: p.grad for n, p in model.named_parameters()}

    loss, count, with_masked = grads([trained, masked])
    ref_loss, ref_count, alone = grads([trained])
    assert count == ref_count
    assert loss == pytest.approx(ref_loss)
    for name, grad in alone.items():
        torch.testing.assert_close(with_masked[name], grad, msg=name)

    only_loss, only_count, only = grads([masked])
    assert only_count == 0
    assert only_loss == 0.0
    assert all(torch.isfinite(g).all() and not g.any() for g in only.values())
