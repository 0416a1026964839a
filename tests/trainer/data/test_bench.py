"""The benchmark's reference side works and scores the planted duplicates (timings are not
asserted here: they belong to `python bench/bench_data.py` on a quiet machine)."""

from __future__ import annotations

from bench import bench_data


def test_near_dedup_bench_reports_quality_of_both_sides() -> None:
    result = bench_data.bench_near_dedup(n_docs=300, rounds=1)
    assert result["planted_near_duplicates"] == 30
    assert result["ours"]["recall"] >= 0.9
    assert result["ours"]["precision"] >= 0.9
    assert result["datasketch"]["precision"] >= 0.9
    assert result["ratio"] > 0


def test_tokenize_bench_counts_the_same_tokens() -> None:
    result = bench_data.bench_tokenize(n_docs=200, rounds=1)
    assert result["tokens"] > 200
    assert result["ours_tokens_per_s"] > 0
