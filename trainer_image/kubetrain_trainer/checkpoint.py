"""Distributed checkpoints with torch.distributed.checkpoint (DCP), committed atomically.

A committed checkpoint is never partial (RELIABILITY.md items 2 and 3). Layout under the root:

    latest                 "step-000200": the newest committed folder, replaced atomically
    step-000200/
        extra-rank0.pt ... per rank: step, scheduler, RNG states, the caller's extra state
        __0_0.distcp ...   DCP data, each rank writing its own shards
        .metadata          written last by DCP: the DCP save is complete
        COMMITTED          {"step", "time", "world_size", "duration_s", "timeline",
                           "branch"}, by rank 0, last
    step-000200-t1/        the same step on timeline 1 (see Timelines)

Order of a save: per-rank extras, DCP data, `.metadata`, barrier, `COMMITTED`, `latest`,
then retention (rank 0). A crash at any moment leaves the previous committed folder loadable;
loading reads only folders with a `COMMITTED` marker and a `.metadata` file.

Asynchronous saves (`save_async`, `spec.checkpoint.asyncSave`). The extras are written and
the model and optimizer state copied to host memory at the save step (DCP's stager); DCP then
writes the copy from a background thread over a process group of its own (gloo), so its
collectives never interleave with training's, while training goes on. The commit is the same
as a synchronous save's, done by `poll` (each step), `wait` (before the next save, at the
end) or `close` (on the way out) once the write has finished: rank 0's DCP future completes
only after every rank's data and `.metadata` are written, so rank 0 commits alone, with no
collective. At most one save is in flight; a crash before the commit leaves the previous
checkpoint the latest, and a failed write raises `CheckpointSaveError` from the next `poll`.
The cost is host memory for the staged copy (this rank's share of the trainable parameters
and optimizer state) until the write ends.

Elastic resume. A checkpoint saved by N processes loads into M: DCP reshards the model and
optimizer state; the scheduler and the caller's extra state come from rank 0's extras (the
trainer keeps only global values there: step, tokens seen); RNG states are restored only at
the same world size, a rank of another world having no counterpart. The trainer re-derives
its RNG from (seed, step, rank) at every step anyway, so both paths draw the same.

Timelines. Resuming from a checkpoint other than the one `latest` names (`resume: step-N` of
an older step, a path, or `never` over existing checkpoints) starts a new timeline: its saves
must replace the abandoned timeline's checkpoints of the same steps. Folders are never
rewritten in place (a half-written step would be observable, and object stores cannot rename
a folder atomically); instead each timeline writes its own folders, `step-N` for the first
(timeline 0) and `step-N-tK` for timeline K, a number one higher than any in the root. So
a new step folder is always a fresh name, the usual commit protocol applies unchanged, and
`latest` moves to it. Retention then removes the superseded folders: those of other
timelines past the step where this one branched off. The marker records `timeline` and
`branch` (that step); a marker without them (older saves) is timeline 0 branched at 0.
Until a new timeline's first save commits, `latest` still names the old one.

Only trainable parameters are saved (DCP's `ignore_frozen_params`): a LoRA run's
checkpoint holds the adapters and their optimizer state, not the frozen base, which a resumed
run rebuilds exactly as the first did (the same base weights, or the same seeded init). A full
fine-tune freezes nothing, so its checkpoint holds every parameter.

Roots are local folders (a PVC, a laptop folder) or fsspec URLs (`s3://`, `gs://`, ...), for
which DCP picks its FsspecWriter/FsspecReader. Locally the marker and the pointer are written
to a temporary file, fsynced and moved with `os.replace`. On object stores there is no rename:
they are written with a single PUT, which object stores apply atomically (a reader sees the
old object or the new one, never part of one). That path is tested against a real S3 server
(SeaweedFS, tests/trainer/checkpoint/test_s3.py): a process killed after the DCP data and
before the marker, or after the marker and before the pointer, leaves the previous checkpoint
loadable, and the next save removes the leftovers.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import random
import re
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.optim.lr_scheduler import LRScheduler

log = logging.getLogger(__name__)

COMMITTED = "COMMITTED"
POINTER = "latest"
DCP_METADATA = ".metadata"
# Frozen parameters (a LoRA base) stay out of checkpoints; loading leaves them as built.
_TRAINABLE_ONLY = StateDictOptions(ignore_frozen_params=True, strict=False)
_STEP_DIR = re.compile(r"step-(\d+)(?:-t(\d+))?")


def step_dirname(step: int, timeline: int = 0) -> str:
    """Folder name of a step on a timeline; zero-padded so that folders sort by step."""
    return f"step-{step:06d}" if timeline == 0 else f"step-{step:06d}-t{timeline}"


class CheckpointSaveError(RuntimeError):
    """An asynchronous save failed; the previous committed checkpoint is still the latest."""


@dataclass
class _InFlight:
    """An asynchronous save whose DCP write has not been committed yet."""

    step: int
    folder: str
    future: Future[Any]
    start: float


@dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint. `path` is a local path or, for object stores, a URL."""

    step: int
    path: str
    time: float
    """Unix time of the commit."""
    duration_s: float
    """Seconds from the start of the save to the commit."""
    timeline: int = 0
    """The timeline the step belongs to (see the module docstring)."""
    branch: int = 0
    """The step this timeline branched off from."""


# ---------------------------------------------------------------------------------------
# RNG states


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, current CUDA device), in a form
    `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            **np_state,
            "state": {
                "key": np_state["state"]["key"].tolist(),
                "pos": np_state["state"]["pos"],
            },
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore states taken by `capture_rng_state`; the next random numbers repeat."""
    random.setstate(state["python"])
    np_state = state["numpy"]
    key = np.asarray(np_state["state"]["key"], dtype=np.uint32)
    np.random.set_state({**np_state, "state": {**np_state["state"], "key": key}})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------
# Storage: one fsspec filesystem for local folders and object stores alike


def _put(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a whole file so that readers see the old content or the new, never a mix."""
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)  # one PUT: atomic on object stores
        return
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    # The rename itself is durable only once the folder entry is flushed.
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_commit(fs: AbstractFileSystem, folder: str) -> dict[str, Any] | None:
    """The commit marker of a folder, or None when it is not a complete, committed save."""
    try:
        marker = json.loads(fs.cat_file(posixpath.join(folder, COMMITTED)))
    except (FileNotFoundError, ValueError):
        return None
    if not fs.exists(posixpath.join(folder, DCP_METADATA)):
        return None
    return marker


def _checkpoint_id(fs: AbstractFileSystem, folder: str) -> Path | str:
    # DCP picks FileSystemWriter/Reader for a Path and FsspecWriter/Reader for a URL.
    return Path(folder) if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(folder)


def _url(fs: AbstractFileSystem, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _info(fs: AbstractFileSystem, folder: str, marker: dict[str, Any]) -> CheckpointInfo:
    return CheckpointInfo(
        step=int(marker["step"]),
        path=_url(fs, folder),
        time=float(marker["time"]),
        duration_s=float(marker["duration_s"]),
        timeline=int(marker.get("timeline", 0)),
        branch=int(marker.get("branch", 0)),
    )


def _same(a: str, b: str) -> bool:
    """Whether two checkpoint locations (paths or URLs) name the same folder."""
    return posixpath.normpath(url_to_fs(a)[1]) == posixpath.normpath(url_to_fs(b)[1])


def _describe(error: BaseException) -> str:
    """One line per failed rank, without DCP's tracebacks."""
    if isinstance(error, CheckpointException):
        return "; ".join(
            f"rank {rank}: {_describe(exc)}" for rank, (exc, _) in sorted(error.failures.items())
        )
    first = str(error).strip().splitlines()
    return f"{type(error).__name__}: {first[0] if first else ''}"


def _extra_name(rank: int) -> str:
    return f"extra-rank{rank}.pt"


@contextmanager
def _dcp_context() -> Iterator[bool]:
    """Yields DCP's `no_dist`; without a process group DCP saves and loads in this process
    alone, and its warning about that is noise for a one-process run."""
    no_dist = not dist.is_initialized()
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield no_dist


# ---------------------------------------------------------------------------------------


class CheckpointManager:
    """Saves, finds, prunes and loads the step checkpoints of one run under `root`.

    Every rank calls `save`, `load` and `resume` (they hold collectives when a process group
    is initialized); rank 0 alone commits, moves the pointer and deletes old folders.
    """

    def __init__(
        self, root: Path | str, keep_last: int, *, rank: int = 0, world_size: int = 1
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        if dist.is_initialized():
            actual = (dist.get_rank(), dist.get_world_size())
            if actual != (rank, world_size):
                raise ValueError(
                    f"rank/world_size {(rank, world_size)} differ from the process group's {actual}"
                )
        elif world_size != 1:
            raise ValueError(f"world_size {world_size} needs an initialized process group")
        self.fs, self.root = url_to_fs(str(root))
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        # The timeline saves go to; None until a load or the first save settles it
        # (continuing the one `latest` names).
        self.timeline: int | None = None
        self.branch = 0
        self.loaded: CheckpointInfo | None = None
        """The checkpoint the last `load` restored."""
        self._in_flight: _InFlight | None = None
        self._group: Any = None  # the asynchronous writes' own process group, made on first use

    # -- queries --------------------------------------------------------------------------

    def _folder(self, step: int) -> str:
        return posixpath.join(self.root, step_dirname(step, self.timeline or 0))

    def _step_folders(self) -> list[tuple[int, str]]:
        """All `step-N` and `step-N-tK` folders, committed or not, by step."""
        self.fs.invalidate_cache(self.root)  # object-store listings are cached by fsspec
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        folders = []
        for entry in entries:
            entry = entry.rstrip("/")
            if match := _STEP_DIR.fullmatch(posixpath.basename(entry)):
                folders.append((int(match[1]), entry))
        return sorted(folders)

    def list_committed(self) -> list[CheckpointInfo]:
        """Committed checkpoints, by step, then by commit time (older timelines first)."""
        found = []
        for _, folder in self._step_folders():
            if (marker := _read_commit(self.fs, folder)) is not None:
                found.append(_info(self.fs, folder, marker))
        return sorted(found, key=lambda info: (info.step, info.time))

    def find_step(self, step: int) -> CheckpointInfo | None:
        """The committed checkpoint of `step`: the one on `latest`'s timeline if several
        timelines hold that step (a crash before retention), else the newest."""
        candidates = [info for info in self.list_committed() if info.step == step]
        latest = self.latest()
        for info in candidates:
            if latest is not None and info.timeline == latest.timeline:
                return info
        return candidates[-1] if candidates else None

    def _new_timeline(self) -> int:
        """One more than any timeline in the root (folder names, committed or not), so a new
        timeline's folders never collide with existing ones."""
        timelines = [
            int(match[2] or 0)
            for _, folder in self._step_folders()
            if (match := _STEP_DIR.fullmatch(posixpath.basename(folder)))
        ]
        return max(timelines) + 1 if timelines else 0

    def _follow(self, loaded: CheckpointInfo | None) -> None:
        """Settle the timeline after loading `loaded` (None: starting fresh). Continuing from
        the checkpoint `latest` names keeps its timeline; anything else branches off."""
        latest = self.latest()
        if loaded is not None and latest is not None and _same(loaded.path, latest.path):
            self.timeline, self.branch = latest.timeline, latest.branch
        elif loaded is None and latest is None:
            self.timeline, self.branch = 0, 0
        else:
            self.timeline, self.branch = self._new_timeline(), loaded.step if loaded else 0
            log.info(
                "starting checkpoint timeline %d at step %d; later saves supersede the "
                "checkpoints after it",
                self.timeline,
                self.branch,
            )

    def latest(self) -> CheckpointInfo | None:
        """The checkpoint the `latest` pointer names, once verified committed; otherwise
        (no pointer, or it names a folder that is gone or partial) the newest committed."""
        try:
            name = self.fs.cat_file(posixpath.join(self.root, POINTER)).decode().strip()
        except FileNotFoundError:
            name = ""
        if _STEP_DIR.fullmatch(name):
            folder = posixpath.join(self.root, name)
            if (marker := _read_commit(self.fs, folder)) is not None:
                return _info(self.fs, folder, marker)
            log.warning("checkpoint pointer names %s, which is not committed; scanning", name)
        committed = self.list_committed()
        return committed[-1] if committed else None  # the highest step, the newest commit

    # -- save ------------------------------------------------------------------------------

    def _barrier(self) -> None:
        if dist.is_initialized() and self.world_size > 1:
            dist.barrier()

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: LRScheduler | None = None,
        extra: dict[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Save and commit `step-N` (all ranks). `extra` is this rank's own state (tokens
        seen, data position...): plain Python values and tensors. A step that is already
        committed on this timeline is kept as it is: rewriting it in place would leave a
        window with no committed copy of it. The same step of another timeline is superseded
        (module docstring, Timelines)."""
        self.wait()  # an asynchronous save still in flight commits first
        start = time.monotonic()
        rng = capture_rng_state()
        self._settle_timeline()
        folder = self._folder(step)
        if (marker := _read_commit(self.fs, folder)) is not None:
            log.info("checkpoint %s is already committed; keeping it", step_dirname(step))
        else:
            self._prepare(step, folder, scheduler, extra, rng)
            model_state, optim_state = get_state_dict(model, optimizer, options=_TRAINABLE_ONLY)
            with _dcp_context() as no_dist:
                dcp.save(
                    {"model": model_state, "optim": optim_state},
                    checkpoint_id=_checkpoint_id(self.fs, folder),
                    no_dist=no_dist,
                )
            self._barrier()  # every rank's files are in place before rank 0 commits
            marker = self._commit(step, folder, start)
        if self.rank == 0:
            self._publish(folder)
        self._barrier()  # no rank goes on (or loads) before the pointer has moved
        return _info(self.fs, folder, marker)

    def save_async(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: LRScheduler | None = None,
        extra: dict[str, Any] | None = None,
    ) -> CheckpointInfo | None:
        """Start saving `step-N` (all ranks) and return once the state is staged in host
        memory; `poll`, `wait` or `close` commit it when the write has finished (module
        docstring, Asynchronous saves). Returns the info of a step already committed on this
        timeline (kept as it is, as `save` does), else None."""
        self.wait()  # at most one save in flight, committed in step order
        start = time.monotonic()
        rng = capture_rng_state()  # the extras are this step's, whenever the write ends
        self._settle_timeline()
        folder = self._folder(step)
        if (marker := _read_commit(self.fs, folder)) is not None:
            log.info("checkpoint %s is already committed; keeping it", step_dirname(step))
            if self.rank == 0:
                self._publish(folder)
            self._barrier()
            return _info(self.fs, folder, marker)
        self._prepare(step, folder, scheduler, extra, rng)
        model_state, optim_state = get_state_dict(model, optimizer, options=_TRAINABLE_ONLY)
        with _dcp_context() as no_dist:
            future = dcp.async_save(
                {"model": model_state, "optim": optim_state},
                checkpoint_id=_checkpoint_id(self.fs, folder),
                process_group=self._checkpoint_group(),
                no_dist=no_dist,
            )
        assert isinstance(future, Future)  # the default stager stages before returning
        self._in_flight = _InFlight(step, folder, future, start)
        return None

    def _checkpoint_group(self) -> Any:
        """A gloo process group for the background writes (created collectively on first
        use): their collectives run beside training's, which must not share a group with
        them, and DCP's asynchronous save needs a CPU backend."""
        if dist.is_initialized() and self._group is None:
            self._group = dist.new_group(backend="gloo")
        return self._group

    def poll(self) -> CheckpointInfo | None:
        """Commit the in-flight save if its write has finished (no waiting, no collective);
        returns what was committed. Raises `CheckpointSaveError` if the write failed."""
        if self._in_flight is None or not self._in_flight.future.done():
            return None
        return self._finish()

    def wait(self) -> CheckpointInfo | None:
        """Wait for the in-flight save's write and commit it; returns what was committed
        (None when nothing was in flight). Raises `CheckpointSaveError` if it failed."""
        if self._in_flight is None:
            return None
        return self._finish()

    def close(self, timeout_s: float = 60.0) -> None:
        """On the way out (an error, a stop): commit the in-flight save if its write ends
        within `timeout_s`; otherwise, or if it failed, leave it uncommitted and log why.
        Never raises: the error that ends the run is the one to report."""
        if self._in_flight is None:
            return
        step = self._in_flight.step
        try:
            self._in_flight.future.result(timeout=timeout_s)
            self._finish()
        except (Exception, CheckpointException) as error:
            self._in_flight = None
            log.warning(
                "asynchronous checkpoint of step %d left uncommitted: %s", step, _describe(error)
            )

    def _finish(self) -> CheckpointInfo:
        in_flight, self._in_flight = self._in_flight, None
        assert in_flight is not None
        try:
            in_flight.future.result()
        except (Exception, CheckpointException) as error:  # DCP's is a BaseException
            latest = self.latest()
            raise CheckpointSaveError(
                f"asynchronous checkpoint save of step {in_flight.step} to "
                f"{_url(self.fs, in_flight.folder)} failed ({_describe(error)}); the latest "
                f"committed checkpoint is still {latest.path if latest else 'none'}"
            ) from error
        # Rank 0's future ends after DCP gathered every rank's write results and wrote
        # `.metadata`: every file is in place, so rank 0 commits without a barrier.
        marker = self._commit(in_flight.step, in_flight.folder, in_flight.start)
        if self.rank == 0:
            self._publish(in_flight.folder)
        return _info(self.fs, in_flight.folder, marker)

    def _settle_timeline(self) -> None:
        if self.timeline is None:
            latest = self.latest()
            self.timeline = latest.timeline if latest else 0
            self.branch = latest.branch if latest else 0
            self._barrier()  # every rank has read the pointer before rank 0 may move it

    def _prepare(
        self,
        step: int,
        folder: str,
        scheduler: LRScheduler | None,
        extra: dict[str, Any] | None,
        rng: dict[str, Any],
    ) -> None:
        """Clear a crashed save's leftovers and write this rank's extras."""
        if self.rank == 0 and self.fs.exists(folder):
            log.info("removing %s, left uncommitted by a crashed save", folder)
            self.fs.rm(folder, recursive=True)
        self._barrier()
        self.fs.makedirs(folder, exist_ok=True)
        # Before DCP, so that DCP's `.metadata` stays the last file of a complete save.
        state = {
            "step": step,
            "world_size": self.world_size,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng,
            "extra": dict(extra or {}),
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        _put(self.fs, posixpath.join(folder, _extra_name(self.rank)), buffer.getvalue())

    def _commit(self, step: int, folder: str, start: float) -> dict[str, Any]:
        """Write the marker (rank 0), once every rank's files are in place."""
        marker = {
            "step": step,
            "time": time.time(),
            "world_size": self.world_size,
            "duration_s": time.monotonic() - start,
            "timeline": self.timeline or 0,
            "branch": self.branch,
        }
        if self.rank == 0:
            _put(self.fs, posixpath.join(folder, COMMITTED), json.dumps(marker).encode())
            log.info("committed %s in %.2fs", folder, marker["duration_s"])
        return marker

    def _publish(self, folder: str) -> None:
        """Move the pointer to `folder`, then apply retention (rank 0): keep the newest
        `keep_last` of this timeline's lineage (its own folders and any at or before its
        branch step); superseded, old and uncommitted folders go."""
        _put(self.fs, posixpath.join(self.root, POINTER), posixpath.basename(folder).encode())
        lineage = [
            info
            for info in self.list_committed()
            if info.timeline == self.timeline or info.step <= self.branch
        ]
        committed = {_url(self.fs, folder)}
        committed.update(info.path for info in lineage[-self.keep_last :])
        for _, other in self._step_folders():
            if _url(self.fs, other) in committed:
                continue
            # Marker first: a crash during the removal leaves an uncommitted folder, never a
            # committed one with files missing.
            marker = posixpath.join(other, COMMITTED)
            if self.fs.exists(marker):
                self.fs.rm_file(marker)
            self.fs.rm(other, recursive=True)
            log.info("removed old or partial checkpoint %s", other)

    # -- load ------------------------------------------------------------------------------

    def load(
        self,
        info_or_path: CheckpointInfo | Path | str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: LRScheduler | None = None,
    ) -> dict[str, Any]:
        """Restore model, optimizer, scheduler and this rank's RNG states from a committed
        step folder (all ranks), saved at this world size or another (module docstring,
        Elastic resume). Returns this rank's extra state (rank 0's at another world size),
        with `step` set."""
        location = info_or_path.path if isinstance(info_or_path, CheckpointInfo) else info_or_path
        fs, folder = url_to_fs(str(location))
        marker = _read_commit(fs, folder)
        if marker is None:
            raise FileNotFoundError(
                f"{location} is not a committed checkpoint (no {COMMITTED} marker or no DCP "
                f"{DCP_METADATA}); a partial save is never loaded"
            )
        # Another world size (elastic resume): DCP reshards the tensors; the per-rank extras
        # have no counterpart, so every rank takes rank 0's (module docstring).
        same_world = int(marker["world_size"]) == self.world_size
        state = torch.load(
            io.BytesIO(
                fs.cat_file(posixpath.join(folder, _extra_name(self.rank if same_world else 0)))
            ),
            weights_only=True,
        )
        model_state, optim_state = get_state_dict(model, optimizer, options=_TRAINABLE_ONLY)
        with _dcp_context() as no_dist:
            dcp.load(
                {"model": model_state, "optim": optim_state},
                checkpoint_id=_checkpoint_id(fs, folder),
                no_dist=no_dist,
            )
        set_state_dict(
            model,
            optimizer,
            model_state_dict=model_state,
            optim_state_dict=optim_state,
            options=_TRAINABLE_ONLY,
        )
        if scheduler is not None:
            if state["scheduler"] is None:
                raise ValueError(f"{location} holds no scheduler state")
            scheduler.load_state_dict(state["scheduler"])
        if same_world:
            restore_rng_state(state["rng"])
            log.info("loaded checkpoint %s", location)
        else:
            log.info(
                "loaded checkpoint %s, saved by %d processes, into %d: model and optimizer "
                "resharded, scheduler and extra state from rank 0, RNG states not restored",
                location,
                marker["world_size"],
                self.world_size,
            )
        self.loaded = _info(fs, folder, marker)
        self._follow(self.loaded)
        return {**state["extra"], "step": int(marker["step"])}

    def resume(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: LRScheduler | None = None,
        policy: str = "auto",
    ) -> dict[str, Any] | None:
        """Apply `spec.checkpoint.resume`: `auto` loads the latest committed checkpoint if
        there is one, `never` loads nothing, `step-N` that committed step under the root, and
        anything else is a path or URL of a step folder. Returns `load`'s dict, or None."""
        if policy == "never":
            self._follow(None)  # a fresh start over old checkpoints is a new timeline
            return None
        if policy == "auto":
            info = self.latest()
            if info is None:
                log.info("no committed checkpoint under %s; starting fresh", self.root)
                self._follow(None)
                return None
            return self.load(info, model, optimizer, scheduler)
        if match := _STEP_DIR.fullmatch(policy):
            found = self.find_step(int(match[1]))
            if found is None:
                steps = [info.step for info in self.list_committed()]
                raise FileNotFoundError(
                    f"resume policy {policy!r}: no committed checkpoint of step {int(match[1])} "
                    f"under {_url(self.fs, self.root)} (committed steps: {steps or 'none'})"
                )
            return self.load(found, model, optimizer, scheduler)
        return self.load(policy, model, optimizer, scheduler)
