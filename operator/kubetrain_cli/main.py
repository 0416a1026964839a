"""`kubetrain`: one command line for users, the operator image and the trainer image.

Subcommands import their heavy dependencies lazily, so `kubetrain validate` works with
only the API extra installed and stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from kubetrain_api import contract, crd, documents, placement, validation
from kubetrain_api.v1alpha1 import TrainingRun
from kubetrain_cli import lineage, plan

DESCRIPTION = """\
kubetrain trains language models on Kubernetes: a TrainingRun resource becomes a Ray
cluster whose workers train with FSDP2, reports progress to its status and Prometheus, and
a model that passes its evaluation gate becomes an OpenAI-compatible endpoint."""

EPILOG = """\
examples:
  kubetrain validate examples/*.yaml       check TrainingRun and ModelService files, errors
                                           name the field
  kubetrain validate -o yaml run.yaml      print the run with every default filled in
  kubetrain plan examples/*.yaml --model-configs examples/model-configs
                                           will it fit? memory per process and replica
  kubetrain crds                           regenerate crds/ and the Helm chart's copy
  kubetrain crds --check                   fail if either is out of date
  kubetrain lineage runs/demo/model        the model's parents and data, back to the base
"""


def _cmd_validate(args: argparse.Namespace) -> int:
    failed = False
    for file in args.files:
        path = Path(file)
        try:
            docs = validation.load_documents(validation.read_file(path))
        except (OSError, validation.InvalidYaml) as exc:
            print(f"{file}: cannot read: {exc}", file=sys.stderr)
            failed = True
            continue
        if not docs:
            print(f"{file}: no documents", file=sys.stderr)
            failed = True
        for index, doc in enumerate(docs):
            where = file if len(docs) == 1 else f"{file}[{index}]"
            meta = doc.get("metadata") if isinstance(doc, dict) else None
            name = meta.get("name", "?") if isinstance(meta, dict) else "?"
            kind = doc.get("kind") if isinstance(doc, dict) else None
            kind = kind if isinstance(kind, str) and kind else "TrainingRun"
            try:
                obj = documents.parse_document(doc)
            except validation.InvalidSpec as exc:
                failed = True
                print(f"{where}: {kind} {name}: invalid", file=sys.stderr)
                for error in exc.errors:
                    print(f"  {error}", file=sys.stderr)
                continue
            if isinstance(obj, TrainingRun):
                for field, message in placement.warnings(obj.spec):
                    print(f"{where}: {kind} {name}: warning: {field}: {message}", file=sys.stderr)
                notes, errors = _fit(obj, args.model_configs)
                for note in notes:
                    print(f"{where}: {kind} {name}: warning: {note}", file=sys.stderr)
                if errors:
                    failed = True
                    print(f"{where}: {kind} {name}: invalid", file=sys.stderr)
                    for problem in errors:
                        print(f"  {problem}", file=sys.stderr)
                    continue
            if args.output == "name":
                print(f"{where}: {kind} {name}: valid")
                continue
            resolved = obj.model_dump(by_alias=True, exclude_none=True, mode="json")
            if args.output == "json":
                print(json.dumps(resolved, indent=2))
            else:
                print("---")
                print(yaml.safe_dump(resolved, sort_keys=False), end="")
    return 1 if failed else 0


def _fit(run: TrainingRun, model_configs: Path | None) -> tuple[list[str], list[str]]:
    """Warnings and errors of the memory plan of a GPU run; a CPU run has no GPU memory to
    fit, and without the trainer extra (or the model's config) there is no plan."""
    if run.spec.resources.gpus_per_worker == 0:
        return [], []
    missing = plan.trainer_missing()
    if missing:
        return [f"spec.model: memory plan skipped: {missing}"], []
    from kubetrain_trainer.exits import SpecFailure

    try:
        memory_plan, _ = plan.plan_spec(run.spec, model_configs)
    except (SpecFailure, ValueError) as exc:
        return [f"memory plan skipped: {exc}"], []
    return plan.fit_errors(memory_plan)


def _cmd_crds(args: argparse.Namespace) -> int:
    stale = []
    for out in map(Path, args.out or crd.OUTPUT_DIRS):
        for filename, text in crd.render_crds().items():
            target = out / filename
            if args.check:
                if not target.exists() or target.read_text() != text:
                    stale.append(str(target))
                continue
            out.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            print(f"wrote {target}")
    if stale:
        print(
            "out of date with the API models: " + ", ".join(stale) + "\n"
            "run `kubetrain crds` and commit the result",
            file=sys.stderr,
        )
        return 1
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        from kubetrain_trainer import local
    except ImportError as exc:  # the operator image has no torch or ray
        print(
            f"kubetrain run needs the trainer extra (pip install 'kubetrain[trainer]'): {exc}",
            file=sys.stderr,
        )
        return contract.EXIT_USAGE
    return int(local.main(args))


def _cmd_operator(args: argparse.Namespace) -> int:
    try:
        from kubetrain_operator import cli
    except ImportError as exc:
        print(
            f"kubetrain operator needs the operator extra (pip install 'kubetrain[operator]'): "
            f"{exc}",
            file=sys.stderr,
        )
        return 2
    return int(cli.main(args))


def _serve(argv: list[str]) -> int:
    try:
        from kubetrain_trainer.serve.__main__ import main as serve_main
    except ImportError as exc:
        print(
            f"kubetrain serve needs the serve extra (pip install 'kubetrain[serve]'): {exc}",
            file=sys.stderr,
        )
        return 2
    serve_main(["--prog", "kubetrain serve", *argv])
    return 0


def _route(argv: list[str]) -> int:
    try:
        from kubetrain_trainer.route.__main__ import main as route_main
    except ImportError as exc:
        print(
            f"kubetrain route needs the serve extra (pip install 'kubetrain[serve]'): {exc}",
            file=sys.stderr,
        )
        return 2
    route_main(["--prog", "kubetrain route", *argv])
    return 0


def _feedback(argv: list[str]) -> int:
    from kubetrain_cli import feedback

    return feedback.main(argv, prog="kubetrain feedback")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetrain",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    validate = commands.add_parser(
        "validate",
        help="check TrainingRun and ModelService YAML files (multi-document too); exit 1 on "
        "any error",
        description="Check TrainingRun and ModelService files against the API: types, bounds "
        "and the rules the CRD schema cannot express. Every error names its field path.",
    )
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.add_argument(
        "-o",
        "--output",
        choices=["name", "yaml", "json"],
        default="name",
        help="name: one line per valid document (default); yaml/json: the resolved document "
        "with defaults filled in",
    )
    validate.add_argument(
        "--model-configs",
        type=Path,
        metavar="DIR",
        help="config.json files laid out as SCHEME/PATH (hf/ORG/NAME/config.json), used for "
        "the memory plan of GPU runs where a model's own folder cannot be read",
    )
    validate.set_defaults(func=_cmd_validate)

    plan_parser = commands.add_parser(
        "plan",
        help="will it fit? the memory plan of each TrainingRun, per process and replica",
        description="Size each run's model from its config on the meta device (no weights "
        "are read) and print the memory of one training process under FSDP2 at the run's "
        "world size and precision, its peak against the GPU's memory, and a serving "
        "replica's. Exit 1 when a run does not fit or cannot be planned.",
    )
    plan_parser.add_argument("files", nargs="+", metavar="FILE")
    plan_parser.add_argument(
        "--model-configs",
        type=Path,
        metavar="DIR",
        help="config.json files laid out as SCHEME/PATH (hf/ORG/NAME/config.json, "
        "pvc/CLAIM/PATH/config.json), used where a model's own folder cannot be read",
    )
    plan_parser.set_defaults(func=plan.cmd_plan)

    crds = commands.add_parser(
        "crds",
        help="write the CustomResourceDefinitions generated from the API models",
        description="Generate crds/*.yaml, and the Helm chart's copy in "
        "helm/kubetrain/crds/, from the pydantic API models.",
    )
    crds.add_argument(
        "--out",
        action="append",
        metavar="DIR",
        help="output folder, repeatable (default: " + " and ".join(crd.OUTPUT_DIRS) + ")",
    )
    crds.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if the files differ"
    )
    crds.set_defaults(func=_cmd_crds)

    lineage.add_parser(commands)

    run = commands.add_parser(
        "run",
        help="train a TrainingRun on this machine (local Ray cluster, same driver)",
        description="Train a TrainingRun locally: data preparation, FSDP2 training on a local "
        "Ray cluster, checkpoints, evaluation and export, all under OUTPUT_DIR/<name>/.",
    )
    run.add_argument("file", metavar="FILE", help="TrainingRun YAML")
    run.add_argument("--output-dir", default="runs", help="root of run folders (default: runs)")
    run.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    run.add_argument(
        "--run-uid",
        metavar="UID",
        help="the TrainingRun's uid (the operator's head pod passes it): the run folder "
        "becomes OUTPUT_DIR/<name>-<uid[:8]>/, and a folder of another uid is refused",
    )
    run.add_argument("--overwrite", action="store_true", help="delete an earlier run first")
    run.add_argument("--workers", type=int, help="training processes (default: spec)")
    run.add_argument("--max-steps", type=int, help="override spec.hyperparameters.maxSteps")
    run.add_argument(
        "--model",
        metavar="URI",
        help="override spec.model.source: a URI or a local model folder (e.g. the model of "
        "an earlier run: runs/NAME/model)",
    )
    run.add_argument("--metrics-port", type=int, help="serve /metrics and /progress on PORT")
    run.add_argument(
        "--metrics-host", default="127.0.0.1", help="address for --metrics-port (default: local)"
    )
    run.add_argument(
        "--address", help="join this Ray cluster (`auto` in a Ray head pod) instead of a local one"
    )
    run.add_argument(
        "--max-failures",
        type=int,
        metavar="N",
        help="Ray Train worker restarts within this run (default: spec.runPolicy.backoffLimit; "
        "0 with --address, where the operator retries whole attempts)",
    )
    run.add_argument(
        "--termination-log",
        metavar="PATH",
        help="write a JSON summary (model, final metrics, gate; <= 4 KiB) to PATH when "
        "training finishes (/dev/termination-log in a pod)",
    )
    run.add_argument(
        "--serve", action="store_true", help="then serve the model on an OpenAI-compatible API"
    )
    run.add_argument("--serve-port", type=int, default=contract.SERVE_PORT, help="port for --serve")
    run.set_defaults(func=_cmd_run)

    op = commands.add_parser(
        "operator",
        help="run the Kubernetes operator that turns TrainingRuns into Ray clusters",
        description="Run the kopf operator: watches TrainingRuns (all namespaces, or those "
        "given) and reconciles their Ray clusters, status, retries and clean-up.",
    )
    op.add_argument(
        "-n", "--namespace", action="append", help="watch only this namespace (repeatable)"
    )
    op.add_argument("--liveness-port", type=int, default=8081, help="kopf liveness /healthz")
    op.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics")
    op.add_argument("-v", "--verbose", action="store_true")
    op.set_defaults(func=_cmd_operator)

    commands.add_parser(
        "serve",
        help="serve an exported model with an OpenAI-compatible API",
        description="Serve MODEL_DIR (an exported run) on /v1/completions, "
        "/v1/chat/completions and /v1/models; `kubetrain serve --help` lists the options.",
        add_help=False,
    )
    commands.add_parser(
        "route",
        help="route an OpenAI-compatible endpoint to model variants (A/B, sticky per user)",
        description="Split requests between variants by weight, sticky per user; log every "
        "response and take feedback; `kubetrain route --help` lists the options.",
        add_help=False,
    )
    commands.add_parser(
        "feedback",
        help="the router's feedback as data: snapshots (SFT, DPO, KTO), prompts to label, labels",
        description="`kubetrain feedback export --store DSN --out DEST` writes the feedback "
        "since the last snapshot; `--select uncertain --budget N` picks prompts to label; "
        "`kubetrain feedback import FILE` brings the labels back. "
        "`kubetrain feedback --help` lists the commands.",
        add_help=False,
    )
    # Listed here for `kubetrain --help`; main() hands `serve ...`, `route ...` and
    # `feedback ...` to their own parsers.
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        return _serve(argv[1:])
    if argv[:1] == ["route"]:
        return _route(argv[1:])
    if argv[:1] == ["feedback"]:
        return _feedback(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
