"""`python -m kubetrain_trainer.evaluate_service --model MODEL --result-file PATH`: one
continuous evaluation of a served model (a ModelService's `spec.evaluation`), the entry
point of the evaluation Job the operator starts per variant.

MODEL is an exported Hugging Face folder: a path, `file://`, `pvc://CLAIM/PATH` (the Job
mounts the claim read-only), or a committed folder on an object store (`s3://`, `gs://`),
downloaded into `--model-cache` first. The spec (`ServiceEvaluationSpec`, camelCase JSON)
comes from `--spec` or $KUBETRAIN_EVALUATION_SPEC.

The metrics are computed by the code training evaluates with (evaluate.py): labelled sets
through `score_dataset` as `DATASET/METRIC` (the first set also under the bare name, as a
TrainingRun reports them), held-out text through `evaluate_loss` as `loss` and
`perplexity`. The result, `{"metrics": {...}}`, is written to `--result-file` (the Job's
/dev/termination-log: rounded, at most contract.TERMINATION_MESSAGE_LIMIT bytes) and
printed. Bad input ends with one line naming the field and a contract exit code.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kubetrain_api import contract
from kubetrain_api.modelservice import ServiceEvaluationSpec
from kubetrain_api.v1alpha1 import DataSource
from kubetrain_trainer.exits import SpecFailure, report

PROG = "evaluate_service"
SPEC_ENV = contract.EVALUATION_SPEC_ENV
LABELLED = ("accuracy", "precision", "recall", "f1")
HELD_OUT = ("loss", "perplexity")
HELD_OUT_NAME = "held-out"
MAX_SEQ_LEN = 512
"""Held-out rows are at most this long (or the model's context, when shorter)."""
BATCH_ROWS = 4
DIGITS = 6
"""Significant digits kept per value: plenty for a metric, and the message stays small."""
MAX_METRICS = 64
"""EvaluationResult.metrics holds at most this many entries."""
CHAT_METHODS = ("sft", "instruction")


def parse_spec(text: str | None) -> ServiceEvaluationSpec:
    """The ServiceEvaluationSpec from its camelCase JSON; SpecFailure names the field."""
    if not text:
        raise SpecFailure(f"--spec: no evaluation spec (pass --spec JSON or set ${SPEC_ENV})")
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise SpecFailure(f"--spec: not JSON: {exc}") from None
    try:
        return ServiceEvaluationSpec.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in ("spec.evaluation", *first["loc"]))
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise SpecFailure(f"{where}: {first['msg']}{more}") from None


def local_model(model: str, cache: Path) -> Path:
    """A local folder holding MODEL: a committed object-store folder (`s3://`, `gs://`) is
    downloaded into `cache` as `kubetrain serve` does; paths, `file://`, `pvc://` and
    `hf://` are found as training finds a model (models.resolve_model_path)."""
    from kubetrain_trainer import models, storage

    try:
        if storage.is_remote(model) and model.split("://", 1)[0] in ("s3", "gs"):
            storage.download_folder(model, cache)
            folder = cache
        else:
            uri = model if "://" in model else f"file://{Path(model).resolve()}"
            folder = models.resolve_model_path(uri, cache.parent)
    except PermissionError as exc:
        raise SpecFailure(f"--model {model}: access denied ({exc})") from None
    except (FileNotFoundError, ValueError, RuntimeError) as exc:  # NotCommitted too
        raise SpecFailure(f"--model: {exc}") from None
    if not (folder / "config.json").is_file():
        raise SpecFailure(f"--model {model}: {folder} is not a model folder (no config.json)")
    return folder


def _chat(folder: Path) -> bool:
    """Whether the model was trained on chats (its run's method), as training decides."""
    from kubetrain_trainer.model_folder import RUN_INFO_FILE

    try:
        info = json.loads((folder / RUN_INFO_FILE).read_text())
    except (OSError, ValueError):
        return False
    method = (info.get("spec") or {}).get("method") if isinstance(info, dict) else None
    return method in CHAT_METHODS


def _held_out_batches(
    spec: ServiceEvaluationSpec, tokenizer: Any, seq_len: int
) -> Iterator[dict[str, Any]]:
    """Held-out text packed into rows as training packs plain text (EOS after each
    document, per-document positions), in batches, at most spec.maxBatches."""
    import torch

    from kubetrain_trainer.data.readers import read_source
    from kubetrain_trainer.data.tokenize import encode, pack, pad_id

    assert spec.held_out is not None
    source = DataSource(name=HELD_OUT_NAME, uri=spec.held_out, format="text")
    limit = spec.max_batches * BATCH_ROWS * seq_len  # documents: never more than tokens
    records = list(read_source(source, limit=limit))
    ids, labels = encode(records, tokenizer, mask_prompts=False)
    rows = pack(ids, labels, seq_len, pad_id(tokenizer))
    for start in range(0, len(rows.input_ids), BATCH_ROWS):
        part = slice(start, start + BATCH_ROWS)
        yield {
            "input_ids": torch.from_numpy(rows.input_ids[part]).long(),
            "labels": torch.from_numpy(rows.labels[part]).long(),
            "position_ids": torch.from_numpy(rows.position_ids[part]).long(),
        }


def evaluate_folder(folder: Path, spec: ServiceEvaluationSpec) -> dict[str, float]:
    """The spec's metrics of the model in `folder`, on the CPU (or the GPU it was given)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from kubetrain_trainer import evaluate
    from kubetrain_trainer.data import DataError, load_eval_examples

    hf_logging.disable_progress_bar()  # the log's tail is the termination message on error
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chat = _chat(folder)
    out: dict[str, float] = {}
    held_out = [m for m in spec.metrics if m in HELD_OUT]
    if held_out and spec.held_out is not None:
        context = int(getattr(model.config, "max_position_embeddings", MAX_SEQ_LEN))
        batches = islice(
            _held_out_batches(spec, tokenizer, min(MAX_SEQ_LEN, context)), spec.max_batches
        )
        try:
            loss, _ = evaluate.evaluate_loss(model, batches, device)
        except DataError as exc:
            raise DataError(f"spec.evaluation.heldOut: {exc}") from None
        if "loss" in held_out:
            out["loss"] = loss
        if "perplexity" in held_out:
            out["perplexity"] = evaluate.perplexity(loss)
    labelled = [m for m in spec.metrics if m in LABELLED]
    for ds in spec.datasets if labelled else []:
        examples = load_eval_examples(ds)
        if not examples:
            raise SpecFailure(f"spec.evaluation.datasets[{ds.name}]: {ds.uri} has no examples")
        scores = evaluate.score_dataset(
            model,
            tokenizer,
            ds,
            [e.prompt for e in examples],
            [e.label for e in examples],
            spec.average,
            chat=chat,
        )
        for name in labelled:
            out.setdefault(name, scores[name])  # the first set's, as a TrainingRun reports
            out[f"{ds.name}/{name}"] = scores[name]
    return out


def render(metrics: dict[str, float]) -> str:
    """`{"metrics": {...}}`, compact, values rounded, within the termination message's
    limit: entries beyond MAX_METRICS or the size are left out (the held-out and bare
    names come first). Non-finite values (a diverged model's perplexity) are left out:
    JSON and the API server have no infinity."""
    kept: dict[str, float] = {}
    for key, value in metrics.items():
        if len(kept) >= MAX_METRICS:
            break
        if not math.isfinite(value):
            print(f"{PROG}: {key} is {value}: left out of the result", file=sys.stderr)
            continue
        kept[key] = float(f"{value:.{DIGITS}g}")
        if len(_dump(kept).encode()) > contract.TERMINATION_MESSAGE_LIMIT:
            del kept[key]
            break
    return _dump(kept)


def _dump(metrics: dict[str, float]) -> str:
    return json.dumps({"metrics": metrics}, separators=(",", ":"), allow_nan=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder, pvc://, s3:// or gs://")
    parser.add_argument("--spec", help=f"ServiceEvaluationSpec as JSON (default: ${SPEC_ENV})")
    parser.add_argument("--result-file", type=Path, help="where the result JSON goes")
    parser.add_argument(
        "--model-cache",
        type=Path,
        default=Path("/tmp/kubetrain-model"),
        help="where an object-store model is downloaded (default %(default)s)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # usage errors exit with contract.EXIT_USAGE
    try:
        spec = parse_spec(args.spec or os.environ.get(SPEC_ENV))
        metrics = evaluate_folder(local_model(args.model, args.model_cache), spec)
        if not metrics:
            raise SpecFailure(
                "spec.evaluation: nothing to compute (loss and perplexity need heldOut, "
                "accuracy, precision, recall and f1 need datasets)"
            )
        text = render(metrics)
        if args.result_file is not None:
            args.result_file.write_text(text)
    except Exception as exc:  # classified: one line for a known failure, never for a bug
        return int(report(exc, PROG))
    print(text, flush=True)
    return int(contract.EXIT_SUCCEEDED)


if __name__ == "__main__":
    sys.exit(main())
