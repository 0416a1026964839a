"""Which packed rows each process reads at each step."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from kubetrain_trainer.config import TrainConfig


class DataOrder:
    """Which rows each process reads at each step, from the step number alone, so resuming
    at step k reads exactly what a straight run would have (exact mid-epoch resume)."""

    def __init__(self, rows: int, config: TrainConfig, seed: int):
        self.rows, self.seed = rows, seed
        self.global_batch = config.hp.global_batch_size
        self.micro = config.micro_batch_size
        self.world = config.world_size
        self.accum = config.grad_accum_steps
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng(self.seed + epoch).permutation(self.rows)}
        return self._perms[epoch]

    def epoch(self, step: int) -> float:
        return step * self.global_batch / self.rows

    def micro_batches(self, step: int, rank: int) -> Iterator[np.ndarray]:
        """Row indices of each of this rank's micro-batches at `step`."""
        for m in range(self.accum):
            start = step * self.global_batch + (m * self.world + rank) * self.micro
            positions = np.arange(start, start + self.micro)
            epochs, offsets = np.divmod(positions, self.rows)
            yield np.array([self._perm(int(e))[o] for e, o in zip(epochs, offsets, strict=True)])
