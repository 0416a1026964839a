"""`python -m kubetrain_trainer.serve MODEL_DIR [--port 8000] [limits]`: the serving
container's entry point; the limits mirror `spec.serve` (`ServeSpec`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from kubetrain_api.v1alpha1 import ServeSpec

from .app import GRACEFUL_SHUTDOWN_S, serve


def main(argv: list[str] | None = None) -> None:
    defaults = ServeSpec()
    prog = None
    if argv and argv[0] == "--prog":  # `kubetrain serve` names itself in the help
        prog, argv = argv[1], argv[2:]
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="exported Hugging Face model folder")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--max-concurrency", type=int, default=defaults.max_concurrency)
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue)
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    parser.add_argument("--feedback-path", type=Path, help="JSONL file for /v1/feedback")
    parser.add_argument("--graceful-timeout", type=float, default=GRACEFUL_SHUTDOWN_S)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    if not (args.model_dir / "config.json").is_file():
        parser.error(f"{args.model_dir}: not an exported model folder (no config.json)")
    logging.basicConfig(level=args.log_level.upper())
    serve(
        args.model_dir,
        args.host,
        args.port,
        max_tokens=args.max_tokens,
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        feedback_path=args.feedback_path,
        graceful_timeout_s=args.graceful_timeout,
        log_level=args.log_level,
    )


if __name__ == "__main__":
    main()
