"""`python -m kubetrain_trainer.serve MODEL [--port 8000] [limits]`: the serving
container's entry point; the limits are `spec.serve`'s (`ServeSpec`), one option each.
MODEL is a folder, or the URL of a committed model folder on an object store
(`s3://.../model`), which is downloaded into `--model-cache` before the server listens."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kubetrain_api import contract
from kubetrain_api.v1alpha1 import ServeSpec

from .app import GRACEFUL_SHUTDOWN_S, serve


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    defaults = ServeSpec()
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument(
        "model_dir",
        help="exported Hugging Face model folder, or its URL on an object store (s3://, gs://)",
    )
    parser.add_argument(
        "--model-cache",
        type=Path,
        default=Path("/tmp/kubetrain-model"),
        help="local folder an object-store model is downloaded into (default %(default)s)",
    )
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=contract.SERVE_PORT)
    for field in contract.SERVE_LIMITS:
        description = ServeSpec.model_fields[field].description
        parser.add_argument(
            contract.serve_option(field),
            type=int,
            default=getattr(defaults, field),
            help=f"{description} (spec.serve)",
        )
    parser.add_argument("--feedback-path", type=Path, help="JSONL file for /v1/feedback")
    parser.add_argument("--graceful-timeout", type=float, default=GRACEFUL_SHUTDOWN_S)
    parser.add_argument("--log-level", default="info")
    return parser


def main(argv: list[str] | None = None) -> None:
    prog = None
    if argv and argv[0] == "--prog":  # `kubetrain serve` names itself in the help
        prog, argv = argv[1], argv[2:]
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    args.model_dir = fetch_model(args.model_dir, args.model_cache)
    if not (args.model_dir / "config.json").is_file():
        parser.error(f"{args.model_dir}: not an exported model folder (no config.json)")
    serve(
        args.model_dir,
        args.host,
        args.port,
        **{field: getattr(args, field) for field in contract.SERVE_LIMITS},
        feedback_path=args.feedback_path,
        graceful_timeout_s=args.graceful_timeout,
        log_level=args.log_level,
    )


def fetch_model(model: str, cache: Path) -> Path:
    """A local folder for MODEL: the folder itself, or the committed object-store folder
    downloaded into `cache` (a no-op when the cache holds that commit already). Done before
    the server listens, so /readyz never answers ready for a model not yet local. An
    uncommitted model (no marker: its upload did not finish) or refused credentials end
    the process with one line and exit code 1."""
    from kubetrain_trainer import storage

    if not storage.is_remote(model):
        return Path(model.removeprefix("file://"))
    logging.getLogger(__name__).info("downloading %s into %s", model, cache)
    try:
        storage.download_folder(model, cache)
    except storage.NotCommitted as exc:
        sys.exit(f"kubetrain serve: {exc}; serve a model only once its run has exported it")
    except PermissionError as exc:
        sys.exit(f"kubetrain serve: {storage.explain(exc, model)}")
    return cache


if __name__ == "__main__":
    main()
