"""Training telemetry: FLOPs per token and MFU, and the numbers rank 0 exposes.

`Telemetry` holds the latest snapshot of a run and renders it two ways: Prometheus series
`kubetrain_trainer_*` (its own registry, computed at scrape time, bounded labels only) and a
JSON progress document, a `kubetrain_api.reports.ProgressReport`, which the operator parses
with the same model into `status`. `serve_telemetry` serves both over HTTP.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric

from kubetrain_api.reports import MAX_METRICS, TRAINER_PHASES, ProgressReport, percent
from kubetrain_api.v1alpha1 import CheckpointRef, EvaluationStatus, GateResult

# --------------------------------------------------------------------------------------
# FLOPs and MFU
# --------------------------------------------------------------------------------------


def flops_per_token(
    n_params: int,
    n_embedding_params: int,
    n_layers: int,
    n_heads: int,
    head_dim: int,
    seq_len: int,
    n_frozen_params: int = 0,
) -> float:
    """Training FLOPs per token (PaLM appendix B, as torchtitan and nanoGPT count it).

    Each matmul weight costs 2 FLOPs per token forward, 2 for the input gradient and 2 for
    its own weight gradient: 6 x (parameters without the input embedding, a lookup). A
    frozen weight (a LoRA base) still runs forward and passes the gradient through to its
    input, but gets no weight gradient: 4 per token. So with N the matmul parameters, of
    which `n_frozen_params` are frozen, the weights cost 4 N_frozen + 6 N_trainable
    = 6 N - 2 N_frozen (6 N for a full fine-tune). Attention scores add 12 x L x H x Dh x T
    (forward 4, backward 8; no weights, so freezing changes nothing there).
    """
    if not 0 <= n_frozen_params <= n_params - n_embedding_params:
        raise ValueError(
            f"n_frozen_params {n_frozen_params} must be between 0 and the "
            f"{n_params - n_embedding_params} matmul parameters"
        )
    weights = 6.0 * (n_params - n_embedding_params) - 2.0 * n_frozen_params
    return weights + 12.0 * n_layers * n_heads * head_dim * seq_len


# Published dense (no sparsity) peaks per device, FLOP/s: (bf16/fp16 tensor core,
# tf32 tensor core, fp32 without tensor cores). Matched in order on the lowercased CUDA
# device name, so more specific names come first. None where no figure is published.
_PEAKS: tuple[tuple[str, float, float | None, float | None], ...] = (
    (r"gh200", 989.4e12, 494.7e12, 66.9e12),
    (r"h200.*nvl", 835.5e12, 417.5e12, 60e12),
    (r"h200", 989.4e12, 494.7e12, 66.9e12),
    (r"h100.*nvl", 835.5e12, 417.5e12, 60e12),
    (r"h100.*pcie", 756.5e12, 378e12, 51.2e12),
    (r"h100", 989.4e12, 494.7e12, 66.9e12),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"h800", 989.4e12, 494.7e12, 66.9e12),
    (r"\bh20\b", 148e12, 74e12, 44e12),
    (r"b200", 2250e12, 1100e12, None),
    (r"a100", 312e12, 156e12, 19.5e12),
    (r"a800", 312e12, 156e12, 19.5e12),
    (r"a10g", 125e12, 62.5e12, 31.2e12),  # AWS's A10 variant, listed with the A10's figures
    (r"\ba10\b", 125e12, 62.5e12, 31.2e12),
    (r"l40s", 362.05e12, 183e12, 91.6e12),
    (r"\bl40\b", 181e12, 90.5e12, 90.5e12),
    (r"\bl4\b", 121e12, 60e12, 30.3e12),
    (r"mi325x|mi300x", 1307.4e12, 653.7e12, 163.4e12),
    (r"mi250x", 383e12, None, 95.7e12),
)


def peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """Published dense peak FLOP/s of one accelerator for matmuls in `dtype`, or None for
    an unknown device. float32 counts as TF32 when torch lets matmuls use it."""
    name = device_name.lower()
    for pattern, half, tf32, fp32 in _PEAKS:
        if re.search(pattern, name):
            if dtype in (torch.bfloat16, torch.float16):
                return half
            if dtype == torch.float32:
                return tf32 if torch.get_float32_matmul_precision() != "highest" else fp32
            return None
    return None


def measure_matmul_flops(
    dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.5
) -> float:
    """FLOP/s of square matmuls on the CPU with torch's current thread count: a ceiling to
    compute MFU against where no published peak applies."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)  # warm-up: thread pool and allocator
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or runs == 0:
        torch.mm(a, b)
        runs += 1
    return 2.0 * size**3 * runs / elapsed


def mfu(tokens_per_second: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilization (0-1). `tokens_per_second` and `peak` must cover the same
    devices: for a whole job, pass the peak of one device times the device count."""
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak}")
    return tokens_per_second * flops_per_token / peak


# --------------------------------------------------------------------------------------
# Telemetry
# --------------------------------------------------------------------------------------

PREFIX = "kubetrain_trainer"

# Scalar training fields `Telemetry.update` accepts; each is the gauge PREFIX_<field>.
TRAINING_FIELDS: Mapping[str, str] = {
    "step": "Optimizer steps done.",
    "total_steps": "Optimizer steps planned.",
    "loss": "Latest training loss, mean over ranks.",
    "learning_rate": "Learning rate of the latest step.",
    "tokens_per_second": "Training throughput over all workers.",
    "mfu": "Model FLOPs utilization, 0-1.",
    "grad_norm": "Global gradient norm before clipping.",
    "epoch": "Fractional epoch.",
    "tokens_seen": "Training tokens consumed so far, all workers.",
    "memory_planned_bytes": "The memory plan's peak per training process (kubetrain plan).",
    # Preference and RL methods only (absent, or None, for the others).
    "reward_mean": "grpo: mean reward of the latest step's sampled completions.",
    "reward_std": "grpo: standard deviation of those rewards.",
    "reward_margin": "dpo, kto: mean implicit reward of chosen minus rejected completions.",
    "reward_accuracy": "dpo: share of pairs whose chosen completion has the higher reward, 0-1.",
    "kl": "kto, grpo: estimated KL divergence of the policy from the reference.",
}
# What the trainer is doing; the names it shares with the run's `status.phase` mean the same.
PHASES = TRAINER_PHASES
EVAL_METRICS = ("loss", "perplexity", "accuracy", "precision", "recall", "f1", "reward")
# The spec allows 16 labelled evaluation datasets; this caps the `dataset` label values.
MAX_EVAL_DATASETS = 16
# Stages and outcomes of the data summary (`data.pipeline`); the drop reasons are
# `data.clean.DROP_REASONS`, repeated here so that metrics imports nothing of the pipeline.
DATA_STAGES = ("filter", "exact_dedup", "near_dedup", "split")
DATA_OUTCOMES = (
    "in",
    "kept",
    "empty",
    "too_short",
    "too_long",
    "too_few_words",
    "symbol_ratio",
    "repetition",
    "exact_duplicate",
    "near_duplicate",
    "train",
    "validation",
)
OTHER = "other"  # label value for any stage or outcome outside the fixed sets
_DATASET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_ETA_WINDOW = 20  # recent (time, step) samples the step rate is measured over


def _finite(value: float | None) -> float | None:
    """JSON has no NaN or infinity: such values become null."""
    return value if value is not None and math.isfinite(value) else None


def _whole(value: float | None) -> int | None:
    return None if value is None else int(value)


def _moment(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, timezone.utc)


def _data_counts(summary: Mapping[str, Any]) -> dict[tuple[str, str], float]:
    """(stage, outcome) -> documents, from a data summary: each entry of `stages`
    (`{"stage": "filter", "in": 100, "kept": 90, "dropped": {"too_short": 10}}`, the nested
    counts by drop reason) and the final split (`documents.train`, `documents.validation`).
    Names outside the fixed sets fold into `other`, so the series stay bounded whatever the
    pipeline reports."""
    counts: dict[tuple[str, str], float] = {}

    def add(stage: str, outcome: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for reason, n in value.items():
                add(stage, reason, n)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            key = (stage, outcome if outcome in DATA_OUTCOMES else OTHER)
            counts[key] = counts.get(key, 0) + value

    for entry in summary.get("stages", []):
        stage = entry.get("stage")
        for outcome, value in entry.items():
            add(stage if stage in DATA_STAGES else OTHER, outcome, value)
    documents = summary.get("documents", {})
    for outcome in ("train", "validation"):
        add("split", outcome, documents.get(outcome))
    return counts


class Telemetry:
    """Thread-safe latest snapshot of one training run, exported as Prometheus series from
    its own registry (`self.registry`) and as a progress document (`progress()`)."""

    def __init__(
        self, run_name: str = "", model: str = "", *, clock: Callable[[], float] = time.time
    ):
        self._lock = threading.Lock()
        self._clock = clock
        self._info = {"run": run_name, "model": model}
        self._fields: dict[str, float] = {}
        self._phase = PHASES[0]
        self._steps: deque[tuple[float, float]] = deque(maxlen=_ETA_WINDOW)
        self._checkpoint: dict[str, Any] | None = None
        self._eval: dict[str, Any] | None = None
        self._data: dict[tuple[str, str], float] = {}
        self._eval_datasets: set[str] = set()
        self._updated_at: float | None = None
        self._memory_peaks: list[int] = []
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)

    # ---- writers ------------------------------------------------------------------

    def update(self, **fields: float | None) -> None:
        """Set training fields (names from TRAINING_FIELDS); None clears one."""
        unknown = set(fields) - set(TRAINING_FIELDS)
        if unknown:
            raise TypeError(f"unknown telemetry fields {sorted(unknown)}")
        with self._lock:
            now = self._touch()
            for name, value in fields.items():
                if value is None:
                    self._fields.pop(name, None)
                else:
                    self._fields[name] = float(value)
            step = fields.get("step")
            if step is not None:
                if self._steps and step < self._steps[-1][1]:
                    self._steps.clear()  # resumed from an earlier checkpoint
                self._steps.append((now, float(step)))

    def set_memory_peaks(self, peaks: Sequence[int]) -> None:
        """Each training process's peak allocated memory, in rank order."""
        with self._lock:
            self._touch()
            self._memory_peaks = [int(p) for p in peaks]

    def record_eval(
        self,
        step: int,
        metrics: Mapping[str, float],
        gate: GateResult | Mapping[str, Any] | None = None,
    ) -> None:
        """Latest evaluation. Keys are metric names, optionally `dataset/metric`."""
        verdict = None if gate is None else GateResult.model_validate(gate)
        with self._lock:
            self._touch()
            self._eval = {
                "step": step,
                "metrics": {k: float(v) for k, v in metrics.items()},
                "gate": verdict,
            }

    def record_checkpoint(
        self,
        step: int,
        path: str,
        duration_s: float,
        *,
        committed_at: float | datetime | None = None,
    ) -> None:
        """A committed checkpoint; `committed_at` (epoch seconds or datetime) defaults to now.
        Pass it when re-announcing the checkpoint a run resumed from, so its age is right."""
        if isinstance(committed_at, datetime):
            committed_at = committed_at.timestamp()
        with self._lock:
            now = self._touch()
            self._checkpoint = {
                "step": step,
                "path": str(path),
                "duration_s": float(duration_s),
                "time": now if committed_at is None else committed_at,
            }

    def set_data_summary(self, summary: Mapping[str, Any]) -> None:
        """Document counts per data preparation stage and outcome, from the pipeline's
        summary.json (see `_data_counts`)."""
        counts = _data_counts(summary)
        with self._lock:
            self._touch()
            self._data = counts

    def set_phase(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
        with self._lock:
            self._touch()
            self._phase = phase

    def _touch(self) -> float:
        self._updated_at = self._clock()
        return self._updated_at

    # ---- readers ------------------------------------------------------------------

    def _eta_seconds(self) -> int | None:
        total = self._fields.get("total_steps")
        if total is None or len(self._steps) < 2:
            return None
        (t0, s0), (t1, s1) = self._steps[0], self._steps[-1]
        if t1 <= t0 or s1 <= s0:
            return None
        return max(0, round((total - s1) * (t1 - t0) / (s1 - s0)))

    def progress(self) -> dict[str, Any]:
        """The `/progress` document: a `kubetrain_api.reports.ProgressReport` (the
        `Progress` fields, phase, latest checkpoint and evaluation) as JSON, nulls kept."""
        with self._lock:
            f = self._fields
            step = None if f.get("step") is None else int(f["step"])
            total = None if f.get("total_steps") is None else int(f["total_steps"])
            checkpoint = evaluation = None
            if self._checkpoint is not None:
                checkpoint = CheckpointRef(
                    step=self._checkpoint["step"],
                    path=self._checkpoint["path"],
                    time=_moment(self._checkpoint["time"]),
                )
            if self._eval is not None:
                metrics = [(k, v) for k, v in self._eval["metrics"].items() if math.isfinite(v)]
                evaluation = EvaluationStatus(
                    step=self._eval["step"],
                    metrics=dict(metrics[:MAX_METRICS]),
                    gate=self._eval["gate"],
                )
            report = ProgressReport(
                phase=self._phase,
                step=step,
                total_steps=total,
                percent=percent(step, total),
                epoch=_finite(f.get("epoch")),
                loss=_finite(f.get("loss")),
                tokens_per_second=_finite(f.get("tokens_per_second")),
                mfu=_finite(f.get("mfu")),
                eta_seconds=self._eta_seconds(),
                reward_mean=_finite(f.get("reward_mean")),
                reward_std=_finite(f.get("reward_std")),
                reward_margin=_finite(f.get("reward_margin")),
                reward_accuracy=_finite(f.get("reward_accuracy")),
                kl=_finite(f.get("kl")),
                memory_planned_bytes=_whole(f.get("memory_planned_bytes")),
                memory_peak_bytes=max(self._memory_peaks) if self._memory_peaks else None,
                latest_checkpoint=checkpoint,
                evaluation=evaluation,
                updated_at=_moment(self._updated_at),
            )
        return report.model_dump(mode="json", by_alias=True)

    def collect(self) -> list[Metric]:
        """Prometheus collector protocol: every series from the snapshot, at scrape time."""
        with self._lock:
            return list(self._families())

    def _families(self) -> Iterator[Metric]:
        yield InfoMetricFamily(f"{PREFIX}_run", "The training run.", value=self._info)
        phase = GaugeMetricFamily(f"{PREFIX}_phase", "1 for the current phase.", labels=["phase"])
        for name in PHASES:
            phase.add_metric([name], 1.0 if name == self._phase else 0.0)
        yield phase
        for name, value in self._fields.items():
            yield GaugeMetricFamily(f"{PREFIX}_{name}", TRAINING_FIELDS[name], value=value)
        if self._steps:
            # Lets an alert tell a stalled run from a slow one: `time() - this` > N minutes.
            yield GaugeMetricFamily(
                f"{PREFIX}_last_step_timestamp_seconds",
                "Unix time the latest step was reported.",
                self._steps[-1][0],
            )
        peaks = GaugeMetricFamily(
            f"{PREFIX}_memory_peak_bytes",
            "Peak memory allocated by each training process (GPU: the CUDA allocator's "
            "peak; CPU: tensors tracked over the attempt's second step).",
            labels=["rank"],
        )
        for rank, peak in enumerate(self._memory_peaks):
            peaks.add_metric([str(rank)], peak)
        yield peaks
        yield from self._checkpoint_metrics()
        yield from self._eval_metrics()
        data = GaugeMetricFamily(
            f"{PREFIX}_data_documents",
            "Documents per data preparation stage and outcome.",
            labels=["stage", "outcome"],
        )
        for (stage, outcome), count in sorted(self._data.items()):
            data.add_metric([stage, outcome], count)
        yield data

    def _checkpoint_metrics(self) -> Iterator[Metric]:
        if self._checkpoint is None:
            return
        c = self._checkpoint
        yield GaugeMetricFamily(
            f"{PREFIX}_checkpoint_step", "Step of the latest committed checkpoint.", c["step"]
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_checkpoint_duration_seconds", "Duration of the last save.", c["duration_s"]
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_checkpoint_age_seconds",
            "Seconds since the latest checkpoint was committed.",
            max(0.0, self._clock() - c["time"]),
        )

    def _eval_metrics(self) -> Iterator[Metric]:
        if self._eval is None:
            return
        yield GaugeMetricFamily(
            f"{PREFIX}_eval_step", "Step of the latest evaluation.", self._eval["step"]
        )
        family = GaugeMetricFamily(
            f"{PREFIX}_eval",
            "Latest evaluation metric; dataset is empty for the validation split.",
            labels=["metric", "dataset"],
        )
        for key, value in sorted(self._eval["metrics"].items()):
            labels = self._eval_labels(key)
            if labels is not None:
                family.add_metric(labels, value)
        yield family
        gate = self._eval["gate"]
        if gate is not None and gate.passed is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_gate_passed", "1 when the serving gate passed.", float(gate.passed)
            )

    def _eval_labels(self, key: str) -> list[str] | None:
        """[metric, dataset] for a known metric and an admissible dataset name, else None:
        unbounded names never become label values."""
        dataset, _, metric = key.rpartition("/")
        if metric not in EVAL_METRICS:
            return None
        if dataset and dataset not in self._eval_datasets:
            if len(self._eval_datasets) >= MAX_EVAL_DATASETS or not _DATASET_NAME.match(dataset):
                return None
            self._eval_datasets.add(dataset)
        return [metric, dataset]


# --------------------------------------------------------------------------------------
# HTTP endpoint
# --------------------------------------------------------------------------------------


def _handler(telemetry: Telemetry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(telemetry.registry))
            elif path == "/progress":
                body = json.dumps(telemetry.progress(), allow_nan=False).encode()
                self._send(200, "application/json", body)
            elif path == "/healthz":
                self._send(200, "text/plain; charset=utf-8", b"ok\n")
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found\n")

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Silent: a scrape every few seconds would drown the training log."""

    return Handler


def serve_telemetry(
    telemetry: Telemetry, host: str = "0.0.0.0", port: int = 0
) -> tuple[ThreadingHTTPServer, int]:
    """Serve GET /metrics, /progress and /healthz from a daemon thread; returns the server
    and its bound port (port 0 picks a free one). `server.shutdown()` stops it."""
    server = ThreadingHTTPServer((host, port), _handler(telemetry))
    server.daemon_threads = True
    threading.Thread(
        target=server.serve_forever, args=(0.1,), name="kubetrain-telemetry", daemon=True
    ).start()
    return server, server.server_address[1]
