"""The Training dashboard's Preference and RL row, and its memory panel, against a real
Prometheus scraping real trainer telemetry endpoints (a grpo, a dpo and an sft run; no
control plane): each panel shows the numbers of the runs that have them, under the right
run, and nothing for the others."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from kubetrain_monitoring.dashboards import DASHBOARDS
from kubetrain_trainer.metrics import Telemetry, serve_telemetry
from tests.monitoring.queries import substitute
from tests.support import prometheus

NAMESPACE = "ml-team"
STEPS = {
    "grpo-run": {"reward_mean": 0.5, "reward_std": 0.25, "kl": 0.0125},
    "dpo-run": {"reward_margin": 0.4, "reward_accuracy": 0.75},
    "sft-run": {},
}
# Planned bytes per process, and each rank's measured peak (the sft run has measured none).
MEMORY = {
    "grpo-run": (100_000_000, [90_000_000, 95_000_000]),
    "dpo-run": (200_000_000, [210_000_000]),
    "sft-run": (50_000_000, []),
}


@pytest.fixture(scope="module")
def prom() -> Iterator[prometheus.Prometheus]:
    # Installed by `hack/controlplane.py tools` (make test), as for the other monitoring tests.
    assert prometheus.available(), "no prometheus: run `python3 hack/controlplane.py tools`"
    servers, targets = [], []
    for run, numbers in STEPS.items():
        telemetry = Telemetry(run, "builtin://tiny-llama")
        telemetry.set_phase("Running")
        telemetry.update(step=3, total_steps=10, loss=1.0, **numbers)
        planned, peaks = MEMORY[run]
        telemetry.update(memory_planned_bytes=planned)
        telemetry.set_memory_peaks(peaks)
        server, port = serve_telemetry(telemetry, host="127.0.0.1")
        servers.append(server)
        targets.append(f"127.0.0.1:{port}")
    job = prometheus.ScrapeJob("kubetrain-trainer", targets, labels={"namespace": NAMESPACE})
    try:
        with prometheus.Prometheus([job]) as prom:
            prom.wait_for("count(kubetrain_trainer_run_info) == 3", timeout=30)
            yield prom
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def panel(title: str) -> dict[str, Any]:
    (found,) = [p for p in DASHBOARDS["training"]["panels"] if p["title"] == title]
    return dict(found)


def shown(prom: prometheus.Prometheus, title: str, run: str = ".*") -> dict[str, float]:
    """legend -> value of every series the panel draws now, Grafana's legend filled in."""
    out = {}
    for target in panel(title)["targets"]:
        expr = substitute(target["expr"], {"$namespace": NAMESPACE, "$run": run})
        for series in prom.values(expr):
            legend = target["legendFormat"].replace("{{run}}", series["metric"]["run"])
            out[legend] = float(series["value"][1])
    return out


def test_the_row_and_its_panels_are_on_the_training_dashboard() -> None:
    titles = [p["title"] for p in DASHBOARDS["training"]["panels"]]
    start = titles.index("Preference and RL")
    assert titles[start + 1 : start + 4] == [
        "Reward: $run",
        "Reward margin and accuracy",
        "KL to the reference",
    ]


def test_the_reward_band_is_drawn_between_series_the_panel_has() -> None:
    reward = panel("Reward: $run")
    assert reward["repeat"] == "run"  # one run per copy: the band's series names are fixed
    legends = {t["legendFormat"] for t in reward["targets"]}
    fills = [
        p["value"]
        for o in reward["fieldConfig"]["overrides"]
        if o["matcher"]["options"] in legends
        for p in o["properties"]
        if p["id"] == "custom.fillBelowTo"
    ]
    assert fills == ["mean - std"]
    assert set(fills) <= legends


def test_the_reward_panel_shows_mean_and_band_of_its_run(prom: prometheus.Prometheus) -> None:
    assert shown(prom, "Reward: $run", "grpo-run") == {
        "mean": 0.5,
        "mean + std": 0.75,
        "mean - std": 0.25,
    }
    assert shown(prom, "Reward: $run", "dpo-run") == {}
    assert shown(prom, "Reward: $run", "sft-run") == {}


def test_margin_accuracy_and_kl_panels_show_the_runs_that_have_them(
    prom: prometheus.Prometheus,
) -> None:
    assert shown(prom, "Reward margin and accuracy") == {
        "dpo-run margin": 0.4,
        "dpo-run accuracy": 0.75,
    }
    assert shown(prom, "KL to the reference") == {"grpo-run": 0.0125}


def test_memory_panel_sets_the_busiest_rank_beside_the_plan(prom: prometheus.Prometheus) -> None:
    assert shown(prom, "Memory: planned vs measured peak") == {
        "grpo-run planned": 100_000_000,
        "grpo-run measured (busiest rank)": 95_000_000,
        "dpo-run planned": 200_000_000,
        "dpo-run measured (busiest rank)": 210_000_000,
        "sft-run planned": 50_000_000,
    }
    assert panel("Memory: planned vs measured peak")["fieldConfig"]["defaults"]["unit"] == "bytes"
