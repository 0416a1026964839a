"""`python -m kubetrain_trainer.serve MODEL_DIR [--port 8000] [limits]`: the serving
container's entry point; the limits are `spec.serve`'s (`ServeSpec`), one option each."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from kubetrain_api import contract
from kubetrain_api.v1alpha1 import ServeSpec

from .app import GRACEFUL_SHUTDOWN_S, serve


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    defaults = ServeSpec()
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="exported Hugging Face model folder")
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
    if not (args.model_dir / "config.json").is_file():
        parser.error(f"{args.model_dir}: not an exported model folder (no config.json)")
    logging.basicConfig(level=args.log_level.upper())
    serve(
        args.model_dir,
        args.host,
        args.port,
        **{field: getattr(args, field) for field in contract.SERVE_LIMITS},
        feedback_path=args.feedback_path,
        graceful_timeout_s=args.graceful_timeout,
        log_level=args.log_level,
    )


if __name__ == "__main__":
    main()
