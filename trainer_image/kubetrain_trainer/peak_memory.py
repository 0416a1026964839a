"""This process's peak allocated memory, to set beside the memory plan.

On GPUs the CUDA caching allocator keeps the statistic (`max_memory_allocated`), for free.
CPUs keep none, so there torch's MemTracker (a dispatch mode that follows every tensor's
storage) watches one step: the attempt's second, the first that holds optimizer state and
so the steady state's peak. It slows only that step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

# The attempt's step that CPU runs measure (1-based): step 1 creates the optimizer state.
TRACKED_STEP = 2


class PeakMemory:
    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
    ):
        self.model, self.optimizer, self.device = model, optimizer, device
        self._steps = 0
        self._cpu_peak: int | None = None

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Wrap one optimizer step (forward, backward, update)."""
        self._steps += 1
        if self.device.type == "cuda" or self._steps != TRACKED_STEP:
            yield
            return
        tracker = _peak_tracker()
        tracker.track_external(self.model, self.optimizer)
        with tracker:
            yield
        snapshot = tracker.get_tracker_snapshot("peak")
        self._cpu_peak = int(sum(stats.get("Total", 0) for stats in snapshot.values()))

    def changed(self) -> bool:
        """Whether the peak may have changed since the last step: always on a GPU, only
        at the tracked step on a CPU (so the ranks gather it once there)."""
        return self.device.type == "cuda" or self._steps == TRACKED_STEP

    def peak(self) -> int | None:
        """Bytes at the peak so far; None on a CPU before the tracked step."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return self._cpu_peak


def _peak_tracker() -> Any:
    """torch's MemTracker without its per-module statistics: those refuse a module called
    twice in one step (gradient accumulation, dpo's reference pass), and only the total
    peak is wanted, which its dispatch mode keeps whatever the modules do."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class StepPeak(MemTracker):
        def _pre_fw_hook(self, module: Any, inputs: Any) -> None:
            pass

        def _post_fw_hook(self, module: Any, inputs: Any, outputs: Any) -> None:
            pass

        def _pre_bw_hook(self, module: Any, args: Any) -> None:
            pass

        def _post_bw_hook(self, module: Any, args: Any) -> None:
            pass

    return StepPeak()
