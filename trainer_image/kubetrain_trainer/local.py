"""`kubetrain run FILE`: the same TrainingRun, trained on this machine by a local Ray
cluster, with a progress bar and everything under runs/<name>/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from kubetrain_api import contract, memory, validation
from kubetrain_api import v1alpha1 as api
from kubetrain_api.lineage import LineageError, ModelLineage, read_lineage
from kubetrain_api.reports import ReportedModel, RunResult, lenient
from kubetrain_api.v1alpha1 import EvaluationStatus
from kubetrain_trainer.exits import SpecFailure, report
from kubetrain_trainer.signals import stop_on_sigterm


class RunError(SpecFailure):
    """A run that cannot start (its file, its spec, its output folder); the message says
    why and what to do."""

    kind = "cannot start"


def load_run(
    path: Path,
    max_steps: int | None = None,
    run_uid: str | None = None,
    model: str | None = None,
) -> api.TrainingRun:
    """The one TrainingRun in `path`, validated; `run_uid` (the operator's --run-uid)
    becomes its metadata.uid, which travels with the run to the workers (lineage).
    `model` replaces spec.model.source: a URI, or a local folder (made a file:// URI)."""
    try:
        docs = validation.load_documents(validation.read_file(path))
    except (OSError, validation.InvalidYaml) as exc:
        raise RunError(f"{path}: cannot read: {exc}") from exc
    runs = [d for d in docs if isinstance(d, dict) and d.get("kind") == api.KIND]
    if len(runs) != 1:
        raise RunError(f"{path}: expected exactly one TrainingRun, found {len(runs)}")
    doc = runs[0]
    spec = doc.get("spec")
    if max_steps is not None and isinstance(spec, dict):
        # An override for smoke runs; validated like the rest of the spec below (which
        # also names a spec or hyperparameters that is no mapping).
        hp = spec.setdefault("hyperparameters", {})
        if isinstance(hp, dict):
            hp["maxSteps"] = max_steps
    if model is not None and isinstance(spec, dict):
        # A model trained here before (e.g. the base of a preference run), for laptop runs
        # of an example that names its cluster location.
        if "://" not in model and not Path(model).is_dir():
            raise RunError(f"--model {model}: no such folder")
        source = model if "://" in model else f"file://{Path(model).resolve()}"
        if isinstance(spec.get("model"), dict):
            spec["model"]["source"] = source
    try:
        run = validation.parse(doc)
    except validation.InvalidSpec as exc:
        lines = "\n".join(f"  {e}" for e in exc.errors)
        raise RunError(f"{path}: invalid TrainingRun:\n{lines}") from exc
    if run_uid:
        run.metadata.uid = run_uid
    return run


def run_folder(run: api.TrainingRun, root: Path, run_uid: str | None = None) -> Path:
    """`root/<name>`, or with the run's uid (a TrainingRun on Kubernetes) the uid-keyed
    `root/<name>-<uid[:8]>` of contract.run_folder, which the operator's serving reads."""
    return root / run_folder_name(run, run_uid)


def run_folder_name(run: api.TrainingRun, run_uid: str | None = None) -> str:
    name = run.metadata.name or "run"
    return contract.run_folder(name, run_uid) if run_uid else name


def remote_root(run: api.TrainingRun, run_uid: str | None = None) -> str | None:
    """The run's durable root when spec.checkpoint.storage.uri is an object store (the
    same folder name under it as under a local root), else None."""
    from kubetrain_trainer import storage

    return storage.remote_root(run.spec.checkpoint.storage.uri, run_folder_name(run, run_uid))


def scratch_dir_for(
    run: api.TrainingRun, root: Path, *, overwrite: bool, run_uid: str | None = None
) -> Path:
    """The local folder of a run whose files live on an object store: scratch only (the
    state checks and the uid claim are made on the store, storage.claim)."""
    out = run_folder(run, root, run_uid)
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def output_dir_for(
    run: api.TrainingRun,
    root: Path,
    *,
    resume: bool,
    overwrite: bool,
    run_uid: str | None = None,
) -> Path:
    out = run_folder(run, root, run_uid)
    has_state = (out / contract.CHECKPOINT_DIR).exists() or (out / "result.json").exists()
    if run_uid:
        _claim(out, run_uid)
    if has_state and overwrite:
        shutil.rmtree(out)
    elif has_state and not resume:
        raise RunError(
            f"{out} already holds a run: pass --resume to continue it from its latest "
            "checkpoint, or --overwrite to start over"
        )
    out.mkdir(parents=True, exist_ok=True)
    if run_uid:
        (out / contract.RUN_UID_FILE).write_text(run_uid + "\n")
    return out


def _claim(out: Path, run_uid: str) -> None:
    """Refuse a run folder that another run (uid) wrote: its checkpoints are not this
    run's to resume or overwrite (a shortened uid may collide; a copied folder may lie)."""
    try:
        owner = (out / contract.RUN_UID_FILE).read_text().strip()
    except FileNotFoundError:
        return
    if owner != run_uid:
        raise RunError(
            f"{out} belongs to the run with uid {owner}, not {run_uid}: a TrainingRun never "
            "continues another run's folder; to start from its checkpoint, set "
            f"spec.checkpoint.resume to file://{out.resolve()}/{contract.CHECKPOINT_DIR}/step-N"
        )


def step_postfix(event: dict[str, Any]) -> dict[str, str]:
    """What the progress bar shows after a step: loss, tokens/s and, for the preference
    and RL methods, the numbers the step has (None or absent: not this method's)."""

    def has(key: str) -> bool:
        return event.get(key) is not None

    shown = {"loss": f"{event['loss']:.3f}", "tok_s": f"{event['tokens_per_second']:.0f}"}
    if has("reward_mean"):
        spread = f"±{event['reward_std']:.2g}" if has("reward_std") else ""
        shown["reward"] = f"{event['reward_mean']:.3g}{spread}"
    if has("reward_margin"):
        shown["margin"] = f"{event['reward_margin']:.3g}"
    if has("reward_accuracy"):
        shown["acc"] = f"{event['reward_accuracy']:.2f}"
    if has("kl"):
        shown["kl"] = f"{event['kl']:.3g}"
    return shown


class ProgressBar:
    """A tqdm bar fed by rank 0's events: step, loss, tokens/s, ETA, and the reward,
    margin, accuracy and KL of the methods that have them (`step_postfix`)."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self.bar: Any = None
        self._peaks_shown = False

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        if kind == "phase" and event.get("total_steps") and self.bar is None:
            self.bar = self._tqdm(total=event["total_steps"], unit="step", dynamic_ncols=True)
        if kind == "step":
            if self.bar is not None:
                self.bar.n = event["step"]
                self.bar.set_postfix(step_postfix(event))
            peaks = event.get("memory_peak_bytes_by_rank")
            if peaks and not self._peaks_shown:
                # Once: on a CPU the peak is measured at one step (peak_memory).
                self._peaks_shown = True
                shown = ", ".join(
                    f"rank {rank} {memory.format_bytes(peak)}" for rank, peak in enumerate(peaks)
                )
                self._write(f"memory: measured peak per training process: {shown}")
        elif kind == "eval":
            shown = ", ".join(f"{k} {v:.4g}" for k, v in event["metrics"].items())
            self._write(f"eval @ step {event['step']}: {shown}")
        elif kind == "checkpoint":
            self._write(f"checkpoint step {event['step']} -> {event['path']}")

    def _write(self, text: str) -> None:
        (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_losses(metrics_path: Path, out: Path) -> Path | None:
    """Training and validation loss against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    train = [(e["step"], e["loss"]) for e in events if e.get("kind") == "step"]
    val = [
        (e["step"], e["metrics"]["loss"])
        for e in events
        if e.get("kind") == "eval" and "loss" in e.get("metrics", {})
    ]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def sample(model_dir: Path, data_dir: Path) -> tuple[str, str]:
    """A greedy continuation of the start of the first validation row: its first 8 tokens,
    or, where its prompt was masked (every method but pretrain), that whole prompt with the
    chat template's markers, which is what the model learned to answer (and how the server
    renders a chat). Returns the prompt as shown (markers stripped) and the answer."""
    from kubetrain_trainer import export
    from kubetrain_trainer.data import IGNORE_INDEX, open_split

    model, tokenizer, _ = export.load_exported(model_dir)
    split = open_split(data_dir, "validation")
    if not split.rows:
        split = open_split(data_dir, "train")
    row = split.take([0])
    # dpo rows hold a pair (the chosen answer shows the prompt); grpo rows a prompt alone.
    key = "chosen_" if "chosen_input_ids" in row else ""
    ids = row[f"{key}input_ids"][0].tolist()
    if "prompt_length" in row:
        answer_at = int(row["prompt_length"][0])
    else:
        labels = row[f"{key}labels"][0].tolist()
        trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        answer_at = trained[0] if trained else 0
    if answer_at == 0:  # plain text: every token is trained
        prompt = tokenizer.decode(ids[:8], skip_special_tokens=True).strip()
        return prompt, export.generate_sample(model, tokenizer, prompt, max_new_tokens=30)
    chat = tokenizer.decode(ids[:answer_at])
    shown = tokenizer.decode(ids[:answer_at], skip_special_tokens=True).strip()
    text = export.generate_sample(
        model, tokenizer, chat, max_new_tokens=30, add_special_tokens=False
    )
    return shown, text


def termination_summary(run_name: str, result: dict[str, Any]) -> RunResult:
    """What the operator records in the run's status (status.model, status.evaluation): the
    exported model and the final evaluation, as the `RunResult` the operator parses."""
    model = ReportedModel(
        version=f"{run_name}-step{result['step']}",
        uri=str(result["model"]) if result.get("model") else None,
    )
    if model.uri is not None:
        # The generation shows in `kubectl get tr`; the id ties status to lineage.json.
        record = _exported_lineage(model.uri)
        if record is not None:
            model.generation, model.lineage_id = record.generation, record.id
    # lenient: JSON has no NaN, and the status caps metric names and failure texts.
    evaluation = lenient(
        EvaluationStatus,
        {
            "step": result["step"],
            "metrics": result.get("metrics") or {},
            "gate": result.get("gate") or {},
        },
    )
    return RunResult(model=model, evaluation=evaluation)


def _exported_lineage(location: str) -> ModelLineage | None:
    from kubetrain_trainer.lineage import read_url

    try:
        return read_lineage(location, read_url)
    except LineageError as exc:
        print(f"[kubetrain] no lineage in the run's result: {exc}", flush=True)
        return None


def write_termination_log(path: Path, summary: RunResult) -> None:
    """Write `summary` as JSON that fits a termination message (`RunResult.to_message`)."""
    path.write_text(summary.to_message())


def ray_train_max_failures(
    run: api.TrainingRun, address: str | None, override: int | None = None
) -> int:
    """How often Ray Train restarts failed workers within this driver. Only one layer counts
    spec.runPolicy.backoffLimit: on Kubernetes (the head joins its cluster: `--address`) the
    operator does, retrying the whole attempt (a lost pod never comes back to Ray), so Ray
    Train restarts nothing and a lost worker ends the attempt at once (exit code
    EXIT_WORKERS_LOST); on a laptop Ray Train is the only layer and counts it."""
    if override is not None:
        return override
    return 0 if address else run.spec.run_policy.backoff_limit


def run_local(
    path: Path,
    *,
    output_root: Path = Path("runs"),
    resume: bool = False,
    overwrite: bool = False,
    workers: int | None = None,
    max_steps: int | None = None,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    address: str | None = None,
    termination_log: Path | None = None,
    run_uid: str | None = None,
    max_failures: int | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    # The file first: a bad one is refused before torch and Ray load (seconds).
    run = load_run(path, max_steps=max_steps, run_uid=run_uid, model=model)

    from kubetrain_trainer import metrics
    from kubetrain_trainer.driver import run_training

    remote = remote_root(run, run_uid)
    if remote:
        from kubetrain_trainer import storage

        storage.claim(remote, run_uid, resume=resume, overwrite=overwrite)
        out = scratch_dir_for(run, output_root, overwrite=overwrite, run_uid=run_uid)
    else:
        out = output_dir_for(run, output_root, resume=resume, overwrite=overwrite, run_uid=run_uid)
    telemetry = metrics.Telemetry(run.metadata.name or "", run.spec.model.source)
    server = None
    if metrics_port is not None:
        server, port = metrics.serve_telemetry(telemetry, host=metrics_host, port=metrics_port)
        print(f"metrics: http://{metrics_host}:{port}/metrics and /progress", flush=True)
    bar = ProgressBar()
    try:
        result = run_training(
            run,
            out,
            address=address,
            world_size=workers,  # None: config.resolve derives it from the spec
            use_gpu=False if run.spec.resources.gpus_per_worker == 0 else None,
            max_failures=ray_train_max_failures(run, address, max_failures),
            telemetry=telemetry,
            listeners=[bar],
            log=lambda msg: print(msg, flush=True),
            remote_root=remote,
        )
    finally:
        bar.close()
        if server is not None:
            server.shutdown()
    if termination_log is not None:
        # First, before the report below: the result must reach the operator.
        write_termination_log(
            termination_log, termination_summary(run.metadata.name or "run", result)
        )
    plot = plot_losses(out / contract.METRICS_FILE, out / "loss.png")
    gate = result["gate"]
    print(f"\nrun {run.metadata.name}: {result['step']} steps, {result['tokens_seen']} tokens")
    for name, value in result["metrics"].items():
        print(f"  {name}: {value:.4f}")
    verdict = "passed" if gate.get("passed") else "failed: " + "; ".join(gate.get("failures", []))
    print(f"  gate: {verdict}")
    print(f"  model: {result['model']}")
    if plot:
        print(f"  loss curve: {plot}")
    if result.get("model"):
        prompt, text = sample(local_model(result, out), out / contract.DATA_DIR)
        print(f"  sample: {prompt!r} -> {text!r}")
    return result


def local_model(result: dict[str, Any], out: Path) -> Path:
    """The exported model on this machine: result's folder, or, when result names it by
    its object-store URL, the copy the driver downloaded into the run's scratch."""
    from kubetrain_trainer import storage

    model = str(result["model"])
    return out / contract.MODEL_DIR if storage.is_remote(model) else Path(model)


def serve_after(run: api.TrainingRun, result: dict[str, Any], out: Path, port: int) -> None:
    """`--serve`: the freshly trained model on an OpenAI-compatible API until Ctrl-C."""
    from kubetrain_trainer.serve.app import serve

    limits = run.spec.serve
    print(f"serving {result['model']} on http://127.0.0.1:{port}/v1 (Ctrl-C stops)", flush=True)
    serve(
        local_model(result, out),
        "127.0.0.1",
        port,
        **{field: getattr(limits, field) for field in contract.SERVE_LIMITS},
        feedback_path=out / contract.FEEDBACK_DIR / contract.FEEDBACK_FILE,
    )


def main(args: Any) -> int:
    stop_on_sigterm()
    try:
        result = run_local(
            Path(args.file),
            output_root=Path(args.output_dir),
            resume=args.resume,
            overwrite=args.overwrite,
            workers=args.workers,
            max_steps=args.max_steps,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            address=args.address,
            termination_log=Path(args.termination_log) if args.termination_log else None,
            run_uid=args.run_uid,
            max_failures=getattr(args, "max_failures", None),
            model=getattr(args, "model", None),
        )
    except Exception as exc:  # the one place a failure becomes an exit code
        return report(exc)
    if args.serve:
        run = load_run(Path(args.file), max_steps=args.max_steps, model=args.model)
        out = run_folder(run, Path(args.output_dir), args.run_uid)
        serve_after(run, result, out, args.serve_port)
    return 0
