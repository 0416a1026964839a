"""Token shards: the prepared rows of a split on disk, and reading rows by global index.

Layout of a split folder (`<data>/train/`, `<data>/validation/`):

    shard-00000.input_ids.npy      int32 [rows, sequenceLength], plain .npy (memory-mappable)
    shard-00000.labels.npy         same shape; IGNORE_INDEX where not trained
    shard-00000.position_ids.npy   same shape; restarting at each packed document
    shard-00001.*.npy ...
    index.json                     {"format": 1, "sequence_length", "keys", "rows",
                                    "rows_per_shard", "shards": [{"name", "rows"}, ...]}

Every shard holds `rows_per_shard` rows except the last. `index.json` is written after
the shards; the preparation's `summary.json` (one folder up) commits the whole folder.

Readers memory-map a shard (`np.load(mmap_mode="r")`) only when a row of it is read, keep
at most `OPEN_SHARDS` maps open, and hand the pages they read back after copying rows out
(`madvise(MADV_DONTNEED)`: they stay in the page cache, out of the process), so a rank's
resident memory holds the rows of its batch, whatever the corpus size.
"""

from __future__ import annotations

import json
import mmap
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

INDEX = "index.json"
KEYS = ("input_ids", "labels", "position_ids")
FORMAT = 1
# Bytes of one array file of a shard: small enough that a few open maps stay cheap, large
# enough that a 10 GB corpus is hundreds of files, not millions.
SHARD_BYTES = 16 * 2**20
OPEN_SHARDS = 32  # maps cost address space, not memory: their pages are handed back


def rows_per_shard(sequence_length: int, shard_bytes: int = SHARD_BYTES) -> int:
    return max(1, shard_bytes // (4 * sequence_length))


def _shard_file(folder: Path, name: str, key: str) -> Path:
    return folder / f"{name}.{key}.npy"


class ShardWriter:
    """Takes rows in order, in blocks of any size, and writes fixed-size shards."""

    def __init__(
        self,
        folder: Path,
        sequence_length: int,
        keys: Sequence[str] = KEYS,
        per_shard: int | None = None,
    ) -> None:
        self.folder, self.seq_len, self.keys = Path(folder), sequence_length, tuple(keys)
        self.per_shard = per_shard or rows_per_shard(sequence_length)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._pending: dict[str, list[np.ndarray]] = {k: [] for k in self.keys}
        self._pending_rows = 0
        self.shards: list[dict[str, int | str]] = []

    @property
    def rows(self) -> int:
        return sum(int(s["rows"]) for s in self.shards) + self._pending_rows

    def add(self, block: Mapping[str, np.ndarray]) -> None:
        n = int(block[self.keys[0]].shape[0])
        if not n:
            return
        for key in self.keys:
            self._pending[key].append(np.asarray(block[key], dtype=np.int32))
        self._pending_rows += n
        while self._pending_rows >= self.per_shard:
            self._write(self.per_shard)

    def close(self) -> dict[str, object]:
        """Writes the last (short) shard and the index; returns the index."""
        if self._pending_rows:
            self._write(self._pending_rows)
        index = {
            "format": FORMAT,
            "sequence_length": self.seq_len,
            "keys": list(self.keys),
            "rows": self.rows,
            "rows_per_shard": self.per_shard,
            "shards": self.shards,
        }
        (self.folder / INDEX).write_text(json.dumps(index, indent=1))
        return index

    def _write(self, n: int) -> None:
        name = f"shard-{len(self.shards):05d}"
        for key in self.keys:
            joined = np.concatenate(self._pending[key]) if self._pending[key] else None
            assert joined is not None
            np.save(_shard_file(self.folder, name, key), joined[:n])
            self._pending[key] = [joined[n:]] if len(joined) > n else []
        self._pending_rows -= n
        self.shards.append({"name": name, "rows": n})


def write_split(
    folder: Path, arrays: Mapping[str, np.ndarray], per_shard: int | None = None
) -> None:
    """A whole split held in memory, as shards (for tests and small tools)."""
    first = np.asarray(arrays[next(iter(arrays))])
    seq_len = int(first.shape[1]) if first.ndim == 2 else 0
    writer = ShardWriter(folder, seq_len, keys=list(arrays), per_shard=per_shard)
    writer.add(arrays)
    writer.close()


class SplitReader:
    """Rows of one prepared split, read by global row index through the index."""

    def __init__(self, folder: Path, open_shards: int = OPEN_SHARDS) -> None:
        self.folder = Path(folder)
        try:
            index = json.loads((self.folder / INDEX).read_text())
        except FileNotFoundError as err:
            raise FileNotFoundError(f"no prepared split in {self.folder} ({INDEX})") from err
        self.keys: tuple[str, ...] = tuple(index["keys"])
        self.sequence_length = int(index["sequence_length"])
        self._names = [s["name"] for s in index["shards"]]
        self._starts = np.cumsum([0] + [int(s["rows"]) for s in index["shards"]])
        self.rows = int(self._starts[-1])
        self._open: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()
        self._limit = max(1, open_shards) * len(self.keys)

    def __len__(self) -> int:
        return self.rows

    def __contains__(self, key: object) -> bool:
        return key in self.keys

    def take(self, rows: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """The given rows, in the given order: {key: int32 [len(rows), sequenceLength]}, or
        [len(rows)] for a key of one number per row (kto's `desirable`)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.rows):
            raise IndexError(f"rows out of range 0..{self.rows - 1} in {self.folder}")
        shard = np.searchsorted(self._starts, rows, side="right") - 1
        out: dict[str, np.ndarray] = {}
        for s in np.unique(shard).tolist():
            at = np.flatnonzero(shard == s)
            local = rows[at] - self._starts[s]
            for key in self.keys:
                array = self._array(s, key)
                if key not in out:
                    out[key] = np.empty((len(rows), *array.shape[1:]), np.int32)
                out[key][at] = array[local]
                _release(array)
        for key in self.keys:  # no rows asked for
            out.setdefault(key, np.empty((0, self.sequence_length), np.int32))
        return {k: out[k] for k in self.keys}

    def batches(self, size: int, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Consecutive blocks of `size` rows from the start, at most `limit` of them."""
        for i, start in enumerate(range(0, self.rows, size)):
            if limit is not None and i >= limit:
                return
            yield self.take(np.arange(start, min(start + size, self.rows)))

    def array(self, key: str) -> np.ndarray:
        """The whole split's `key` rows in memory: for tests and small data only."""
        if not self.rows:
            return np.empty((0, self.sequence_length), np.int32)
        return np.concatenate([np.asarray(self._array(s, key)) for s in range(len(self._names))])

    def _array(self, shard: int, key: str) -> np.ndarray:
        at = (shard, key)
        if at in self._open:
            self._open.move_to_end(at)
            return self._open[at]
        # Dropping a map (least recently used) unmaps it: its pages leave this process.
        while len(self._open) >= self._limit:
            self._open.popitem(last=False)
        array = np.load(_shard_file(self.folder, self._names[shard], key), mmap_mode="r")
        self._open[at] = array
        return array


def _release(array: np.ndarray) -> None:
    """Drops a mapped array's resident pages from this process (a no-op elsewhere)."""
    mapped = getattr(array, "_mmap", None)
    if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED)


def open_split(data_dir: Path, name: str) -> SplitReader:
    """The reader the Trainer uses: `open_split(config.data_dir, "train")`."""
    return SplitReader(Path(data_dir) / name)


def complete(folder: Path) -> bool:
    """Whether a split folder has its index and every shard file it names."""
    try:
        index = json.loads((Path(folder) / INDEX).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return all(
        os.path.exists(_shard_file(Path(folder), s["name"], k))
        for s in index["shards"]
        for k in index["keys"]
    )
