"""`make bench`: every benchmark, each a ratio against a baseline measured in the same run.
Writes bench/results/bench.json and bench/results/bench.png."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench import bench_data, bench_trainer

RESULTS = Path(__file__).resolve().parent / "results"


def _log(message: str, started: float) -> None:
    print(f"[bench {time.monotonic() - started:6.1f}s] {message}", flush=True)


def plot(results: dict[str, Any], path: Path) -> None:
    """One bar per ratio, with its target, so regressions are visible at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [
        ("train step\nours / plain", results["trainer"]["step"]["ratio"], 1.05, "max"),
        (
            "training time\nRay / torchrun",
            results["trainer"]["launch"]["training_ratio"],
            1.05,
            "max",
        ),
        ("tokenize+pack\nours / raw", results["data"]["tokenize_pack"]["ratio"], 0.8, "min"),
        ("near-dedup\nours / datasketch", results["data"]["near_dedup"]["ratio"], 0.8, "min"),
    ]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    for i, (_label, value, target, kind) in enumerate(bars):
        ok = value <= target if kind == "max" else value >= target
        ax.bar(i, value, color="tab:green" if ok else "tab:red")
        ax.hlines(target, i - 0.4, i + 0.4, colors="black", linestyles="dashed")
        ax.text(i, value, f"{value:.2f}", ha="center", va="bottom")
    ax.set_xticks(range(len(bars)), [b[0] for b in bars])
    ax.set_ylabel("ratio (dashed: target)")
    ax.set_title("kubetrain benchmarks vs same-run baselines")
    launch = results["trainer"]["launch"]
    ax2.bar(
        [0, 1], [launch["torchrun"]["time_to_first_step_s"], launch["ray"]["time_to_first_step_s"]]
    )
    ax2.set_xticks([0, 1], ["torchrun", "Ray Train"])
    ax2.set_ylabel("seconds")
    ax2.set_title("time to first step")
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
    results["data"] = bench_data.run(quick=quick)
    _log("trainer: step vs plain loop, Ray Train vs torchrun", started)
    results["trainer"] = bench_trainer.run(quick=quick)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench.json").write_text(json.dumps(results, indent=2))
    plot(results, RESULTS / "bench.png")
    _log(f"wrote {RESULTS / 'bench.json'} and bench.png", started)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
