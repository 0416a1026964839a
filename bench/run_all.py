"""`make bench`: every benchmark, each a ratio against a baseline measured in the same run.
Writes bench/results/bench.json and bench/results/bench.png. `--corpus-gb=2`: the data
preparation's corpus (0.2 GB by default)."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench import (
    bench_checkpoint,
    bench_data,
    bench_init,
    bench_operator,
    bench_route,
    bench_serve,
    bench_trainer,
)

RESULTS = Path(__file__).resolve().parent / "results"


def _log(message: str, started: float) -> None:
    print(f"[bench {time.monotonic() - started:6.1f}s] {message}", flush=True)


def _bars(ax, bars: list[tuple[str, float, float, str]], ylabel: str) -> None:
    """Green when the target (dashed) is met, red when not."""
    for i, (_label, value, target, kind) in enumerate(bars):
        ok = value <= target if kind == "max" else value >= target
        ax.bar(i, value, color="tab:green" if ok else "tab:red")
        ax.hlines(target, i - 0.4, i + 0.4, colors="black", linestyles="dashed")
        ax.text(i, value, f"{value:.2f}", ha="center", va="bottom")
    # Slanted: a dozen two-line labels do not fit side by side.
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8, rotation=35, ha="right")
    ax.set_ylabel(ylabel)


def plot(results: dict[str, Any], path: Path) -> None:
    """Ratios against same-run baselines on the left, absolute targets on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trainer, data = results["trainer"], results["data"]
    ratios = [
        ("train step\nours / plain", trainer["step"]["ratio"], 1.02, "max"),
        ("training time\nRay / torchrun", trainer["launch"]["training_ratio"], 1.05, "max"),
        ("tokenize+pack\nours / raw", data["tokenize_pack"]["ratio"], 0.8, "min"),
        ("near-dedup\nours / datasketch", data["near_dedup"]["ratio"], 0.8, "min"),
    ]
    if "model_init" in results:
        ratios += bench_init.plot_bars(results["model_init"])
    absolute: list[tuple[str, float, float, str]] = []
    if "prepare" in data:
        prep = data["prepare"]
        large = prep["streaming_large"]
        absolute.append(
            (
                f"data prep peak RSS\nGiB, {large['corpus_mib'] / 1024:.2g} GB corpus",
                large["peak_rss_mib"] / 1024,
                prep["peak_rss_target_mib"] / 1024,
                "max",
            )
        )
        reads = prep["rank_read_rss"]
        ratios.append(
            (
                f"rank RSS reading rows\n{reads['rows_ratio']:g}x corpus / 1x",
                reads["large"]["rss_after_mib"] / reads["small"]["rss_after_mib"],
                1.05,
                "max",
            )
        )
    if "serve" in results:
        serve_bars = bench_serve.plot_bars(results["serve"])
        absolute += serve_bars[:1]  # TTFT overhead, in ms
        ratios += serve_bars[1:]
    if "route" in results:
        route_added, route_ratios = bench_route.plot_bars(results["route"])
        absolute += route_added  # TTFT added, in ms
        ratios += route_ratios
    if "checkpoint" in results:
        ratios += bench_checkpoint.plot_bars(results["checkpoint"])
    if "operator" in results:
        operator_bars = bench_operator.plot_bars(results["operator"])
        ratios += operator_bars[: bench_operator.RATIO_BARS]
        absolute += operator_bars[bench_operator.RATIO_BARS :]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(18, 6.5), gridspec_kw={"width_ratios": [3, 2]})
    _bars(ax, ratios, "ratio (dashed: target)")
    ax.set_title("kubetrain vs same-run baselines")
    if absolute:
        _bars(ax2, absolute, "ms / s / MiB (dashed: target)")
        ax2.set_title("absolute targets")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    quick = "--quick" in sys.argv
    started = time.monotonic()
    results: dict[str, Any] = {
        "machine": {
            "cpus": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
    }
    _log("data: tokenize+pack and near-dedup", started)
    corpus_gb = next(
        (float(a.split("=", 1)[1]) for a in sys.argv if a.startswith("--corpus-gb=")), None
    )
    results["data"] = bench_data.run(quick=quick, corpus_gb=corpus_gb)
    _log("trainer: step vs plain loop, Ray Train vs torchrun", started)
    results["trainer"] = bench_trainer.run(quick=quick)
    _log("model init: peak RSS per rank at world size 2, sharded vs full", started)
    results["model_init"] = bench_init.run(quick=quick)
    _log("checkpoint: step stall of a sync vs an async save", started)
    results["checkpoint"] = bench_checkpoint.run(quick=quick)
    _log("serve: HTTP vs in-process generate", started)
    results["serve"] = bench_serve.run(quick=quick)
    _log("route: the router's TTFT and per-token overhead vs the engine directly", started)
    results["route"] = bench_route.run(quick=quick)
    _log("operator: first status, a burst and a steady state vs minimal kopf", started)
    results["operator"] = bench_operator.run(quick=quick)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench.json").write_text(json.dumps(results, indent=2))
    plot(results, RESULTS / "bench.png")
    _log(f"wrote {RESULTS / 'bench.json'} and bench.png", started)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
