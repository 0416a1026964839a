"""A benchmark run on its own (`python -m bench.bench_x`): `make bench` (run_all) writes
every benchmark to bench.json; alone, one benchmark writes its own file, with the load
average around it, so a partial run never overwrites the full one."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def run_alone(run: Callable[..., dict[str, Any]], filename: str) -> None:
    load_before = os.getloadavg()
    results = run(quick="--quick" in sys.argv)
    results["machine"] = {
        "cpus": os.cpu_count(),
        "load_average_1_5_15_before": load_before,
        "load_average_1_5_15_after": os.getloadavg(),
    }
    (RESULTS / filename).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
