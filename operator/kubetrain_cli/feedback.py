"""`kubetrain feedback export`: the router's feedback log as a versioned data set snapshot.

The parser lives here, with only the standard library, so a bad argument is a one-line
error (exit 2) even where the trainer's dependencies are missing; the export itself is
imported when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import NoReturn

from kubetrain_api import contract
from kubetrain_api.routing import STORE_ENV

PROG = "kubetrain feedback"
MAX_PAGE_SIZE = 1_000  # the store's MAX_EXPORT_PAGE


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line naming the option (the default prints the whole usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(contract.EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _page_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= MAX_PAGE_SIZE:
        raise argparse.ArgumentTypeError(f"must be in 1..{MAX_PAGE_SIZE}, got {value}")
    return value


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=prog,
        description="Turn the router's feedback into training data.",
    )
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_OneLineParser
    )
    export = commands.add_parser(
        "export",
        help="write the feedback since the last snapshot as a new data set snapshot",
        description="Read the router's feedback (joined with the responses it rates) after "
        "the latest snapshot's cursor and write DEST/<id>/ with sft.jsonl (chat "
        "conversations ending in a correction), preferences.jsonl (TRL DPO "
        "prompt/chosen/rejected), binary.jsonl (TRL KTO prompt/completion/label) and "
        "manifest.json; then point DEST/latest at it. Every text is PII-scrubbed and "
        "deduplicated. Prints the manifest as JSON.",
    )
    export.add_argument(
        "--store",
        default=os.environ.get(STORE_ENV) or None,
        help=f"the router's store: a postgresql:// DSN or a SQLite file (default: ${STORE_ENV})",
    )
    export.add_argument(
        "--out",
        required=True,
        metavar="DEST",
        help="snapshots folder: a path or an fsspec URL (s3://bucket/feedback)",
    )
    export.add_argument("--variant", help="export only this variant's responses")
    export.add_argument(
        "--full",
        action="store_true",
        help="read the whole log, not only the feedback after the latest snapshot",
    )
    export.add_argument(
        "--no-near-dedup",
        dest="near_dedup",
        action="store_false",
        help="keep near-duplicate SFT examples (exact duplicates are always removed)",
    )
    export.add_argument(
        "--page-size",
        type=_page_size,
        default=500,
        metavar="N",
        help=f"feedback rows per store read, 1..{MAX_PAGE_SIZE} (default: 500)",
    )
    # So that errors found after parsing name the subcommand, as argparse's own do.
    export.set_defaults(command_parser=export)
    return parser


def main(argv: list[str], prog: str = PROG) -> int:
    args, extra = build_parser(prog).parse_known_args(argv)
    parser = args.command_parser
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not args.store or not args.store.strip():
        parser.error(
            f"argument --store: give the store (a PostgreSQL DSN or a SQLite file) or set "
            f"${STORE_ENV}"
        )
    if not args.out.strip():
        parser.error("argument --out: must not be empty")
    try:
        from kubetrain_trainer.feedback.export import ExportError, export_snapshot
        from kubetrain_trainer.route.store import StoreError, open_store
    except ImportError as exc:
        print(
            f"{prog} export needs the trainer and serve extras "
            f"(pip install 'kubetrain[trainer,serve]'): {exc}",
            file=sys.stderr,
        )
        return contract.EXIT_USAGE
    try:
        with open_store(args.store) as store:
            result = export_snapshot(
                store,
                args.out,
                variant=args.variant,
                full=args.full,
                near_dedup=args.near_dedup,
                page_size=args.page_size,
            )
    except (StoreError, ExportError, OSError) as exc:
        print(f"{prog} export: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    if result.manifest is None:
        print(f"{prog} export: no feedback in the store yet; nothing written", file=sys.stderr)
    elif not result.created:
        print(
            f"{prog} export: no feedback since snapshot {result.snapshot_id}; nothing written",
            file=sys.stderr,
        )
    else:
        print(f"{prog} export: wrote {result.path}", file=sys.stderr)
    if result.manifest is not None:
        print(json.dumps(result.manifest, indent=2))
    return 0
