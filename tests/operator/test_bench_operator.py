"""bench/bench_operator.py works end to end in quick mode: both operators measured on a
private control plane (latency, a burst, a steady state of 40 runs), which is gone
afterwards with both operator processes. No timing targets here: those live in the
benchmark."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench import bench_operator

pytestmark = pytest.mark.controlplane


def _processes_using(path: Path) -> list[int]:
    """Pids whose command line or environment mentions path: the control plane's state and
    the operators' KUBECONFIG are in it."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and proc.name != str(os.getpid()):
            try:
                seen = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
            except OSError:
                continue  # gone, or not ours to read
            if str(path).encode() in seen:
                pids.append(int(proc.name))
    return pids


def test_quick_benchmark_measures_both_operators_and_cleans_up(tmp_path: Path) -> None:
    results = bench_operator.run(quick=True, workdir=tmp_path)

    for label in ("ours", "minimal"):
        for kind in ("latency", "settled"):
            latency = results[label][kind]
            assert latency["runs"] == len(latency["samples_s"]) == 5
            assert all(s > 0 for s in latency["samples_s"])
            assert 0 < latency["p50_s"] <= latency["p95_s"] <= max(latency["samples_s"])
        burst = results[label]["burst"]
        assert burst["runs"] == 20
        assert burst["create_s"] > 0
        assert burst["all_status_s"] > 0
        assert 0 < burst["idle_rss_mib"] <= burst["peak_rss_mib"]
        first = burst["first_status"]
        assert 0 < first["p50_s"] <= first["p99_s"] <= first["max_s"]
        assert first["p99_s"] <= burst["all_status_s"]
        steady = results[label]["steady"]
        assert (steady["runs"], steady["finished"], steady["active"]) == (40, 20, 20)
        assert steady["window_s"] >= 15
        assert steady["requests_per_s"] >= 0
        assert 0 < steady["rss_mib"] <= steady["peak_rss_mib"]
        assert steady["cpu_percent"] >= 0
        if steady["requests_source"] == "audit":  # split by namespace
            parts = ("finished", "active", "other")
            split = sum(steady[f"{part}_requests_per_s"] for part in parts)
            assert split == pytest.approx(steady["requests_per_s"], abs=0.01)
        else:
            assert steady["requests_source"] == "apiserver_request_total"
    # Ours made every pod of the burst; the minimal operator makes none.
    assert results["ours"]["burst"]["all_pods_s"] >= results["ours"]["burst"]["all_status_s"]
    assert results["minimal"]["burst"]["all_pods_s"] is None
    ratio = results["ours"]["latency"]["p50_s"] / results["minimal"]["latency"]["p50_s"]
    assert results["latency_ratio_p50"] == pytest.approx(ratio, rel=1e-2)
    ratio = (
        results["ours"]["burst"]["first_status"]["p50_s"]
        / results["minimal"]["burst"]["first_status"]["p50_s"]
    )
    assert results["burst_first_status_ratio_p50"] == pytest.approx(ratio, rel=1e-2)
    # Ours made the active runs' pods, which the bench marked Running, and read the fake
    # heads' progress; the minimal operator reads none.
    assert results["ours"]["steady"]["resync_seconds"] > 0
    assert results["ours"]["steady"]["progress_reads_per_s"] > 0
    assert results["minimal"]["steady"]["progress_reads_per_s"] == 0

    bars = bench_operator.plot_bars(results)
    assert [kind for *_, kind in bars] == ["max"] * len(bars)
    assert bars[0][1] == results["latency_ratio_p50"]
    assert bars[bench_operator.RATIO_BARS - 1][1] == results["burst_first_status_ratio_p50"]
    assert results["ours"]["steady"]["rss_mib"] in [value for _, value, *_ in bars]

    # Always torn down: no control plane state, no process still pointed at it.
    assert not (tmp_path / "controlplane" / "pids").exists()
    assert _processes_using(tmp_path) == []
