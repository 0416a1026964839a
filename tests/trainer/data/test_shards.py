"""Token shards: fixed-size files with an index, read back by global row index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kubetrain_trainer.data import shards
from kubetrain_trainer.data.tokenize import Packer, pack


def rows(n: int, seq: int = 4) -> dict[str, np.ndarray]:
    base = np.arange(n * seq, dtype=np.int32).reshape(n, seq)
    return {"input_ids": base, "labels": -base, "position_ids": base % seq}


def test_fixed_size_shards_and_their_index(tmp_path: Path) -> None:
    writer = shards.ShardWriter(tmp_path / "train", 4, per_shard=3)
    data = rows(10)
    for lo in (0, 2, 7):  # blocks of uneven sizes
        hi = {0: 2, 2: 7, 7: 10}[lo]
        writer.add({k: v[lo:hi] for k, v in data.items()})
    index = writer.close()
    assert [s["rows"] for s in index["shards"]] == [3, 3, 3, 1]
    assert json.loads((tmp_path / "train" / "index.json").read_text()) == index
    first = np.load(tmp_path / "train" / "shard-00000.input_ids.npy")
    assert first.dtype == np.int32
    assert first.shape == (3, 4)
    assert shards.complete(tmp_path / "train")
    (tmp_path / "train" / "shard-00003.labels.npy").unlink()
    assert not shards.complete(tmp_path / "train")


def test_rows_are_read_by_global_index_in_the_order_asked(tmp_path: Path) -> None:
    data = rows(10)
    shards.write_split(tmp_path / "s", data, per_shard=3)
    reader = shards.open_split(tmp_path, "s")
    assert reader.rows == 10
    assert "position_ids" in reader
    wanted = [9, 0, 4, 4, 8, 1]
    got = reader.take(wanted)
    for key, array in data.items():
        assert (got[key] == array[wanted]).all()
    assert [b["input_ids"].shape[0] for b in reader.batches(4)] == [4, 4, 2]
    assert len(list(reader.batches(4, limit=1))) == 1
    assert (reader.array("labels") == data["labels"]).all()
    with pytest.raises(IndexError, match="out of range"):
        reader.take([10])


def test_a_reader_keeps_few_shards_mapped(tmp_path: Path) -> None:
    shards.write_split(tmp_path / "s", rows(40), per_shard=2)  # 20 shards
    reader = shards.SplitReader(tmp_path / "s", open_shards=2)
    for row in range(40):
        reader.take([row])
        assert len(reader._open) <= 2 * len(reader.keys)
    assert isinstance(next(iter(reader._open.values())), np.memmap)


def test_the_streaming_packer_makes_the_rows_pack_makes() -> None:
    rng = np.random.default_rng(0)
    for _ in range(100):
        seq, n = int(rng.integers(1, 12)), int(rng.integers(0, 30))
        ids = [rng.integers(3, 50, int(rng.integers(1, 30))).tolist() for _ in range(n)]
        labels = [[x if rng.random() < 0.7 else -100 for x in doc] for doc in ids]
        whole = [bool(rng.random() < 0.4) for _ in range(n)]
        expected = pack(ids, labels, seq, 0, whole)
        out = []
        packer = Packer(seq, 0, out.append, block_rows=int(rng.integers(1, 5)))
        for doc, doc_labels, w in zip(ids, labels, whole, strict=True):
            packer.add(np.array(doc, np.int32), np.array(doc_labels, np.int32), w)
        packer.finish()
        for key in ("input_ids", "labels", "position_ids"):
            got = [getattr(r, key) for r in out] or [np.empty((0, seq), np.int32)]
            assert np.array_equal(np.concatenate(got), getattr(expected, key))
        assert (packer.padding, packer.truncated) == (expected.padding, expected.truncated)


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_reading_a_whole_split_leaves_its_pages_out_of_the_process(tmp_path: Path) -> None:
    """A rank reads every row of an epoch: what it read must not stay resident (32 MiB
    here), else its memory grows with the corpus."""
    ids = np.random.default_rng(0).integers(0, 1000, (8192, 1024), dtype=np.int32)
    shards.write_split(tmp_path / "s", {"input_ids": ids}, per_shard=2048)
    del ids
    reader = shards.open_split(tmp_path, "s")
    next(reader.batches(256))
    before = _rss_mib()
    for batch in reader.batches(256):
        assert batch["input_ids"].shape == (256, 1024)
    assert _rss_mib() - before < 8
