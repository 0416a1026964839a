"""Telemetry: Prometheus series and the progress document over real HTTP."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from kubetrain_api import v1alpha1 as api
from kubetrain_trainer.metrics import (
    DATA_OUTCOMES,
    DATA_STAGES,
    EVAL_METRICS,
    MAX_EVAL_DATASETS,
    OTHER,
    PHASES,
    TRAINING_FIELDS,
    Telemetry,
    serve_telemetry,
)

# A summary shaped as data.pipeline writes it, with a reason and a stage it does not know.
SUMMARY = {
    "stages": [
        {"stage": "filter", "in": 100, "kept": 90, "dropped": {"too_short": 7, "made_up": 3}},
        {"stage": "near_dedup", "in": 90, "kept": 80, "dropped": {"near_duplicate": 10}},
        {"stage": "a_new_stage", "kept": 5},
    ],
    "documents": {"read": 100, "train": 76, "validation": 4},
    "tokens": {"train": {"tokens": 1234}},
}
START = 1_767_225_600.0  # 2026-01-01T00:00:00Z


class FakeClock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def telemetry(clock: FakeClock) -> Telemetry:
    return Telemetry("demo-run", "builtin://tiny-llama", clock=clock)


@pytest.fixture
def base_url(telemetry: Telemetry) -> Iterator[str]:
    server, port = serve_telemetry(telemetry, host="127.0.0.1")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()


def get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.headers["Content-Type"], response.read().decode()


def scrape(base_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(series name, sorted labels) -> value, parsed by Prometheus's own parser."""
    status, content_type, body = get(f"{base_url}/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def value(samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def train_a_little(telemetry: Telemetry, clock: FakeClock) -> None:
    telemetry.set_phase("Running")
    for step in range(1, 11):
        clock.now += 2.0  # a step every 2 s
        telemetry.update(
            step=step,
            total_steps=100,
            loss=4.0 - 0.1 * step,
            learning_rate=3e-4,
            tokens_per_second=5120.0,
            mfu=0.42,
            grad_norm=1.5,
            epoch=step / 50,
            tokens_seen=step * 10240,
        )


def test_metrics_endpoint_exports_the_training_series(telemetry, clock, base_url):
    train_a_little(telemetry, clock)
    samples = scrape(base_url)
    expected = {
        "step": 10,
        "total_steps": 100,
        "loss": 3.0,
        "learning_rate": 3e-4,
        "tokens_per_second": 5120.0,
        "mfu": 0.42,
        "grad_norm": 1.5,
        "epoch": 0.2,
        "tokens_seen": 102400,
    }
    for field, v in expected.items():
        assert value(samples, f"kubetrain_trainer_{field}") == pytest.approx(v), field
    assert value(samples, "kubetrain_trainer_phase", phase="Running") == 1.0
    assert sum(value(samples, "kubetrain_trainer_phase", phase=p) for p in PHASES) == 1.0
    info = value(
        samples, "kubetrain_trainer_run_info", run="demo-run", model="builtin://tiny-llama"
    )
    assert info == 1.0


def test_eval_checkpoint_and_data_series(telemetry, clock, base_url):
    telemetry.record_checkpoint(10, "/ckpt/step-000010", 3.25)
    gate = api.GateResult(passed=False, failures=["perplexity 41.2 > max 30"])
    telemetry.record_eval(
        10,
        {"loss": 3.7, "perplexity": 41.2, "accuracy": 0.75, "sentiment/f1": 0.6},
        gate=gate,
    )
    telemetry.set_data_summary(SUMMARY)
    samples = scrape(base_url)
    assert value(samples, "kubetrain_trainer_checkpoint_step") == 10
    assert value(samples, "kubetrain_trainer_checkpoint_duration_seconds") == 3.25
    assert value(samples, "kubetrain_trainer_eval_step") == 10
    assert value(samples, "kubetrain_trainer_eval", metric="perplexity", dataset="") == 41.2
    assert value(samples, "kubetrain_trainer_eval", metric="accuracy", dataset="") == 0.75
    assert value(samples, "kubetrain_trainer_eval", metric="f1", dataset="sentiment") == 0.6
    assert value(samples, "kubetrain_trainer_gate_passed") == 0.0
    docs = "kubetrain_trainer_data_documents"
    assert value(samples, docs, stage="filter", outcome="in") == 100
    assert value(samples, docs, stage="filter", outcome="kept") == 90
    assert value(samples, docs, stage="filter", outcome="too_short") == 7
    assert value(samples, docs, stage="filter", outcome="other") == 3
    assert value(samples, docs, stage="near_dedup", outcome="near_duplicate") == 10
    assert value(samples, docs, stage="other", outcome="kept") == 5
    assert value(samples, docs, stage="split", outcome="train") == 76
    assert value(samples, docs, stage="split", outcome="validation") == 4
    assert len([k for k in samples if k[0] == docs]) == 10  # nothing else, no "stage" value


def test_data_outcomes_cover_the_pipelines_drop_reasons():
    from kubetrain_trainer.data.clean import DROP_REASONS

    assert set(DROP_REASONS) <= set(DATA_OUTCOMES)


def test_a_real_data_summary_maps_without_other(tmp_path, telemetry):
    from kubetrain_trainer.data import prepare_data

    spec = api.TrainingRunSpec.model_validate(
        {
            "model": {"source": "builtin://tiny-llama"},
            "method": "pretrain",
            "data": {
                "sources": [{"name": "corpus", "uri": "builtin://quickstart-corpus"}],
                "sequenceLength": 64,
            },
            "hyperparameters": {"maxSteps": 1},
        }
    )
    prepare_data(spec, tmp_path, vocab_size=300, seed=1, log=lambda _: None)
    summary = json.loads((tmp_path / "summary.json").read_text())
    telemetry.set_data_summary(summary)
    (family,) = [f for f in telemetry.collect() if f.name == "kubetrain_trainer_data_documents"]
    counts = {(s.labels["stage"], s.labels["outcome"]): s.value for s in family.samples}
    assert OTHER not in {label for key in counts for label in key}
    for stage in ("filter", "exact_dedup", "near_dedup"):
        dropped = sum(
            v for (st, out), v in counts.items() if st == stage and out not in ("in", "kept")
        )
        assert counts[(stage, "in")] == counts[(stage, "kept")] + dropped > 0
    assert counts[("split", "train")] == summary["documents"]["train"]


def test_checkpoint_age_is_computed_at_scrape_time(telemetry, clock, base_url):
    telemetry.record_checkpoint(5, "/ckpt/step-000005", 1.0)
    clock.now += 30
    assert value(scrape(base_url), "kubetrain_trainer_checkpoint_age_seconds") == 30
    clock.now += 45  # nothing recorded in between: only the scrape time moved
    assert value(scrape(base_url), "kubetrain_trainer_checkpoint_age_seconds") == 75
    # An explicit commit time, e.g. the checkpoint a run resumed from.
    telemetry.record_checkpoint(4, "/ckpt/step-000004", 1.0, committed_at=clock.now - 600)
    assert value(scrape(base_url), "kubetrain_trainer_checkpoint_age_seconds") == 600


def test_checkpoint_age_grows_on_the_real_clock():
    telemetry = Telemetry("r", "m")
    telemetry.record_checkpoint(1, "/ckpt/step-000001", 0.5)

    def age() -> float:
        (sample,) = [
            s
            for f in telemetry.collect()
            for s in f.samples
            if s.name == "kubetrain_trainer_checkpoint_age_seconds"
        ]
        return sample.value

    first = age()
    threading.Event().wait(0.05)
    assert age() >= first + 0.04


def test_progress_document(telemetry, clock, base_url):
    train_a_little(telemetry, clock)
    telemetry.record_checkpoint(10, "/ckpt/step-000010", 3.25)
    telemetry.record_eval(10, {"perplexity": 41.2}, gate={"passed": False, "failures": ["x"]})
    status, content_type, body = get(f"{base_url}/progress")
    assert status == 200
    assert content_type == "application/json"
    progress = json.loads(body)
    assert progress == {
        "phase": "Running",
        "step": 10,
        "totalSteps": 100,
        "percent": 10,
        "epoch": 0.2,
        "loss": pytest.approx(3.0),
        "tokensPerSecond": 5120.0,
        "mfu": 0.42,
        "etaSeconds": 180,  # 90 steps left at 0.5 steps/s
        # sft reports no reward numbers: null, as every unknown number is.
        "rewardMean": None,
        "rewardStd": None,
        "rewardMargin": None,
        "rewardAccuracy": None,
        "kl": None,
        # No plan given, no peak measured yet.
        "memoryPlannedBytes": None,
        "memoryPeakBytes": None,
        "latestCheckpoint": {
            "step": 10,
            "path": "/ckpt/step-000010",
            "time": "2026-01-01T00:00:20Z",
        },
        "evaluation": {
            "step": 10,
            "metrics": {"perplexity": 41.2},
            "gate": {"passed": False, "failures": ["x"]},
        },
        "updatedAt": "2026-01-01T00:00:20Z",
    }
    # The operator copies these straight into status: the API models accept them.
    fields = {f.alias for f in api.Progress.model_fields.values()}
    api.Progress.model_validate({k: v for k, v in progress.items() if k in fields})
    assert fields - set(progress) == set()
    api.CheckpointRef.model_validate(progress["latestCheckpoint"])
    api.EvaluationStatus.model_validate(progress["evaluation"])


# Step events of the preference and RL methods, as loop.py emits them (minus kind and
# time): each carries its own numbers and None for those it has not.
DPO_STEP = {"step": 4, "loss": 0.6, "reward_margin": 0.35, "reward_accuracy": 0.75}
GRPO_STEP = {
    "step": 5,
    "loss": 0.1,
    "reward_mean": 0.625,
    "reward_std": 0.25,
    "kl": 0.0125,
    "reward_margin": None,
    "reward_accuracy": None,
}


def test_reward_numbers_reach_the_gauges_and_the_progress_document(telemetry, base_url):
    telemetry.update(total_steps=10, **DPO_STEP)
    samples = scrape(base_url)
    assert value(samples, "kubetrain_trainer_reward_margin") == 0.35
    assert value(samples, "kubetrain_trainer_reward_accuracy") == 0.75
    assert ("kubetrain_trainer_reward_mean", ()) not in samples  # dpo has none
    progress = json.loads(get(f"{base_url}/progress")[2])
    assert (progress["rewardMargin"], progress["rewardAccuracy"]) == (0.35, 0.75)
    assert (progress["rewardMean"], progress["rewardStd"], progress["kl"]) == (None,) * 3

    # A None clears a number: nothing stale survives into the next method's steps.
    telemetry.update(**GRPO_STEP)
    samples = scrape(base_url)
    assert value(samples, "kubetrain_trainer_reward_mean") == 0.625
    assert value(samples, "kubetrain_trainer_reward_std") == 0.25
    assert value(samples, "kubetrain_trainer_kl") == 0.0125
    assert ("kubetrain_trainer_reward_margin", ()) not in samples
    assert ("kubetrain_trainer_reward_accuracy", ()) not in samples
    progress = json.loads(get(f"{base_url}/progress")[2])
    assert {k: progress[k] for k in ("rewardMean", "rewardStd", "kl", "rewardMargin")} == {
        "rewardMean": 0.625,
        "rewardStd": 0.25,
        "kl": 0.0125,
        "rewardMargin": None,
    }


def test_reward_numbers_reach_the_run_status_as_the_operator_reads_them(telemetry, base_url):
    """The whole path: a step event, the head's /progress over HTTP, the operator's
    lenient parse, status.progress."""
    from kubetrain_operator.progress import parse
    from kubetrain_operator.results import copy_progress

    telemetry.update(total_steps=10, **GRPO_STEP)
    status: dict = {}
    copy_progress(status, parse(get(f"{base_url}/progress")[2].encode()))
    assert status["progress"] == {
        "step": 5,
        "totalSteps": 10,
        "percent": 50,
        "loss": 0.1,
        "rewardMean": 0.625,
        "rewardStd": 0.25,
        "kl": 0.0125,
        "updatedAt": "2026-01-01T00:00:00Z",
    }


def test_a_non_finite_reward_is_null_in_the_progress_document(telemetry, base_url):
    telemetry.update(step=1, reward_mean=float("nan"), kl=float("inf"), reward_std=0.5)
    progress = json.loads(get(f"{base_url}/progress")[2])
    assert (progress["rewardMean"], progress["kl"], progress["rewardStd"]) == (None, None, 0.5)


def test_every_api_evaluation_metric_is_exported(telemetry):
    """The grpo evaluation's `reward` among them: an unknown metric is never a label value."""
    from typing import get_args

    assert set(EVAL_METRICS) == set(get_args(api.EvalMetric))
    telemetry.record_eval(3, {"reward": 0.5, "prompts/reward": 0.25})
    (family,) = [f for f in telemetry.collect() if f.name == "kubetrain_trainer_eval"]
    found = {(s.labels["metric"], s.labels["dataset"]): s.value for s in family.samples}
    assert found == {("reward", ""): 0.5, ("reward", "prompts"): 0.25}


def test_progress_before_anything_happened_is_all_null(telemetry):
    progress = telemetry.progress()
    assert progress["phase"] == PHASES[0]
    assert {k for k, v in progress.items() if v is not None} == {"phase"}


def test_eta_uses_the_recent_step_rate_and_resets_on_resume(telemetry, clock):
    telemetry.update(step=0, total_steps=1000)
    for step in range(1, 40):
        clock.now += 10.0 if step < 20 else 1.0  # slow at first, then 1 step/s
        telemetry.update(step=step)
    assert telemetry.progress()["etaSeconds"] == 1000 - 39  # only the recent window counts
    clock.now += 5
    telemetry.update(step=10)  # a retry resumed from an earlier checkpoint
    assert telemetry.progress()["etaSeconds"] is None
    clock.now += 4
    telemetry.update(step=12)
    assert telemetry.progress()["etaSeconds"] == (1000 - 12) * 2


def test_non_finite_values_stay_valid_json(telemetry, base_url):
    telemetry.update(step=3, total_steps=10, loss=float("nan"), grad_norm=float("inf"))
    telemetry.record_eval(3, {"loss": 800.0, "perplexity": float("inf")})
    progress = json.loads(get(f"{base_url}/progress")[2])
    assert progress["loss"] is None
    assert progress["evaluation"]["metrics"] == {"loss": 800.0}
    samples = scrape(base_url)  # Prometheus has NaN and +Inf
    assert value(samples, "kubetrain_trainer_grad_norm") == float("inf")


def test_health_and_unknown_paths(base_url):
    assert get(f"{base_url}/healthz")[::2] == (200, "ok\n")
    with pytest.raises(urllib.error.HTTPError) as err:
        get(f"{base_url}/nope")
    assert err.value.code == 404


def test_bad_input_is_rejected(telemetry):
    with pytest.raises(TypeError, match="unknown telemetry fields"):
        telemetry.update(stpe=3)
    with pytest.raises(ValueError, match="unknown phase"):
        telemetry.set_phase("Dancing")


def test_registry_is_private(telemetry):
    telemetry.update(step=1)
    assert not any(name.startswith("kubetrain_trainer") for name in REGISTRY._names_to_collectors)
    assert Telemetry().registry is not telemetry.registry


def test_label_cardinality_stays_bounded(telemetry, clock):
    """Every series Prometheus would ever store, scraping after each update round."""
    stored: set[tuple[str, tuple[tuple[str, str], ...]]] = set()

    def churn(rounds: int, offset: int) -> None:
        for i in range(offset, offset + rounds):
            clock.now += 1
            fields = dict.fromkeys(TRAINING_FIELDS, 1.0) | {"step": i, "loss": 1 / (i + 1)}
            telemetry.update(**fields)
            telemetry.set_phase(PHASES[i % len(PHASES)])
            telemetry.record_checkpoint(i, f"/ckpt/step-{i:06d}", 0.1)
            metrics = {name: 0.5 for name in EVAL_METRICS}
            metrics |= {f"dataset-{i}/{name}": 0.5 for name in EVAL_METRICS}  # new dataset
            metrics |= {f"free text {i}": 1.0, f"ds/custom-{i}": 1.0, "Bad Name/f1": 1.0}
            telemetry.record_eval(i, metrics, gate=api.GateResult(passed=i % 2 == 0))
            telemetry.set_data_summary(
                {
                    "stages": [
                        {"stage": f"stage-{i}", "dropped": {f"reason-{i}": 1}},
                        {"stage": "filter", "kept": i, f"count-{i}": 1},
                    ]
                }
            )
            stored.update(
                (s.name, tuple(sorted(s.labels.items())))
                for family in telemetry.collect()
                for s in family.samples
            )

    churn(20, 0)
    after_20 = len(stored)
    churn(500, 20)
    assert len(stored) == after_20
    # The hard ceiling from the fixed label sets.
    data_series = (len(DATA_STAGES) + 1) * (len(DATA_OUTCOMES) + 1)
    eval_series = len(EVAL_METRICS) * (MAX_EVAL_DATASETS + 1)
    ceiling = 1 + len(PHASES) + len(TRAINING_FIELDS) + 3 + 1 + eval_series + 1 + data_series
    assert after_20 <= ceiling
    eval_labels = [dict(labels) for name, labels in stored if name == "kubetrain_trainer_eval"]
    datasets = {labels["dataset"] for labels in eval_labels}
    # The first 16 dataset names and the hold-out "": later names are never exported.
    assert datasets == {"", *(f"dataset-{i}" for i in range(MAX_EVAL_DATASETS))}


def test_concurrent_writers_and_scrapers(telemetry, base_url):
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for i in range(300):
                telemetry.update(step=i, total_steps=300, loss=float(n))
                telemetry.record_eval(i, {"loss": 1.0, "sentiment/accuracy": 0.5})
        except BaseException as e:  # surfaced below
            errors.append(e)

    writers = [threading.Thread(target=write, args=(n,)) for n in range(3)]
    for w in writers:
        w.start()
    for _ in range(20):
        scrape(base_url)
        json.loads(get(f"{base_url}/progress")[2])
    for w in writers:
        w.join()
    assert errors == []


def test_the_local_progress_bar_shows_the_numbers_a_step_has(capsys):
    """`kubetrain run`'s bar (real tqdm, on stderr) after sft, dpo and grpo steps."""
    from kubetrain_trainer.local import ProgressBar

    common = {"kind": "step", "tokens_per_second": 5120.0}
    bar = ProgressBar()
    bar({"kind": "phase", "phase": "Running", "total_steps": 10})
    bar({**common, "step": 3, "loss": 2.0, "reward_mean": None, "kl": None})
    sft = capsys.readouterr().err.rsplit("\r", 1)[-1]
    bar({**common, **DPO_STEP})
    dpo = capsys.readouterr().err.rsplit("\r", 1)[-1]
    bar({**common, **GRPO_STEP})
    grpo = capsys.readouterr().err.rsplit("\r", 1)[-1]
    bar.close()
    assert "3/10" in sft
    assert "loss=2.000, tok_s=5120]" in sft  # nothing else
    assert "loss=0.600, tok_s=5120, margin=0.35, acc=0.75]" in dpo
    assert "loss=0.100, tok_s=5120, reward=0.625±0.25, kl=0.0125]" in grpo


def test_the_local_run_prints_the_measured_peaks_once(capsys):
    """`kubetrain run` prints every rank's peak at the first step that carries them."""
    from kubetrain_trainer.local import ProgressBar

    bar = ProgressBar()
    bar({"kind": "phase", "phase": "Running", "total_steps": 10})
    step = {"kind": "step", "loss": 2.0, "tokens_per_second": 100.0}
    bar({**step, "step": 1})
    peaks = {"memory_peak_bytes_by_rank": [60 * 2**20, 61 * 2**20]}
    bar({**step, "step": 2, **peaks})
    bar({**step, "step": 3, **peaks})
    bar.close()
    printed = capsys.readouterr()
    lines = [line for line in (printed.out + printed.err).splitlines() if "memory:" in line]
    assert lines == ["memory: measured peak per training process: rank 0 60.0 MiB, rank 1 61.0 MiB"]


def test_memory_plan_and_per_rank_peaks_reach_gauges_and_status(telemetry, base_url):
    """The driver's plan and the ranks' peaks (a step event, as apply_event routes it):
    one gauge per rank, the busiest rank in the progress document and status.progress."""
    from kubetrain_operator.progress import parse
    from kubetrain_operator.results import copy_progress
    from kubetrain_trainer.driver import apply_event

    telemetry.update(total_steps=10, memory_planned_bytes=64_000_000)
    apply_event(telemetry, {"kind": "step", "step": 2, "memory_peak_bytes_by_rank": None})
    assert json.loads(get(f"{base_url}/progress")[2])["memoryPeakBytes"] is None
    apply_event(
        telemetry,
        {"kind": "step", "step": 3, "memory_peak_bytes_by_rank": [61_000_000, 63_500_000]},
    )
    samples = scrape(base_url)
    assert value(samples, "kubetrain_trainer_memory_planned_bytes") == 64_000_000
    assert value(samples, "kubetrain_trainer_memory_peak_bytes", rank="0") == 61_000_000
    assert value(samples, "kubetrain_trainer_memory_peak_bytes", rank="1") == 63_500_000
    status: dict = {}
    copy_progress(status, parse(get(f"{base_url}/progress")[2].encode()))
    assert status["progress"]["memoryPlannedBytes"] == 64_000_000
    assert status["progress"]["memoryPeakBytes"] == 63_500_000
    # A later step without a measurement keeps the peaks.
    apply_event(telemetry, {"kind": "step", "step": 4, "memory_peak_bytes_by_rank": None})
    assert value(scrape(base_url), "kubetrain_trainer_memory_peak_bytes", rank="1") == 63_500_000
