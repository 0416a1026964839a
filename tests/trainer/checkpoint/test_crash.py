"""Crash safety: a process SIGKILLed at chosen points of a save (storage-writer hooks, a real
kill) leaves a loadable checkpoint; the partial folder is never loaded and the next save
removes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kubetrain_trainer.checkpoint import COMMITTED, DCP_METADATA, CheckpointManager

from .helpers import assert_same_tensors, params, tiny_setup, train

REPO = Path(__file__).resolve().parents[3]

# The child trains on from step 1 and saves step 2; a hook SIGKILLs it at `point`.
CHILD = r"""
import os, shutil, signal, sys
import torch
from torch.distributed.checkpoint import FileSystemWriter
from kubetrain_trainer.checkpoint import CheckpointManager
from tests.trainer.checkpoint.helpers import tiny_setup, train

root, point, expected = sys.argv[1:]

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if point == "before-data":
    FileSystemWriter.write_data = die
elif point == "before-metadata":
    FileSystemWriter.finish = die
elif point in ("before-commit", "async-before-commit"):
    finish = FileSystemWriter.finish
    def finish_then_die(self, *args, **kwargs):
        finish(self, *args, **kwargs)
        die()
    FileSystemWriter.finish = finish_then_die
elif point == "before-pointer":
    replace = os.replace
    def replace_or_die(src, dst, *args, **kwargs):
        if os.path.basename(dst) == "latest":
            die()
        replace(src, dst, *args, **kwargs)
    os.replace = replace_or_die
elif point == "during-retention":
    shutil.rmtree = die
else:
    raise ValueError(point)

manager = CheckpointManager(root, keep_last=1)
model, optimizer, scheduler = tiny_setup(seed=0)
manager.resume(model, optimizer, scheduler)
train(model, optimizer, scheduler, steps=1)
torch.save({n: p.detach() for n, p in model.named_parameters()}, expected)
if point.startswith("async"):
    # The write runs in DCP's thread while training goes on; the kill comes from there.
    manager.save_async(2, model, optimizer, scheduler)
    train(model, optimizer, scheduler, steps=1)
    manager.wait()
else:
    manager.save(2, model, optimizer, scheduler)
sys.exit("the kill hook did not fire")
"""

# What must be on disk after the kill, proving the kill happened where it was meant to.
LEFT_BEHIND = {
    "before-data": {"extra-rank0.pt"},
    "before-metadata": {"extra-rank0.pt", "__0_0.distcp"},
    "before-commit": {"extra-rank0.pt", "__0_0.distcp", DCP_METADATA},
    # An asynchronous save killed after its write, before the commit that waits for it.
    "async-before-commit": {"extra-rank0.pt", "__0_0.distcp", DCP_METADATA},
    "before-pointer": {"extra-rank0.pt", "__0_0.distcp", DCP_METADATA, COMMITTED},
    "during-retention": {"extra-rank0.pt", "__0_0.distcp", DCP_METADATA, COMMITTED},
}
# Where the kill leaves `latest()`: the pointer moves only after the commit.
LATEST_AFTER = {point: 1 for point in LEFT_BEHIND} | {"during-retention": 2}


def resume_fresh(root: Path) -> tuple[dict | None, dict[str, torch.Tensor]]:
    model, optimizer, scheduler = tiny_setup(seed=1)
    extra = CheckpointManager(root, keep_last=1).resume(model, optimizer, scheduler)
    return extra, params(model)


@pytest.mark.parametrize("point", list(LEFT_BEHIND))
def test_kill_during_save_leaves_a_complete_checkpoint(tmp_path: Path, point: str) -> None:
    root = tmp_path / "ckpt"
    model, optimizer, scheduler = tiny_setup(seed=0)
    train(model, optimizer, scheduler, steps=1)
    CheckpointManager(root, keep_last=1).save(1, model, optimizer, scheduler)
    step1 = params(model)

    expected = tmp_path / "child-params.pt"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), point, str(expected)],
        cwd=REPO,
        # The checkout first, then whatever the caller had (a worktree's own packages).
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    step2 = torch.load(expected, weights_only=True)
    folder = root / "step-000002"
    assert {p.name for p in folder.iterdir()} == LEFT_BEHIND[point]

    # A restarted process resumes from a complete checkpoint, with its exact parameters.
    manager = CheckpointManager(root, keep_last=1)
    latest = manager.latest()
    assert latest.step == LATEST_AFTER[point]
    extra, loaded = resume_fresh(root)
    assert extra["step"] == latest.step
    assert_same_tensors(loaded, step1 if latest.step == 1 else step2)
    if point in ("before-data", "before-metadata", "before-commit", "async-before-commit"):
        with pytest.raises(FileNotFoundError, match="never loaded"):
            manager.load(folder, *tiny_setup(seed=1)[:2])
        assert [info.step for info in manager.list_committed()] == [1]
    if point == "before-pointer":
        assert [info.step for info in manager.list_committed()] == [1, 2]
    if point == "during-retention":
        # The marker went first: what is left of step 1 is no longer a committed checkpoint.
        assert not (root / "step-000001" / COMMITTED).exists()
        assert [info.step for info in manager.list_committed()] == [2]

    # The retry: resume, train one step, save. It commits, its step is the latest, and the
    # crashed save's folders are gone (keep_last=1). After "before-pointer" it re-saves the
    # step committed by the killed process, which is kept: training is deterministic.
    model, optimizer, scheduler = tiny_setup(seed=1)
    step = manager.resume(model, optimizer, scheduler)["step"]
    train(model, optimizer, scheduler, steps=1)
    manager.save(step + 1, model, optimizer, scheduler)
    assert sorted(p.name for p in root.iterdir()) == ["latest", f"step-{step + 1:06d}"]
    assert manager.latest().step == step + 1
    extra, loaded = resume_fresh(root)
    assert extra["step"] == step + 1
    assert_same_tensors(loaded, params(model))
