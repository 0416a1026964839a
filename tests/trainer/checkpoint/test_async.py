"""Asynchronous saves (`save_async`): the commit protocol is intact (data, then the marker,
then `latest`, only once the background write has ended), what was saved is the state of
the save step although training went on, and a failed write leaves the previous checkpoint
the latest and raises on every rank instead of hanging."""

from __future__ import annotations

import resource
import signal
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kubetrain_trainer.checkpoint import (
    COMMITTED,
    DCP_METADATA,
    CheckpointManager,
    CheckpointSaveError,
    capture_rng_state,
)

from .helpers import assert_same_tensors, params, tiny_setup, train


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    state = optimizer.state_dict()["state"]
    return {f"{i}/{k}": v.clone() for i, s in state.items() for k, v in s.items()}


def test_async_save_commits_in_order_and_equals_a_sync_save(tmp_path: Path) -> None:
    model, optimizer, scheduler = tiny_setup(seed=0)
    train(model, optimizer, scheduler, steps=3)
    sync = CheckpointManager(tmp_path / "sync", keep_last=1)
    background = CheckpointManager(tmp_path / "async", keep_last=1)
    rng = capture_rng_state()  # what both saves record
    sync.save(3, model, optimizer, scheduler, extra={"tokens_seen": 48})
    torch.set_rng_state(rng["torch"])

    assert background.save_async(3, model, optimizer, scheduler, extra={"tokens_seen": 48}) is None
    folder = tmp_path / "async" / "step-000003"
    # Training goes on in place while the staged copy is written; nothing is committed yet,
    # whether or not the write has ended: only poll/wait/close commit.
    train(model, optimizer, scheduler, steps=2)
    assert not (folder / COMMITTED).exists()
    assert background.latest() is None
    info = background.wait()
    assert info is not None
    assert info.step == 3
    marker, pointer = folder / COMMITTED, tmp_path / "async" / "latest"
    assert pointer.read_text() == "step-000003"
    meta_ns, marker_ns = (folder / DCP_METADATA).stat().st_mtime_ns, marker.stat().st_mtime_ns
    assert meta_ns <= marker_ns <= pointer.stat().st_mtime_ns
    assert background.wait() is None  # nothing in flight any more

    # Both checkpoints hold the state of step 3, not the state training went on to.
    loaded = []
    for manager in (sync, background):
        fresh, fresh_optimizer, fresh_scheduler = tiny_setup(seed=1)
        extra = manager.load(manager.latest(), fresh, fresh_optimizer, fresh_scheduler)
        loaded.append((extra, params(fresh), optimizer_tensors(fresh_optimizer)))
        loaded[-1] += (fresh_scheduler.state_dict(), torch.get_rng_state())
    (sync_extra, sync_params, sync_optim, sync_sched, sync_rng), rest = loaded[0], loaded[1]
    assert rest[0] == sync_extra == {"tokens_seen": 48, "step": 3}
    assert_same_tensors(rest[1], sync_params)
    assert_same_tensors(rest[2], sync_optim)
    assert rest[3] == sync_sched
    assert torch.equal(rest[4], sync_rng)
    assert not torch.equal(sync_params["0.weight"], params(model)["0.weight"])

    # At most one in flight: the next save commits step 5 first; retention then applies.
    background.save_async(5, model, optimizer, scheduler)
    background.save_async(7, model, optimizer, scheduler)
    assert background.latest().step == 5
    assert background.wait().step == 7
    assert [i.step for i in background.list_committed()] == [7]


WORLD = 2


@contextmanager
def file_size_limit(max_bytes: int) -> Iterator[None]:
    """Writes past `max_bytes` fail with EFBIG in this process (SIGXFSZ ignored)."""
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)


def failing_worker(rank: int, init_file: str, root: str) -> None:
    """FSDP2 over two processes; rank 1's second write meets a real file-size limit."""
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model(torch.randn(4, 256)).sum().backward()
        optimizer.step()
        manager = CheckpointManager(root, keep_last=2, rank=rank, world_size=WORLD)
        manager.save_async(1, model, optimizer)
        assert manager.wait().step == 1

        # A full disk, as far as rank 1 is concerned: writes past 64 KiB fail with EFBIG
        # (its shard is about 400 KiB; its extras are far smaller).
        failure = r"step 2 .* failed \(rank 1: .*\); .* still .*step-000001"
        with file_size_limit(64 * 1024) if rank == 1 else nullcontext():
            manager.save_async(2, model, optimizer)
            with pytest.raises(CheckpointSaveError, match=failure):
                manager.wait()
        latest = manager.latest()
        assert latest is not None
        assert latest.step == 1
    finally:
        dist.destroy_process_group()


@pytest.mark.trainer
def test_a_failed_async_write_keeps_the_previous_checkpoint_and_raises(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    context = mp.start_processes(
        failing_worker,
        args=(str(tmp_path / "store"), str(root)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    # Both ranks come back (an error on one is an error on all, not a hang).
    for _ in range(120):
        if context.join(timeout=1):
            break
    else:
        for process in context.processes:
            process.kill()
        pytest.fail("a rank hung after the failed asynchronous write")
    assert (root / "latest").read_text() == "step-000001"
    assert not (root / "step-000002" / COMMITTED).exists()
    assert CheckpointManager(root, keep_last=2).latest().step == 1


def test_close_commits_a_finished_write_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """On the way out (an error elsewhere, a stop) a save in flight is committed if its write
    ends; a failed one is logged, not raised over the error that ended the run."""
    model, optimizer, scheduler = tiny_setup(seed=0)
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save_async(1, model, optimizer, scheduler)
    manager.close()
    assert manager.latest().step == 1
    manager.close()  # nothing in flight: nothing to do

    # A write that fails for real: a file-size limit (EFBIG, as a full disk) in this process.
    big = nn.Linear(256, 256)  # a shard of about 790 KiB; the extras stay far below 64 KiB
    big_optimizer = torch.optim.AdamW(big.parameters())
    big(torch.randn(2, 256)).sum().backward()
    big_optimizer.step()
    with file_size_limit(64 * 1024):
        manager.save_async(2, big, big_optimizer)
        manager.close()
    assert "step 2 left uncommitted: rank 0: RuntimeError" in caplog.text
    assert manager.latest().step == 1
    assert not (tmp_path / "step-000002" / COMMITTED).exists()
