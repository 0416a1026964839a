"""One training process: build, shard, resume, train, evaluate, checkpoint, export.

`train(job, ...)` is launcher-agnostic: Ray Train calls it through `driver.py`, the
benchmarks call it under torchrun. torch.distributed is already initialized by the caller
when there is more than one process.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from kubetrain_api import v1alpha1 as api
from kubetrain_api.contract import TRAINING_SUMMARY_FILE
from kubetrain_trainer import (
    checkpoint,
    evaluate,
    export,
    lineage,
    metrics,
    models,
    optim,
    run_storage,
    sharded_init,
)
from kubetrain_trainer.alignment import objective
from kubetrain_trainer.config import TrainConfig
from kubetrain_trainer.data.shards import open_split
from kubetrain_trainer.parallelize import compute_dtype, set_gradient_sync
from kubetrain_trainer.peak_memory import PeakMemory
from kubetrain_trainer.sampler import DataOrder

Report = Callable[[dict[str, Any]], None]
LOG_INTERVAL_STEPS_GPU = 10


@dataclass
class WorkerContext:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    report: Report = field(default=lambda event: None)
    # Wall-clock marks (time.time()) of the launch before this process trained: the
    # launcher's own, reported with the `setup` event to show where start-up time went.
    startup: dict[str, float] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one rank's step (dropout): a function of (seed, step, rank) alone, so
    a resumed run draws what a straight run draws without restoring RNG states, whatever
    the world size it resumes at (checkpoint.py, Elastic resume)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0])


def _device(config: TrainConfig, ctx: WorkerContext) -> torch.device:
    if config.use_gpu:
        torch.cuda.set_device(ctx.local_rank)
        # What fp32 matmuls remain (loss, fp32 runs) may use TF32 tensor cores.
        torch.set_float32_matmul_precision("high")
        return torch.device("cuda", ctx.local_rank)
    return torch.device("cpu")


def _tensors(rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """`input_ids`, `labels` and, when the preparation has them, per-document
    `position_ids` (they keep packed documents from attending to each other)."""
    return {k: torch.from_numpy(v.astype(np.int64)) for k, v in rows.items()}


def _all_sum_tensor(value: torch.Tensor) -> torch.Tensor:
    """Sum over processes, on the device: no host sync."""
    if dist.is_initialized():
        dist.all_reduce(value)
    return value


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host to device; on CUDA through pinned memory, so the copy does not block the host."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def trained_tokens(labels: torch.Tensor) -> int:
    """Tokens a batch trains on: labels other than IGNORE_INDEX, after the causal shift
    (a row's first label is never predicted)."""
    return int(trained_token_count(labels))


def trained_token_count(labels: torch.Tensor) -> torch.Tensor:
    """`trained_tokens` as a 0-d tensor on the labels' device (no host sync)."""
    return (labels[:, 1:] != evaluate.IGNORE_INDEX).sum()


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross entropy over the batch's trained tokens (0 when it has none). The same
    function as `evaluate.evaluate_loss`, so training and validation loss measure the same
    thing. `position_ids`, when present, mark packed documents."""
    # No KV cache while training: it costs memory, and with one transformers ignores the
    # document boundaries in position_ids (it builds the packed mask only without a cache).
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    return evaluate.next_token_loss_sum(logits, batch["labels"])


def accumulate_gradients(
    model: torch.nn.Module, micro_batches: list[dict[str, torch.Tensor]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward over this process's micro-batches so that the gradients, once reduced, are
    those of the mean loss over every trained token of the global batch (all micro-batches
    of all processes), whatever the split. Returns that mean loss and the global count.

    As HF Trainer's `num_items_in_batch` and torchtitan do: count the global trained tokens
    first, then backpropagate each micro-batch's loss SUM divided by that count. FSDP2 and
    DDP average gradients over processes, so the loss is multiplied by the world size to
    turn their mean back into the sum.

    Both come back as 0-d tensors on `device`: nothing here reads the device from the host
    (a sync per micro-batch on GPU); the caller does, at its logging steps."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    local = torch.zeros((), dtype=torch.int64, device=device)
    for b in micro_batches:
        local += trained_token_count(b["labels"])
    total = _all_sum_tensor(local)
    # Without trained tokens anywhere every summed loss is 0: divide by 1, not by 0.
    divisor = total.clamp(min=1).double()
    scale = world / divisor
    summed = torch.zeros((), dtype=torch.float64, device=device)
    for m, batch in enumerate(micro_batches):
        set_gradient_sync(model, m == len(micro_batches) - 1)
        loss = loss_sum(model, batch)
        (loss * scale.to(loss.dtype)).backward()
        summed += loss.detach()
    return _all_sum_tensor(summed) / divisor, total


class Trainer:
    """The pieces of one process's training run, built once; `fit()` runs it."""

    def __init__(self, config: TrainConfig, ctx: WorkerContext):
        self.config, self.ctx = config, ctx
        self.spec = config.spec
        self.device = _device(config, ctx)
        hp = config.hp
        _seed_everything(hp.seed)  # identical initial weights on every rank

        self.tokenizer = self._tokenizer()
        # Rows are read by index from memory-mapped token shards, nothing up front, so a
        # rank's memory does not grow with the corpus.
        self.train_data = open_split(config.data_dir, "train")
        self.val_data = open_split(config.data_dir, "validation")
        rows = self.train_data.rows
        if rows == 0:
            raise ValueError("no training rows after data preparation; see data/summary.json")
        self.total_steps = config.total_steps(rows)
        self.order = DataOrder(rows, config, hp.seed)

        # Built on the meta device and materialized shard by shard: no rank holds it all.
        self.model, self.shape = sharded_init.build_for_training(
            config, self.device, vocab_size=len(self.tokenizer)
        )
        # Flash attention keeps packed documents apart only within a single row.
        self.flat_rows = (
            models.uses_flash_attention(self.model) and "position_ids" in self.train_data
        )
        self.optimizer = optim.build_optimizer(self.model, hp)
        self.peak_memory = PeakMemory(self.model, self.optimizer, self.device)
        self.scheduler = optim.build_scheduler(self.optimizer, hp, self.total_steps)
        self.checkpoints = checkpoint.CheckpointManager(
            config.checkpoint_root,
            self.spec.checkpoint.keep_last,
            rank=ctx.rank,
            world_size=ctx.world_size,
        )
        self.flops_per_token = metrics.flops_per_token(
            self.shape.n_params,
            self.shape.n_embedding_params,
            self.shape.n_layers,
            self.shape.n_heads,
            self.shape.head_dim,
            self.spec.data.sequence_length,
            n_frozen_params=self.shape.n_frozen_params,
        )
        self.peak = self._peak_flops()
        self.step = 0
        self.tokens_seen = 0
        # Steps between step events. On CPU reading the loss costs nothing, so every step;
        # on GPU it waits for the device, so only every LOG_INTERVAL_STEPS_GPU.
        self.log_interval = LOG_INTERVAL_STEPS_GPU if config.use_gpu else 1
        # dpo, kto, grpo: their own step and validation, and a frozen reference model.
        self.objective = objective.build(self)
        self._built = time.time()

    def _tokenizer(self) -> Any:
        local = self.config.data_dir / "tokenizer"
        if local.exists():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(local)
        return models.load_tokenizer(self.spec.model, self.config.output_dir / "cache")

    def _peak_flops(self) -> float | None:
        dtype = compute_dtype(self.config)  # the peak of what the matmuls actually run in
        if self.config.use_gpu:
            return metrics.peak_flops(torch.cuda.get_device_name(self.device), dtype)
        # CPU: no published peak, so an in-run matmul ceiling measured once.
        return metrics.measure_matmul_flops(dtype, seconds=0.3) if self.ctx.is_main else None

    def _mfu(self, tokens_per_second: float) -> float | None:
        """Global throughput against the peak of all processes (one device or core each)."""
        if not self.peak:
            return None
        return metrics.mfu(tokens_per_second, self.flops_per_token, self.peak * self.ctx.world_size)

    # ----------------------------------------------------------------------------------

    def resume(self) -> None:
        extra = self.checkpoints.resume(
            self.model, self.optimizer, self.scheduler, policy=self.spec.checkpoint.resume
        )
        if extra:
            self.step, self.tokens_seen = int(extra["step"]), int(extra["tokens_seen"])
            self._log(f"resumed from step {self.step}")
            # So checkpoint age and status.checkpoints survive restarts; the loaded one, which
            # differs from `latest` when resuming an older step (a new timeline).
            if self.checkpoints.loaded is not None:
                self._announce(self.checkpoints.loaded)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over `grad_accum_steps` micro-batches; the loss is the mean
        over the trained tokens of the whole global batch. Loss, grad norm and trained
        tokens stay on the device (0-d tensors); `fit` reads them at logging steps."""
        self.model.train()
        _seed_everything(step_seed(self.config.hp.seed, self.step, self.ctx.rank))
        micro = [
            (
                rows,
                self._model_batch(
                    {
                        k: _to_device(v, self.device)
                        for k, v in _tensors(self.train_data.take(rows)).items()
                    }
                ),
            )
            for rows in self.order.micro_batches(self.step, self.ctx.rank)
        ]
        numbers: dict[str, torch.Tensor] = {}
        with self.peak_memory.step():
            if self.objective is not None:
                out = self.objective.accumulate(self.model, micro)
                loss, trained, numbers = out.loss, out.trained, out.numbers
                tokens = out.tokens
            else:
                micro_batches = [batch for _, batch in micro]
                loss, trained = accumulate_gradients(self.model, micro_batches, self.device)
                tokens = sum(int(b["input_ids"].numel()) for b in micro_batches)
            grad_norm = self._clip()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += tokens * self.ctx.world_size
        return {
            "loss": loss,
            "grad_norm": grad_norm,
            "tokens": tokens * self.ctx.world_size,
            "trained_tokens": trained,
            "numbers": numbers,
        }

    def _memory_peaks(self) -> list[int] | None:
        """Every rank's peak memory so far (a collective on every rank at the same step),
        when it may have changed; None otherwise."""
        if not self.peak_memory.changed():
            return None
        peak = self.peak_memory.peak()
        peaks = _all_gather_int(-1 if peak is None else peak)
        return None if min(peaks) < 0 else peaks

    def _model_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return models.flatten_rows(batch) if self.flat_rows else batch

    def _clip(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.config.hp.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        # FSDP2 returns a DTensor; the full value is the global norm.
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def evaluate(self, final: bool = False) -> dict[str, float]:
        ev = self.spec.evaluation
        results: dict[str, float] = {}
        batches = map(
            self._model_batch,
            map(_tensors, self.val_data.batches(self.config.micro_batch_size, ev.max_batches)),
        )
        if self.objective is not None:
            results.update(self.objective.evaluate(self.model, ev.metrics))
        elif self.val_data.rows:
            loss, _ = evaluate.evaluate_loss(self.model, batches, self.device)
            if "loss" in ev.metrics:
                results["loss"] = loss
            if "perplexity" in ev.metrics:
                results["perplexity"] = evaluate.perplexity(loss)
        labelled = [m for m in ev.metrics if m in ("accuracy", "precision", "recall", "f1")]
        if labelled and ev.datasets:
            results.update(self._labelled_metrics(labelled))
        return results

    def _labelled_metrics(self, wanted: list[str]) -> dict[str, float]:
        from kubetrain_trainer.data import load_eval_examples

        ev = self.spec.evaluation
        out: dict[str, float] = {}
        for ds in ev.datasets:
            if ds.task == "preference":
                if "accuracy" in wanted:  # the one metric of a set of pairs
                    accuracy = self._preference_accuracy(ds)
                    out.setdefault("accuracy", accuracy)
                    out[f"{ds.name}/accuracy"] = accuracy
                continue
            examples = load_eval_examples(ds)
            prompts = [e.prompt for e in examples]
            truth = [e.label for e in examples]
            # Every rank runs the same forward passes: an FSDP2 model is one collective.
            scores = evaluate.score_dataset(
                self.model,
                self.tokenizer,
                ds,
                prompts,
                truth,
                ev.average,
                chat=self.spec.method != "pretrain",
            )
            for name in wanted:
                # The first dataset also reports under the bare name the gate checks.
                out.setdefault(name, scores[name])
                out[f"{ds.name}/{name}"] = scores[name]
        return out

    def _preference_accuracy(self, ds: api.EvalDataset) -> float:
        from kubetrain_trainer.data import load_preference_examples

        return objective.preference_accuracy(
            self.model,
            self.tokenizer,
            load_preference_examples(ds),
            self.spec.data.sequence_length,
            self.config.micro_batch_size,
        )

    def save_checkpoint(self) -> None:
        # Global values only: an elastic resume hands rank 0's extras to every rank.
        extra = {"step": self.step, "tokens_seen": self.tokens_seen}
        save = (
            self.checkpoints.save_async
            if self.spec.checkpoint.async_save
            else self.checkpoints.save
        )
        info = save(self.step, self.model, self.optimizer, self.scheduler, extra=extra)
        if info is not None:  # None: an asynchronous save in flight, committed later
            self._committed(info)

    def commit_checkpoint(self, wait: bool = False) -> None:
        """Commit an asynchronous save whose write has ended (or wait for it)."""
        info = self.checkpoints.wait() if wait else self.checkpoints.poll()
        if info is not None:
            self._committed(info)

    def _committed(self, info: checkpoint.CheckpointInfo) -> None:
        """A checkpoint is committed: announce it, and put the metrics log up to that step
        beside it on an object store (a retry on a fresh pod continues that log)."""
        self._announce(info)
        if self.ctx.is_main:
            run_storage.upload_metrics(self.config)

    def _announce(self, info: checkpoint.CheckpointInfo) -> None:
        self._emit(
            kind="checkpoint",
            step=info.step,
            path=str(info.path),
            duration_s=info.duration_s,
            time=info.time,
        )

    # ----------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        cfg, ev = self.spec.checkpoint, self.spec.evaluation
        if self.ctx.is_main:
            run_storage.restore_metrics(self.config)
        self.resume()
        self._emit(
            kind="setup",
            world_size=self.ctx.world_size,
            params_total=self.shape.n_params,
            params_local=_local_numel(self.model),
            params_local_by_rank=_all_gather_int(_local_numel(self.model)),
            grad_accum_steps=self.config.grad_accum_steps,
            resumed_from=self.step,
            startup={**self.ctx.startup, "trainer_built": self._built, "resumed": time.time()},
        )
        self._emit(kind="phase", phase="Running", total_steps=self.total_steps)
        last_time, tokens_since = time.perf_counter(), 0
        while self.step < self.total_steps:
            out = self.train_step()
            self.commit_checkpoint()
            tokens_since += int(out["tokens"])
            # The loss and grad norm are read to the host only here (a sync on GPU).
            if self.step % self.log_interval == 0 or self.step == self.total_steps:
                now = time.perf_counter()
                tps = tokens_since / max(now - last_time, 1e-9)
                last_time, tokens_since = now, 0
                self._emit(
                    kind="step",
                    step=self.step,
                    total_steps=self.total_steps,
                    loss=float(out["loss"]),
                    grad_norm=float(out["grad_norm"]),
                    learning_rate=self.scheduler.get_last_lr()[0],
                    tokens_per_second=tps,
                    mfu=self._mfu(tps),
                    memory_peak_bytes_by_rank=self._memory_peaks(),
                    epoch=self.order.epoch(self.step),
                    tokens_seen=self.tokens_seen,
                    **{k: float(v) for k, v in out["numbers"].items()},
                )
            if self.step % ev.interval_steps == 0 and self.step < self.total_steps:
                self._emit(kind="eval", step=self.step, metrics=self.evaluate())
            if self.step % cfg.interval_steps == 0 or self.step == self.total_steps:
                self.save_checkpoint()
        self.commit_checkpoint(wait=True)  # the last save commits before export names it
        return self.finish()

    def finish(self) -> dict[str, Any]:
        self._emit(kind="phase", phase="Evaluating")
        final = self.evaluate(final=True)
        gate = evaluate.check_gate(final, self.spec.evaluation.gate)
        self._emit(kind="eval", step=self.step, metrics=final, gate=gate.model_dump())
        model_dir = self._export(final, gate)
        result = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "metrics": final,
            "gate": gate.model_dump(),
            "model": str(model_dir) if model_dir else None,
        }
        if self.ctx.is_main:
            result = run_storage.publish(self.config, result)
            (self.config.output_dir / "result.json").write_text(json.dumps(result, indent=2))
        return result

    def _export(self, final: dict[str, float], gate: api.GateResult) -> Path | None:
        """Gather the full weights (a collective), then rank 0 writes the HF folder."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)
        if not self.ctx.is_main:
            return None
        plain = models.build_model(
            self.spec.model,
            vocab_size=len(self.tokenizer),
            dropout=0.0,
            dtype=self.config.param_dtype,
            cache_dir=self.config.output_dir / "cache",
        )
        if self.spec.lora is not None:
            plain = models.apply_lora(plain, self.spec.lora)
        plain.load_state_dict(state)
        run_info = {
            "name": self.config.name,
            "spec": self.spec.model_dump(by_alias=True, exclude_none=True, mode="json"),
            "step": self.step,
            "tokensSeen": self.tokens_seen,
            "metrics": final,
            "gate": gate.model_dump(),
            "data": _read_json(self.config.data_dir / "summary.json"),
            "checkpoint": str(self.checkpoints.latest().path)
            if self.checkpoints.latest()
            else None,
            "codeVersion": _code_version(),
        }
        record = lineage.build_lineage(
            self.config,
            run_info["data"],
            step=self.step,
            version=run_info["codeVersion"],
            log=self._log,
        )
        return export.export_model(
            plain,
            self.tokenizer,
            self.config.model_dir,
            run_info,
            lineage=record,
            training_summary=_read_json(self.config.data_dir / TRAINING_SUMMARY_FILE),
        )

    # ----------------------------------------------------------------------------------

    def _emit(self, **event: Any) -> None:
        if self.ctx.is_main:
            event.setdefault("time", time.time())
            with self.config.metrics_path.open("a") as f:
                f.write(json.dumps(event, default=str) + "\n")
            self.ctx.report(event)

    def _log(self, message: str) -> None:
        if self.ctx.is_main:
            print(f"[kubetrain] {message}", flush=True)


def _local_numel(model: torch.nn.Module) -> int:
    """Parameters this process holds: its FSDP2 shards, or everything when unsharded."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())


def _all_gather_int(value: int) -> list[int]:
    """`value` from every rank, in rank order (a collective)."""
    if not dist.is_initialized():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return [int(v) for v in out]


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kubetrain")
    except PackageNotFoundError:
        return "unknown"


def train(config: TrainConfig, ctx: WorkerContext) -> dict[str, Any]:
    """Entry point for one process."""
    # Deterministic kernels on CPU, so that crash + resume reproduces a straight run.
    torch.use_deterministic_algorithms(not config.use_gpu, warn_only=True)
    _write_pid(config, ctx)
    trainer = Trainer(config, ctx)
    try:
        return trainer.fit()
    finally:
        trainer.checkpoints.close()  # an asynchronous save still in flight: commit if it ends


def _write_pid(config: TrainConfig, ctx: WorkerContext) -> None:
    """Record this process's pid per rank, so tools and tests can find (and kill) it."""
    import os

    pids = config.output_dir / "pids"
    pids.mkdir(parents=True, exist_ok=True)
    (pids / f"rank{ctx.rank}").write_text(str(os.getpid()))
