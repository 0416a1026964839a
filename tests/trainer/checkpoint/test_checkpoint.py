"""One process, no process group: round trip, exact continuation, RNG, retention, the
`latest` pointer and the resume policies."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from kubetrain_trainer.checkpoint import (
    COMMITTED,
    CheckpointManager,
    capture_rng_state,
    restore_rng_state,
    step_dirname,
)

from .helpers import assert_same_tensors, params, tiny_setup, train


def draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(3)


def assert_same_draws(a: tuple[float, float, torch.Tensor], b: tuple[float, float, torch.Tensor]):
    assert a[:2] == b[:2]
    assert torch.equal(a[2], b[2])


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    state = optimizer.state_dict()["state"]
    return {f"{i}/{k}": v for i, s in state.items() for k, v in s.items()}


@pytest.fixture
def trained() -> tuple:
    model, optimizer, scheduler = tiny_setup(seed=0)
    train(model, optimizer, scheduler, steps=3)
    return model, optimizer, scheduler


def test_round_trip_restores_model_optimizer_scheduler(tmp_path: Path, trained: tuple) -> None:
    model, optimizer, scheduler = trained
    manager = CheckpointManager(tmp_path, keep_last=2)
    info = manager.save(3, model, optimizer, scheduler, extra={"tokens_seen": 768, "epoch": 0})
    assert info.step == 3
    assert info.path == str(tmp_path / "step-000003")
    assert info.duration_s > 0

    fresh, fresh_optimizer, fresh_scheduler = tiny_setup(seed=1)
    assert not torch.equal(fresh[0].weight, model[0].weight)
    extra = manager.load(info, fresh, fresh_optimizer, fresh_scheduler)

    assert extra == {"tokens_seen": 768, "epoch": 0, "step": 3}
    assert_same_tensors(params(fresh), params(model))
    assert_same_tensors(optimizer_tensors(fresh_optimizer), optimizer_tensors(optimizer))
    assert fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert fresh_scheduler.state_dict() == scheduler.state_dict()


def test_resumed_training_matches_a_straight_run(tmp_path: Path) -> None:
    model, optimizer, scheduler = tiny_setup(seed=0)
    train(model, optimizer, scheduler, steps=3)
    CheckpointManager(tmp_path, keep_last=1).save(3, model, optimizer, scheduler)
    train(model, optimizer, scheduler, steps=4)  # the straight run goes on

    torch.manual_seed(1234)  # a restarted process starts from another RNG state
    resumed, resumed_optimizer, resumed_scheduler = tiny_setup(seed=1)
    extra = CheckpointManager(tmp_path, keep_last=1).resume(
        resumed, resumed_optimizer, resumed_scheduler
    )
    assert extra == {"step": 3}
    train(resumed, resumed_optimizer, resumed_scheduler, steps=4)
    assert_same_tensors(params(resumed), params(model))


def test_rng_states_round_trip() -> None:
    state = capture_rng_state()
    first = draws()
    restore_rng_state(state)
    assert_same_draws(draws(), first)


def test_load_restores_the_rng_states_of_the_save(tmp_path: Path, trained: tuple) -> None:
    model, optimizer, scheduler = trained
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(3, model, optimizer, scheduler)
    after_save = draws()
    draws()  # move on further
    manager.load(manager.latest(), model, optimizer, scheduler)
    assert_same_draws(draws(), after_save)


def test_keep_last_retention_and_pointer(tmp_path: Path, trained: tuple) -> None:
    model, optimizer, scheduler = trained
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in range(1, 6):
        manager.save(step, model, optimizer, scheduler)
        assert (tmp_path / "latest").read_text() == step_dirname(step)
        assert manager.latest().step == step

    assert [info.step for info in manager.list_committed()] == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000004", "step-000005"]
    marker = json.loads((tmp_path / "step-000005" / COMMITTED).read_text())
    assert marker["step"] == 5
    assert marker["world_size"] == 1
    # The manager of a restarted process sees the same state.
    assert CheckpointManager(tmp_path, keep_last=2).latest() == manager.latest()


def test_latest_trusts_only_a_verified_pointer(tmp_path: Path, trained: tuple) -> None:
    model, optimizer, scheduler = trained
    manager = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2):
        manager.save(step, model, optimizer, scheduler)

    pointer = tmp_path / "latest"
    pointer.write_text("step-000001")  # pointer first, even when a newer one is committed
    assert manager.latest().step == 1
    (tmp_path / "step-000007").mkdir()  # a crashed save: no marker, no .metadata
    pointer.write_text("step-000007")
    assert manager.latest().step == 2
    pointer.write_text("garbage")
    assert manager.latest().step == 2
    pointer.unlink()
    assert manager.latest().step == 2
    # A marker without DCP's .metadata is not a complete save either.
    (tmp_path / "step-000007" / COMMITTED).write_text(json.dumps({"step": 7}))
    assert manager.latest().step == 2
    assert [info.step for info in manager.list_committed()] == [1, 2]


def test_empty_root(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "missing", keep_last=1)
    assert manager.latest() is None
    assert manager.list_committed() == []


def test_next_save_removes_stale_uncommitted_folders(tmp_path: Path, trained: tuple) -> None:
    model, optimizer, scheduler = trained
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(1, model, optimizer, scheduler)
    for stale in ("step-000002", "step-000009"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "__0_0.distcp").write_bytes(b"partial")
    manager.save(2, model, optimizer, scheduler)  # rewrites the partial folder of its own step
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000001", "step-000002"]
    assert [info.step for info in manager.list_committed()] == [1, 2]


def test_a_committed_step_is_kept_not_rewritten(tmp_path: Path, trained: tuple) -> None:
    model, optimizer, scheduler = trained
    manager = CheckpointManager(tmp_path, keep_last=2)
    first = manager.save(3, model, optimizer, scheduler)
    saved = params(model)
    train(model, optimizer, scheduler, steps=1)
    assert manager.save(3, model, optimizer, scheduler) == first
    manager.load(first, model, optimizer, scheduler)
    assert_same_tensors(params(model), saved)


def test_resume_policies(tmp_path: Path, trained: tuple) -> None:
    model, optimizer, scheduler = trained
    manager = CheckpointManager(tmp_path, keep_last=3)
    snapshots = {}
    for step in (3, 4):
        manager.save(step, model, optimizer, scheduler, extra={"data_position": step * 16})
        snapshots[step] = params(model)
        train(model, optimizer, scheduler, steps=1)

    def resume(policy: str) -> tuple[dict | None, dict[str, torch.Tensor]]:
        fresh, fresh_optimizer, fresh_scheduler = tiny_setup(seed=1)
        extra = manager.resume(fresh, fresh_optimizer, fresh_scheduler, policy=policy)
        return extra, params(fresh)

    extra, loaded = resume("auto")
    assert extra == {"data_position": 64, "step": 4}
    assert_same_tensors(loaded, snapshots[4])

    extra, loaded = resume("never")
    assert extra is None
    assert_same_tensors(loaded, params(tiny_setup(seed=1)[0]))

    extra, loaded = resume("step-3")
    assert extra["step"] == 3
    assert_same_tensors(loaded, snapshots[3])

    for location in (f"file://{tmp_path}/step-000003", str(tmp_path / "step-000003")):
        extra, loaded = resume(location)
        assert extra["step"] == 3
        assert_same_tensors(loaded, snapshots[3])

    with pytest.raises(FileNotFoundError, match=r"committed steps: \[3, 4\]"):
        resume("step-5")
    (tmp_path / "step-000005").mkdir()
    with pytest.raises(FileNotFoundError, match="committed steps"):
        resume("step-5")
    with pytest.raises(FileNotFoundError, match="never loaded"):
        resume(f"file://{tmp_path}/step-000005")
    with pytest.raises(FileNotFoundError, match="not a committed checkpoint"):
        resume(f"file://{tmp_path}/nowhere")


def test_resume_auto_on_an_empty_root_starts_fresh(tmp_path: Path) -> None:
    model, optimizer, scheduler = tiny_setup(seed=0)
    before = params(model)
    assert CheckpointManager(tmp_path, keep_last=1).resume(model, optimizer, scheduler) is None
    assert_same_tensors(params(model), before)


def test_object_store_path(trained: tuple) -> None:
    """fsspec's in-memory filesystem runs the code path of `s3://`/`gs://` roots: PUTs instead
    of renames, and DCP's FsspecWriter/FsspecReader."""
    model, optimizer, scheduler = trained
    root = f"memory://kubetrain-test-{uuid.uuid4().hex}/ckpt"
    manager = CheckpointManager(root, keep_last=1)
    for step in (1, 2):
        info = manager.save(step, model, optimizer, scheduler, extra={"tokens_seen": step})
    assert info.path == f"{root.replace('memory://', 'memory:///')}/step-000002"
    assert manager.list_committed() == [info]
    assert manager.latest() == info
    assert manager.fs.cat_file(f"{manager.root}/latest") == b"step-000002"

    fresh, fresh_optimizer, fresh_scheduler = tiny_setup(seed=1)
    assert manager.resume(fresh, fresh_optimizer, fresh_scheduler) == {"tokens_seen": 2, "step": 2}
    assert_same_tensors(params(fresh), params(model))
    manager.fs.rm(manager.root, recursive=True)


def test_scheduler_state_must_exist_to_be_loaded(tmp_path: Path, trained: tuple) -> None:
    model, optimizer, scheduler = trained
    manager = CheckpointManager(tmp_path, keep_last=1)
    info = manager.save(3, model, optimizer)
    with pytest.raises(ValueError, match="no scheduler state"):
        manager.load(info, model, optimizer, scheduler)


def test_constructor_checks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="needs an initialized process group"):
        CheckpointManager(tmp_path, keep_last=1, rank=1, world_size=2)


def test_resuming_an_older_step_starts_a_timeline_that_supersedes_the_old_one(
    tmp_path: Path,
) -> None:
    # First run: steps 1-40, checkpoints at 20 and 40.
    model, optimizer, scheduler = tiny_setup(seed=0)
    manager = CheckpointManager(tmp_path, keep_last=5)
    train(model, optimizer, scheduler, steps=20)
    manager.save(20, model, optimizer, scheduler)
    train(model, optimizer, scheduler, steps=20)
    old_40 = manager.save(40, model, optimizer, scheduler)
    old_weights = params(model)

    # Second run: `resume: step-20`, then other data (another RNG stream) up to 40 again.
    model, optimizer, scheduler = tiny_setup(seed=1)
    branch = CheckpointManager(tmp_path, keep_last=5)
    assert branch.resume(model, optimizer, scheduler, policy="step-20") == {"step": 20}
    assert branch.loaded is not None
    assert branch.loaded.step == 20
    torch.manual_seed(99)
    train(model, optimizer, scheduler, steps=20)
    new_40 = branch.save(40, model, optimizer, scheduler)
    new_weights = params(model)
    assert not torch.equal(new_weights["0.weight"], old_weights["0.weight"])

    # `latest` names the new step 40, whose tensors are the new run's.
    latest = CheckpointManager(tmp_path, keep_last=5).latest()
    assert latest == new_40
    assert latest.path != old_40.path
    assert (latest.timeline, latest.branch) == (1, 20)
    assert (tmp_path / "latest").read_text() == Path(new_40.path).name == "step-000040-t1"
    # The abandoned step 40 is gone; step 20 (shared history) stays.
    assert not Path(old_40.path).exists()
    assert [(i.step, Path(i.path).name) for i in branch.list_committed()] == [
        (20, "step-000020"),
        (40, "step-000040-t1"),
    ]

    # `auto` resumes the new timeline, and `step-40` now means its step 40.
    for policy in ("auto", "step-40"):
        fresh, fresh_optimizer, fresh_scheduler = tiny_setup(seed=2)
        resumer = CheckpointManager(tmp_path, keep_last=5)
        assert resumer.resume(fresh, fresh_optimizer, fresh_scheduler, policy=policy) == {
            "step": 40
        }
        assert_same_tensors(params(fresh), new_weights)
        assert resumer.timeline == 1  # continuing, not branching again

    # Going on from there stays on timeline 1 and keeps retention by step.
    train(fresh, fresh_optimizer, fresh_scheduler, steps=1)
    assert Path(resumer.save(41, fresh, fresh_optimizer, fresh_scheduler).path).name == (
        "step-000041-t1"
    )


def test_a_fresh_start_over_old_checkpoints_replaces_them(tmp_path: Path, trained: tuple) -> None:
    model, optimizer, scheduler = trained
    CheckpointManager(tmp_path, keep_last=3).save(3, model, optimizer, scheduler)

    fresh, fresh_optimizer, fresh_scheduler = tiny_setup(seed=5)
    manager = CheckpointManager(tmp_path, keep_last=3)
    assert manager.resume(fresh, fresh_optimizer, fresh_scheduler, policy="never") is None
    info = manager.save(3, fresh, fresh_optimizer, fresh_scheduler)
    assert Path(info.path).name == "step-000003-t1"
    assert manager.list_committed() == [info]

    check, check_optimizer, check_scheduler = tiny_setup(seed=6)
    CheckpointManager(tmp_path, keep_last=3).resume(check, check_optimizer, check_scheduler)
    assert_same_tensors(params(check), params(fresh))


def test_a_new_run_continues_another_only_from_the_path_it_names(
    tmp_path: Path, trained: tuple
) -> None:
    """Run folders are keyed by uid (contract.run_folder): a re-created run has an empty
    folder of its own, so `resume: auto` starts fresh; `resume: file://<earlier
    run's folder>/checkpoints/step-N` continues from the earlier run, whose folder the new
    run's saves never touch."""
    model, optimizer, scheduler = trained
    earlier_root = tmp_path / "sft-llama-0b6a0e1c" / "checkpoints"
    earlier = CheckpointManager(earlier_root, keep_last=3).save(3, model, optimizer, scheduler)
    before = sorted(p.relative_to(earlier_root) for p in earlier_root.rglob("*"))
    root = tmp_path / "sft-llama-7c1f2e3d" / "checkpoints"

    fresh, fresh_optimizer, fresh_scheduler = tiny_setup(seed=1)
    manager = CheckpointManager(root, keep_last=3)
    assert manager.resume(fresh, fresh_optimizer, fresh_scheduler, policy="auto") is None

    named = f"file://{earlier.path}"
    assert manager.resume(fresh, fresh_optimizer, fresh_scheduler, policy=named)["step"] == 3
    assert_same_tensors(params(fresh), params(model))
    train(fresh, fresh_optimizer, fresh_scheduler, steps=1)
    info = manager.save(4, fresh, fresh_optimizer, fresh_scheduler)
    assert Path(info.path).parent == root
    assert sorted(p.relative_to(earlier_root) for p in earlier_root.rglob("*")) == before
