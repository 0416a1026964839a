"""Checkpoints on a real S3 server (SeaweedFS, tests/support/s3.py): DCP's FsspecWriter and
FsspecReader over s3fs, the commit order (DCP data, `.metadata`, `COMMITTED`, `latest`)
observed by killing a process between the steps, and retention and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kubetrain_trainer.checkpoint import COMMITTED, DCP_METADATA, POINTER, CheckpointManager
from tests.support.s3 import S3Server

from .helpers import assert_same_tensors, params, tiny_setup, train

REPO = Path(__file__).resolve().parents[3]

# Trains on from step 1, saves step 2, and SIGKILLs itself at `point` of the save.
CHILD = r"""
import os, signal, sys
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
from kubetrain_trainer import checkpoint
from tests.trainer.checkpoint.helpers import tiny_setup, train

root, point = sys.argv[1:]

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if point == "before-commit":  # DCP data and .metadata written, marker not yet
    finish = FsspecWriter.finish
    def finish_then_die(self, *args, **kwargs):
        finish(self, *args, **kwargs)
        die()
    FsspecWriter.finish = finish_then_die
elif point == "before-pointer":  # marker written, `latest` not yet moved
    put = checkpoint._put
    def put_or_die(fs, path, data):
        if path.endswith("/latest"):
            die()
        put(fs, path, data)
    checkpoint._put = put_or_die
else:
    raise ValueError(point)

manager = checkpoint.CheckpointManager(root, keep_last=1)
model, optimizer, scheduler = tiny_setup(seed=0)
manager.resume(model, optimizer, scheduler)
train(model, optimizer, scheduler, steps=1)
manager.save(2, model, optimizer, scheduler)
sys.exit("the kill hook did not fire")
"""


def _names(fs, folder: str) -> set[str]:
    fs.invalidate_cache()
    return {p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)}


def _files(fs, root: str) -> set[str]:
    """Objects under `root`, relative. SeaweedFS keeps an emptied folder as a zero-size
    `folder/` entry (AWS S3 has none); an empty folder holds no checkpoint, so it is left out."""
    fs.invalidate_cache()
    found = fs.find(root, detail=True)
    return {path[len(root) + 1 :] for path, info in found.items() if info["size"] > 0}


@pytest.mark.parametrize("point", ["before-commit", "before-pointer"])
def test_commit_order_on_s3_a_killed_save_leaves_the_previous_checkpoint(
    s3: S3Server, s3_bucket: str, point: str
) -> None:
    root = f"s3://{s3_bucket}/run/checkpoints"
    with s3.environ():
        model, optimizer, scheduler = tiny_setup(seed=0)
        train(model, optimizer, scheduler, steps=1)
        CheckpointManager(root, keep_last=1).save(1, model, optimizer, scheduler)
        step1 = params(model)

        child = subprocess.run(
            [sys.executable, "-c", CHILD, root, point],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert child.returncode == -signal.SIGKILL, child.stderr

        fs = s3.filesystem()
        left = _names(fs, f"{s3_bucket}/run/checkpoints/step-000002")
        # The kill point shows the order: data and .metadata before the marker, the
        # marker before the pointer, which still names step 1.
        assert {DCP_METADATA, "extra-rank0.pt"} <= left
        assert (COMMITTED in left) == (point == "before-pointer")
        assert fs.cat_file(f"{s3_bucket}/run/checkpoints/{POINTER}") == b"step-000001"

        # A restarted process resumes from the checkpoint the pointer names: step 1.
        manager = CheckpointManager(root, keep_last=1)
        fresh = tiny_setup(seed=1)
        assert manager.resume(*fresh)["step"] == 1
        assert_same_tensors(params(fresh[0]), step1)
        if point == "before-commit":
            # The uncommitted step is never loaded.
            assert [info.step for info in manager.list_committed()] == [1]
            with pytest.raises(FileNotFoundError, match="never loaded"):
                manager.load(f"{root}/step-000002", *tiny_setup(seed=1)[:2])
        else:
            assert [info.step for info in manager.list_committed()] == [1, 2]

        # The retry saves on; the crashed save's leftovers go (keep_last=1).
        model, optimizer, scheduler = tiny_setup(seed=1)
        step = manager.resume(model, optimizer, scheduler)["step"]
        train(model, optimizer, scheduler, steps=1)
        manager.save(step + 1, model, optimizer, scheduler)
        kept = {name.split("/")[0] for name in _files(fs, f"{s3_bucket}/run/checkpoints")}
        assert kept == {POINTER, f"step-{step + 1:06d}"}
        again = tiny_setup(seed=2)
        assert CheckpointManager(root, keep_last=1).resume(*again)["step"] == step + 1
        assert_same_tensors(params(again[0]), params(model))


def test_an_async_save_on_s3_commits_after_its_write_and_loads_the_saved_step(
    s3: S3Server, s3_bucket: str
) -> None:
    """checkpoint.asyncSave over FsspecWriter: nothing is committed until the write ends;
    then the marker and the pointer; the checkpoint holds the state of its step, not the
    state training moved on to."""
    root = f"s3://{s3_bucket}/run/checkpoints"
    with s3.environ():
        model, optimizer, scheduler = tiny_setup(seed=0)
        train(model, optimizer, scheduler, steps=2)
        saved = params(model)
        manager = CheckpointManager(root, keep_last=1)
        assert manager.save_async(2, model, optimizer, scheduler) is None
        train(model, optimizer, scheduler, steps=1)  # on, while the write runs
        fs = s3.filesystem()
        assert not fs.exists(f"{s3_bucket}/run/checkpoints/{POINTER}")
        info = manager.wait()
        assert info is not None
        assert info.step == 2
        assert COMMITTED in _names(fs, f"{s3_bucket}/run/checkpoints/step-000002")
        assert fs.cat_file(f"{s3_bucket}/run/checkpoints/{POINTER}") == b"step-000002"
        fresh = tiny_setup(seed=1)
        assert CheckpointManager(root, keep_last=1).resume(*fresh)["step"] == 2
        assert_same_tensors(params(fresh[0]), saved)
