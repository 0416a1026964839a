"""`python -m kubetrain_monitoring [--check] [--chart DIR]`: write the dashboards and alert
rules into the Helm chart, or (--check) exit 1 if the files there differ."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from kubetrain_monitoring import alerts
from kubetrain_monitoring.dashboards import DASHBOARDS

# operator/kubetrain_monitoring/__main__.py -> the repository root
CHART = Path(__file__).resolve().parents[2] / "helm" / "kubetrain"


def generated() -> dict[str, str]:
    """Chart-relative path -> file content."""
    files = {
        f"dashboards/{name}.json": json.dumps(board, indent=2) + "\n"
        for name, board in DASHBOARDS.items()
    }
    files["rules/alerts.yaml"] = alerts.render()
    return files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetrain_monitoring", description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the files are stale")
    parser.add_argument("--chart", type=Path, default=CHART, help=f"chart (default: {CHART})")
    args = parser.parse_args(argv)
    stale = []
    for relative, content in generated().items():
        path = args.chart / relative
        current = path.read_text() if path.is_file() else None
        if current == content:
            continue
        if args.check:
            stale.append(relative)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
            print(f"wrote {path}")
    if stale:
        print(
            f"stale in {args.chart}: {', '.join(stale)}; run `make dashboards`",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
