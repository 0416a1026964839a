"""The Ray driver: prepares the data once, then runs the training loop on every worker
through Ray Train's `TorchTrainer`, restarting failed workers (`FailureConfig`, up to
`max_failures`: 0 on Kubernetes, where the operator retries attempts) from the latest
committed checkpoint.

On Kubernetes it runs in the Ray head pod (`ray.init(address="auto")`); on a laptop it
starts a local Ray instance. Rank 0 pushes progress events to a small mailbox actor; the
driver drains it into the telemetry (Prometheus `/metrics`, JSON `/progress`) and any
listener (the local progress bar).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from kubetrain_api import contract, memory
from kubetrain_api import v1alpha1 as api
from kubetrain_api.contract import WORKER_SLOT_RESOURCE
from kubetrain_trainer import metrics, planning, run_storage
from kubetrain_trainer.config import TrainConfig, resolve
from kubetrain_trainer.exits import RayUnavailable, SpecFailure
from kubetrain_trainer.mailbox import Mailbox
from kubetrain_trainer.prepare import prepare
from kubetrain_trainer.signals import stop_on_sigterm

Listener = Callable[[dict[str, Any]], None]


def _worker_entry(payload: dict[str, Any]) -> None:
    """Runs in each Ray Train worker process."""
    entered = time.time()
    from kubetrain_trainer.loop import WorkerContext, train

    imported = time.time()

    context = ray.train.get_context()
    run = api.TrainingRun.model_validate(payload["run"])
    config = resolve(
        run,
        Path(payload["output_dir"]),
        use_gpu=payload["use_gpu"],
        world_size=context.get_world_size(),
        remote_root=payload.get("remote_root"),
    )
    run_storage.fetch_data(config, context.get_local_rank())
    _record_placement(config.output_dir, context)
    mailbox = payload["mailbox"]
    ctx = WorkerContext(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        local_rank=context.get_local_rank(),
        report=lambda event: mailbox.push.remote(event),
        startup={**payload["startup"], "worker_entry": entered, "imports_done": imported},
    )
    train(config, ctx)


def _record_placement(output_dir: Path, context: Any) -> None:
    """Write where this rank runs (Ray node, host), for operators and tests to check."""
    import os
    import socket

    folder = output_dir / "placement"
    folder.mkdir(parents=True, exist_ok=True)
    rank = context.get_world_rank()
    record = {
        "rank": rank,
        "local_rank": context.get_local_rank(),
        "world_size": context.get_world_size(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
    }
    (folder / f"rank{rank}.json").write_text(json.dumps(record))


def scaling_config(config: TrainConfig) -> ScalingConfig:
    """One Ray Train worker per rank; each takes one worker slot (see
    contract.WORKER_SLOT_RESOURCE), so every worker pod gets exactly its share and the
    head, which advertises none, gets no rank."""
    per_rank = {WORKER_SLOT_RESOURCE: 1.0, "GPU" if config.use_gpu else "CPU": 1.0}
    return ScalingConfig(
        num_workers=config.world_size, use_gpu=config.use_gpu, resources_per_worker=per_rank
    )


def missing_slots_note(config: TrainConfig) -> str | None:
    """Say so when the Ray cluster has fewer worker slots than ranks: Ray Train then waits
    for them (worker pods still joining), or forever on a cluster not started the way the
    operator starts it."""
    slots = int(ray.cluster_resources().get(WORKER_SLOT_RESOURCE, 0))
    if slots >= config.world_size:
        return None
    return (
        f"waiting for {config.world_size} {WORKER_SLOT_RESOURCE} Ray resources "
        f"(workers x processesPerWorker), the cluster has {slots} so far; each worker must "
        f"be started with ray start --resources='{{\"{WORKER_SLOT_RESOURCE}\": N}}'"
    )


class TelemetryPump:
    """Moves events from the mailbox to the telemetry and listeners, in a thread."""

    def __init__(self, mailbox: Any, telemetry: metrics.Telemetry, listeners: list[Listener]):
        self.mailbox, self.telemetry, self.listeners = mailbox, telemetry, listeners
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="telemetry-pump", daemon=True)

    def __enter__(self) -> TelemetryPump:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.pump()  # the last events

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.pump()

    def pump(self) -> None:
        for event in ray.get(self.mailbox.drain.remote()):
            apply_event(self.telemetry, event)
            for listener in self.listeners:
                listener(event)


def apply_event(telemetry: metrics.Telemetry, event: dict[str, Any]) -> None:
    """Route one rank-0 event to the telemetry."""
    kind = event.get("kind")
    if kind == "step":
        fields = {k: v for k, v in event.items() if k not in ("kind", "time")}
        peaks = fields.pop("memory_peak_bytes_by_rank", None)
        telemetry.update(**fields)
        if peaks:
            telemetry.set_memory_peaks(peaks)
    elif kind == "eval":
        telemetry.record_eval(event["step"], event["metrics"], gate=event.get("gate"))
    elif kind == "checkpoint":
        telemetry.record_checkpoint(
            event["step"], event["path"], event["duration_s"], committed_at=event.get("time")
        )
    elif kind == "phase":
        telemetry.set_phase(event["phase"])
        if event.get("total_steps"):
            telemetry.update(total_steps=event["total_steps"])


def plan_memory(config: TrainConfig, log: Callable[[str], None]) -> memory.MemoryPlan | None:
    """The run's memory plan at the world size and device it got, logged. One that does
    not fit its GPU by more than the plan's tolerance is the spec's failure (exit code
    invalid spec, naming the cheapest fix); without the model's config there is no plan
    and training goes on."""
    try:
        plan, _ = planning.plan_run(
            config.spec, config.output_dir / "cache", world=config.world_size, gpu=config.use_gpu
        )
    except SpecFailure as exc:
        log(f"memory plan skipped: {exc}")
        return None
    if plan.gpu_memory is not None:
        against = f"{plan.verdict} in {memory.format_bytes(plan.gpu_memory)} ({plan.gpu_product})"
    elif config.use_gpu:
        against = "GPU memory unknown (set resources.gpuMemory)"
    else:
        against = "on CPUs"
    log(
        f"memory plan: {memory.format_bytes(plan.training.total)} per training process, "
        f"{against} (kubetrain plan shows the terms)"
    )
    message = memory.fit_message(plan)
    if message is not None and plan.verdict == "does-not-fit":
        raise SpecFailure(message)
    if message is not None:
        log(f"warning: {message}")
    return plan


def _timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    return fn(*args, **kwargs), time.time()


def run_training(
    run: api.TrainingRun,
    output_dir: Path,
    *,
    address: str | None = None,
    world_size: int | None = None,
    use_gpu: bool | None = None,
    max_failures: int = 3,
    telemetry: metrics.Telemetry | None = None,
    listeners: list[Listener] | None = None,
    log: Callable[[str], None] = print,
    remote_root: str | None = None,
) -> dict[str, Any]:
    """Prepare data, train on a Ray cluster, and return the result rank 0 wrote. With a
    `remote_root` (kubetrain_trainer.run_storage) `output_dir` is scratch and the run's
    files live there."""
    startup = {"driver_start": time.time()}
    config = resolve(
        run, output_dir, use_gpu=use_gpu, world_size=world_size, remote_root=remote_root
    )
    config.output_dir.mkdir(parents=True, exist_ok=True)
    telemetry = telemetry or metrics.Telemetry()
    telemetry.set_phase("Preparing")
    # Before any data is prepared or worker trains: a run that cannot fit stops here.
    if (memory_plan := plan_memory(config, log)) is not None:
        telemetry.update(memory_planned_bytes=memory_plan.training.total)
    # Ray starts while the data is prepared (or found prepared): both take seconds, and
    # ray.init mostly waits on the processes it spawns.
    # A large input waits for Ray, then runs as Ray tasks (prepare.py).
    ray_ready = threading.Event()
    with ThreadPoolExecutor(1, thread_name_prefix="prepare") as pool:
        prepared = pool.submit(
            _timed, run_storage.prepare, config, partial(prepare, ray_ready=ray_ready), log
        )
        try:
            connect_ray(address, config.world_size)
        finally:
            ray_ready.set()
        startup["ray_ready"] = time.time()
        summary, startup["data_ready"] = prepared.result()
    telemetry.set_data_summary(summary)
    if note := missing_slots_note(config):
        log(note)
    mailbox = Mailbox.remote()
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config={
            "run": run.model_dump(by_alias=True, exclude_none=True, mode="json"),
            "output_dir": str(config.output_dir.resolve()),
            "use_gpu": config.use_gpu,
            "remote_root": config.remote_root,
            "mailbox": mailbox,
            "startup": startup,
        },
        scaling_config=scaling_config(config),
        run_config=RunConfig(
            name=config.name,
            storage_path=str((config.output_dir / "ray").resolve()),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
    )
    with TelemetryPump(mailbox, telemetry, listeners or []):
        trainer.fit()
    result = run_storage.read_result(config)
    run_storage.fetch_outputs(config, result)
    telemetry.set_phase("Succeeded")
    return result


RAY_CONNECT_TIMEOUT_ENV = "KUBETRAIN_RAY_CONNECT_TIMEOUT_S"
RAY_CONNECT_TIMEOUT_S = 120.0


def ray_connect_timeout() -> float:
    """Seconds `ray.init` may take before the driver gives up (EXIT_RAY_UNAVAILABLE)."""
    value = os.environ.get(RAY_CONNECT_TIMEOUT_ENV, "")
    try:
        return float(value) if float(value) > 0 else RAY_CONNECT_TIMEOUT_S
    except ValueError:
        return RAY_CONNECT_TIMEOUT_S


def _give_up_on_ray(where: str, timeout: float) -> None:
    # ray.init retries an unreachable GCS for minutes inside native code, where no Python
    # exception can reach it, so the watchdog ends the process itself, with the same code
    # and message exits.report would give.
    print(
        f"kubetrain run: Ray unavailable: could not start or join {where} within {timeout:g}s "
        f"({RAY_CONNECT_TIMEOUT_ENV}) (exit code {contract.EXIT_RAY_UNAVAILABLE})",
        file=sys.stderr,
        flush=True,
    )
    os._exit(contract.EXIT_RAY_UNAVAILABLE)


def connect_ray(address: str | None, world_size: int) -> None:
    """Join the cluster at `address` (the head pod's), or start a local instance sized for
    `world_size` ranks (+1 CPU for Ray Train's controller); then take SIGTERM back from
    `ray.init`, which replaces the driver's handler. A cluster that cannot be joined within
    ray_connect_timeout() is an infrastructure failure (EXIT_RAY_UNAVAILABLE, retried)."""
    if not ray.is_initialized():
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        timeout = ray_connect_timeout()
        watchdog = threading.Timer(timeout, _give_up_on_ray, (where, timeout))
        watchdog.daemon = True
        watchdog.start()
        try:
            if address:
                ray.init(address=address, log_to_driver=True)
            else:
                ray.init(
                    num_cpus=world_size + 1,
                    resources={WORKER_SLOT_RESOURCE: world_size},
                    include_dashboard=False,
                )
        except Exception as exc:
            raise RayUnavailable(f"could not start or join {where}: {exc}") from exc
        finally:
            watchdog.cancel()
    stop_on_sigterm()
