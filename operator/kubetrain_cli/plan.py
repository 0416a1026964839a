"""`kubetrain plan FILE...`: will the run fit? The memory plan, printed per process.

The arithmetic is `kubetrain_api.memory`; the model's size comes from
`kubetrain_trainer.planning` (torch, transformers, accelerate: the trainer extra), so the
trainer is imported only when a plan is asked for.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kubetrain_api import contract, documents, memory, validation
from kubetrain_api.modelservice import ModelService
from kubetrain_api.v1alpha1 import TrainingRun, TrainingRunSpec

_size = memory.format_bytes


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def format_plan(plan: memory.MemoryPlan, spec: TrainingRunSpec, where: str) -> list[str]:
    """The plan as a user reads it: one term a line, then the verdict."""
    m, t, s = plan.model, plan.training, plan.serving
    strategy = "FSDP2" if spec.distributed.strategy == "fsdp" else "DDP"
    ac = "on" if spec.distributed.activation_checkpointing else "off"
    lines = [
        f"model: {m.architecture}, {_count(m.parameters)} parameters, "
        f"{_count(m.trainable_parameters)} trainable ({where})",
        f"training, per process (world size {plan.world_size}, {strategy}, {plan.precision}, "
        f"micro-batch {spec.hyperparameters.micro_batch_size} x {spec.data.sequence_length} "
        f"tokens):",
        f"  parameters (master weights)  {_size(t.parameters):>12}",
        f"  gradients                    {_size(t.gradients):>12}",
        f"  optimizer state (AdamW)      {_size(t.optimizer_state):>12}",
        f"  gathered parameters          {_size(t.gathered_parameters):>12}",
        f"  activations (checkpointing {ac:>3}) {_size(t.activations):>9}"
        f"   (off {_size(t.activations_without_checkpointing)}, "
        f"on {_size(t.activations_with_checkpointing)})",
    ]
    if t.reference:
        lines.append(f"  reference model              {_size(t.reference):>12}")
    if t.overhead:
        lines.append(f"  CUDA context, NCCL buffers   {_size(t.overhead):>12}")
    lines.append(
        f"  peak                         {_size(t.total):>12}   "
        f"(within {memory.TOLERANCE:.0%} of measured peaks)"
    )
    if plan.gpu_memory is None:
        if spec.resources.gpus_per_worker:
            lines.append(
                f"GPU: {plan.gpu_product or 'product unknown'}: memory unknown; set "
                f"resources.gpuMemory or the {memory.GPU_PRODUCT_LABEL} node selector"
            )
        else:
            lines.append("GPU: none (a CPU run)")
    else:
        share = t.total / plan.gpu_memory
        lines.append(
            f"GPU: {plan.gpu_product}, {_size(plan.gpu_memory)}: {plan.verdict} "
            f"({share:.0%} of it)" + (f"; cheapest fix: {plan.fix}" if plan.fix else "")
        )
    engine = "vLLM, bfloat16" if spec.serve.gpus else "built-in engine, float32"
    lines.append(
        f"serving replica ({engine}): weights {_size(s.weights)} + KV cache "
        f"{_size(s.kv_cache)} ({spec.serve.max_tokens} tokens x {spec.serve.max_concurrency} "
        f"requests){' + CUDA context ' + _size(s.overhead) if s.overhead else ''} = "
        f"{_size(s.total)}"
    )
    return lines


def fit_errors(plan: memory.MemoryPlan) -> tuple[list[str], list[str]]:
    """(warnings, errors) of `kubetrain validate` for a plan, each naming the field."""
    message = memory.fit_message(plan)
    if message is None:
        return [], []
    return ([message], []) if plan.verdict == "tight" else ([], [message])


def plan_spec(spec: TrainingRunSpec, model_configs: Path | None) -> tuple[memory.MemoryPlan, str]:
    """Size the model (imports the trainer) and plan."""
    from kubetrain_trainer import planning

    cache = Path.home() / ".cache" / "kubetrain"
    plan, where = planning.plan_run(spec, cache, model_configs)
    return memory.MemoryPlan.model_validate(plan), str(where)


def trainer_missing() -> str | None:
    """Why plans cannot be made here (the trainer extra is not installed), or None."""
    try:
        import kubetrain_trainer.planning  # noqa: F401
    except ImportError as exc:
        return f"the trainer extra is not installed ({exc})"
    return None


def cmd_plan(args: argparse.Namespace) -> int:
    missing = trainer_missing()
    if missing:
        print(f"kubetrain plan needs pip install 'kubetrain[trainer]': {missing}", file=sys.stderr)
        return contract.EXIT_USAGE
    from kubetrain_trainer.exits import SpecFailure

    failed = False
    for file in args.files:
        try:
            docs = validation.load_documents(validation.read_file(Path(file)))
        except (OSError, validation.InvalidYaml) as exc:
            print(f"{file}: cannot read: {exc}", file=sys.stderr)
            failed = True
            continue
        for index, doc in enumerate(docs):
            where = file if len(docs) == 1 else f"{file}[{index}]"
            try:
                obj = documents.parse_document(doc)
            except validation.InvalidSpec as exc:
                print(f"{where}: invalid: {'; '.join(map(str, exc.errors))}", file=sys.stderr)
                failed = True
                continue
            for name, spec in _runs(obj):
                try:
                    plan, source = plan_spec(spec, args.model_configs)
                except (SpecFailure, ValueError) as exc:
                    print(f"{where}: TrainingRun {name}: cannot plan: {exc}", file=sys.stderr)
                    failed = True
                    continue
                print(f"{where}: TrainingRun {name}")
                for line in format_plan(plan, spec, source):
                    print(f"  {line}")
                failed |= plan.verdict == "does-not-fit"
    return 1 if failed else 0


def _runs(obj: object) -> list[tuple[str, TrainingRunSpec]]:
    """The TrainingRun specs a document holds: a run, or a ModelService's retraining
    template (variants name finished runs or models, which train nothing)."""
    if isinstance(obj, TrainingRun):
        return [(obj.metadata.name or "?", obj.spec)]
    if isinstance(obj, ModelService) and obj.spec.retraining is not None:
        name = obj.metadata.name or "?"
        return [(f"{name} (retraining template)", obj.spec.retraining.template.spec)]
    return []
