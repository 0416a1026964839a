"""bench/bench_route.py end to end at a tiny size: a real engine (started as the bench
starts it, then given as `--engine-url`, the vLLM path) and a real `kubetrain route` in
front of it, both sides measured, every routed request logged, the plot drawn, nothing
left running. No timing targets here: those belong to `make bench`."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from bench import bench_route

LEVELS = (1, 3)
ROUNDS = 2
MAX_TOKENS = 8


def _processes_using(path: Path) -> list[int]:
    """Pids whose command line mentions path (the engine's model and the router's store
    are in it)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and proc.name != str(os.getpid()):
            try:
                if str(path).encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue  # gone, or not ours to read
    return pids


def test_tiny_route_benchmark_measures_both_sides(tmp_path: Path) -> None:
    (tmp_path / "engine").mkdir()
    cpus = os.sched_getaffinity(0)
    with bench_route._engine(None, tmp_path / "engine", max(LEVELS)) as engine:
        results = bench_route.run(
            engine_url=engine.url + "/",
            concurrency=LEVELS,
            rounds=ROUNDS,
            per_client=1,
            min_block=2,
            max_tokens=MAX_TOKENS,
            pin=len(cpus) >= 2,
            workdir=tmp_path,
        )
        assert os.sched_getaffinity(0) == cpus  # given back after pinning
        assert httpx.get(f"{engine.url}/readyz").status_code == 200  # given, so left running

    assert list(results["concurrency"]) == ["1", "3"]
    for c, row in results["concurrency"].items():
        block = max(1, -(-2 // int(c))) * int(c)
        assert row["requests"] == {"direct": ROUNDS * block, "routed": ROUNDS * block}
        for key in ("ttft", "per_token"):
            for side in ("direct", "routed"):
                assert 0 < row[key][f"{side}_p50_ms"] <= row[key][f"{side}_p95_ms"]
            assert isinstance(row[key]["pass"], bool)
        ttft = row["ttft"]
        added = ttft["routed_p50_ms"] - ttft["direct_p50_ms"]
        assert ttft["added_p50_ms"] == pytest.approx(added, abs=1e-2)
        assert ttft["pass"] == (ttft["added_p50_ms"] <= bench_route.TARGET_TTFT_ADDED_MS)
        tokens = row["per_token"]
        ratio = tokens["routed_p50_ms"] / tokens["direct_p50_ms"]
        assert tokens["ratio_p50"] == pytest.approx(ratio, rel=1e-2)
        assert tokens["pass"] == (tokens["ratio_p50"] <= bench_route.TARGET_PER_TOKEN_RATIO)
        assert row["mean_tokens"] == MAX_TOKENS  # random weights: no early end of text
        assert 2 <= row["mean_chunks"] <= MAX_TOKENS
        assert row["outputs_identical"] is True
        # The built-in engine's own TTFT, scraped from its /metrics, for both sides.
        assert all(v > 0 for v in row["engine_ttft_mean_ms"].values())
        assert isinstance(row["ttft_outside_engine_added_mean_ms"], float)
    setup = results["setup"]
    assert setup["engine"].startswith("external OpenAI server")
    assert setup["engine_model"] == engine.model
    # Every routed request (the warm-up ones too) reached the durable log.
    assert setup["routed_requests_logged"] == setup["routed_requests_measured"] + sum(LEVELS)
    assert setup["store"].startswith("SQLite")
    if len(cpus) >= 2:
        _first, *rest = sorted(cpus)
        assert setup["pinned"] == {"engine": "not started here", "router_and_clients": rest}
    rows = results["concurrency"].values()
    assert results["pass"] == all(r["ttft"]["pass"] and r["per_token"]["pass"] for r in rows)

    added, ratios = bench_route.plot_bars(results)
    assert [bar[1] for bar in added] == [r["ttft"]["added_p50_ms"] for r in rows]
    assert [bar[1] for bar in ratios] == [r["per_token"]["ratio_p50"] for r in rows]
    bench_route.plot(results, tmp_path / "route.png")
    assert (tmp_path / "route.png").stat().st_size > 0

    # Torn down: the router (and the engine the test started) gone, the bench's folder too.
    assert _processes_using(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine", "route.png"]
