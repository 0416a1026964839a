#!/usr/bin/env python3
"""`make dashboards-preview`: draw the Training and Serving dashboards from real data.

Starts the monitoring tests' live stack without the operator (no control plane needed): a
real Prometheus scraping every second a shrunk quickstart run (`kubetrain run`), then the
model server serving what it exported under steady `openai` traffic. Then it evaluates the
dashboards' own panel queries over /api/v1/query_range and draws their main panels with
matplotlib into docs/dashboards/training.png and serving.png. About 2-3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.monitoring.live

from kubetrain_monitoring.dashboards import DASHBOARDS  # noqa: E402
from tests.monitoring.live import RUN, RUN_NAMESPACE, Stack  # noqa: E402

OUT = ROOT / "docs" / "dashboards"
PANELS = {
    "training": [
        "Loss",
        "Evaluation metrics",
        "Learning rate",
        "Gradient norm",
        "Tokens/s",
        "MFU",
        "Progress",
        "ETA",
        "Checkpoint age",
    ],
    "serving": [
        "Requests by code",
        "Errors by code",
        "Request latency",
        "Time to first token",
        "Generated tokens/s",
        "In flight and queued",
        "Feedback",
        "Serving pods by version",
        "Requests/s",
    ],
}
UNITS = {
    "s": "seconds",
    "percent": "%",
    "percentunit": "fraction",
    "reqps": "requests/s",
    "ops": "per second",
    "short": "",
}
VARIABLES = {
    "$__rate_interval": "15s",
    "$__interval": "2s",
    "$__range": "1m",
    "$namespace": RUN_NAMESPACE,
    "$run": RUN,
}

started = time.monotonic()


def progress(message: str) -> None:
    print(f"[preview {time.monotonic() - started:6.1f}s] {message}", flush=True)


def substitute(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def legend(template: str, labels: dict[str, str]) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)
    return " ".join(text.split()) or ", ".join(f"{k}={v}" for k, v in labels.items()) or "value"


def draw(stack: Stack, name: str, start: float, end: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    board = DASHBOARDS[name]
    panels = {p["title"]: p for p in board["panels"]}
    titles = PANELS[name]
    cols = 3
    rows = (len(titles) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.3 * rows), squeeze=False)
    fig.suptitle(f"{board['title']}   (run {RUN}, {time.strftime('%Y-%m-%d')})", fontsize=14)
    step = max(1.0, (end - start) / 300)
    for ax, title in zip(axes.flat, titles, strict=False):
        panel = panels[title]
        drawn = 0
        for target in panel["targets"]:
            answer = stack.prometheus.query_range(substitute(target["expr"]), start, end, step)
            if answer.get("status") != "success":
                raise SystemExit(f"{title}: {answer}")
            for series in answer["data"]["result"]:
                points = [(float(t) - start, float(v)) for t, v in series["values"]]
                points = [(t, v) for t, v in points if v == v and abs(v) != float("inf")]
                if not points:
                    continue
                xs, ys = zip(*points, strict=True)
                label = legend(target.get("legendFormat", ""), series["metric"])
                ax.plot(xs, ys, label=label, linewidth=1.2)
                drawn += 1
        unit = panel["fieldConfig"]["defaults"].get("unit", "short")
        ax.set_title(title, fontsize=11)
        ax.set_ylabel(UNITS.get(unit, unit), fontsize=8)
        ax.set_xlabel("seconds", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if title in ("Evaluation metrics",):
            ax.set_yscale("log")
        if drawn:
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        progress(f"{name}: {title}: {drawn} series")
    for ax in list(axes.flat)[len(titles) :]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    progress(f"wrote {path.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120, help="training steps (default 120)")
    parser.add_argument("--traffic", type=float, default=45, help="seconds of serving traffic")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kubetrain-preview-") as tmp:
        stack = Stack(Path(tmp), steps=args.steps, log=progress)
        try:
            stack.start()
            stack.wait_served()
            progress(f"serving traffic for {args.traffic:.0f}s (3 clients)")
            sent = stack.load(args.traffic, concurrency=3)
            progress(f"{sent} requests sent")
            time.sleep(3)  # the last scrapes
            end = time.time()
            # From the first step on: the minute before it is Ray and data preparation.
            steps = stack.prometheus.query_range(
                "kubetrain_trainer_step", stack.started, stack.trained, 1
            )["data"]["result"]
            first = min((float(s["values"][0][0]) for s in steps), default=stack.started)
            draw(stack, "training", first - 2, stack.trained, args.out / "training.png")
            draw(stack, "serving", stack.trained, end, args.out / "serving.png")
        except BaseException:
            for name in stack.processes:
                print(f"--- {name} log (tail) ---\n{stack.tail(name)}", file=sys.stderr)
            raise
        finally:
            stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
