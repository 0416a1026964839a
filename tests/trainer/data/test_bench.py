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


def test_prepare_bench_measures_memory_and_speed(tmp_path) -> None:
    """(c) at a tiny size; its in-memory side (old code from git) runs in `make bench`."""
    result = bench_data.bench_prepare(0.001, None, read_batches=20, work=tmp_path)
    small, large = result["streaming_small"], result["streaming_large"]
    assert large["documents"] > small["documents"] > 100
    for side in (small, large):
        assert side["peak_rss_mib"] > 0
        assert side["tokens_per_s"] > 0
        # The generated corpus plants 1% exact and 1% near copies; both are removed.
        assert side["stages"]["exact_dedup"]["exact_duplicate"] >= 1
        assert side["stages"]["near_dedup"]["near_duplicate"] >= 1
    assert "in_memory_small" not in result
    reads = result["rank_read_rss"]
    assert reads["large"]["rows"] > reads["small"]["rows"]
    assert reads["large"]["rss_after_mib"] > 0
