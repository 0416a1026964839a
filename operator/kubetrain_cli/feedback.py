"""`kubetrain feedback`: the router's log as training data and labelling work.

`export` writes versioned data set snapshots (or, with `--select uncertain --budget N`, the
prompts most worth labelling); `import` brings the labels back as feedback. The library is
kubetrain_trainer/feedback/.

The parser lives here, with only the standard library, so a bad argument is a one-line
error (exit 2) even where the trainer's dependencies are missing; the export itself is
imported when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

from kubetrain_api import contract
from kubetrain_api.routing import STORE_ENV

PROG = "kubetrain feedback"
MAX_PAGE_SIZE = 1_000  # the store's MAX_EXPORT_PAGE
SELECTIONS = ("uncertain",)
_DURATION = re.compile(r"^(\d+)([smhd])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


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
        "--select",
        choices=SELECTIONS,
        help="instead of a snapshot, write the unlabelled prompts most worth labelling to "
        "--out (a JSONL file): the model least sure of its answer, unlike each other",
    )
    export.add_argument(
        "--budget", type=_positive, metavar="N", help="with --select: how many prompts"
    )
    export.add_argument(
        "--since",
        type=_since,
        metavar="WHEN",
        help="with --select: only responses logged since WHEN, an ISO 8601 time (UTC when "
        "without a zone) or a duration back from now (30m, 24h, 7d)",
    )
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
        "--result-file",
        metavar="PATH",
        help="also write a compact JSON summary (id, uri, counts, sft sha256) here: the "
        "operator's export Job uses its termination message (/dev/termination-log)",
    )
    export.add_argument(
        "--page-size",
        type=_page_size,
        default=500,
        metavar="N",
        help=f"feedback rows per store read, 1..{MAX_PAGE_SIZE} (default: 500)",
    )
    # So that errors found after parsing name the subcommand, as argparse's own do.
    export.set_defaults(command_parser=export, run=_cmd_export)
    _add_select(commands)
    _add_import(commands)
    return parser


def _add_select(commands: argparse._SubParsersAction[_OneLineParser]) -> None:
    select = commands.add_parser(
        "select",
        help="pick the most informative unlabelled prompts for labelling (JSONL); the same "
        "as `export --select uncertain`",
        description="Pick up to N logged prompts to label: unlabelled, the model most "
        "uncertain of its answer, and unlike each other (paraphrases of one question count "
        "once). Writes one JSON object per line: response_id, prompt, response, score, ...; "
        "fill in rating/label/correction and give the file to `kubetrain feedback import`.",
    )
    _store_option(select)
    select.add_argument("--budget", type=_positive, required=True, metavar="N")
    select.add_argument(
        "--since",
        type=_since,
        metavar="WHEN",
        help="only responses logged since WHEN: an ISO 8601 time (UTC when without a zone) "
        "or a duration back from now (30m, 24h, 7d)",
    )
    select.add_argument("--variant", help="only this variant's responses")
    select.add_argument("--out", required=True, metavar="FILE")
    select.set_defaults(command_parser=select, run=_cmd_select)


def _add_import(commands: argparse._SubParsersAction[_OneLineParser]) -> None:
    imp = commands.add_parser(
        "import",
        help="import labels and corrections (JSONL) as feedback",
        description="Import a JSONL file of labels: response_id, rating (-1/0/1 or "
        "down/neutral/up), label, correction, caller. Every line is checked first: a bad "
        "line is reported with its number and field, and then nothing is imported.",
    )
    _store_option(imp)
    imp.add_argument("file", type=Path, metavar="FILE")
    imp.add_argument("--caller", help="who labelled, for lines without `caller`")
    imp.set_defaults(command_parser=imp, run=_cmd_import)


def _store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        default=os.environ.get(STORE_ENV) or None,
        help=f"the router's store: a postgresql:// DSN or a SQLite file (default: ${STORE_ENV})",
    )


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value!r}")
    return number


def _since(value: str) -> float:
    """Unix seconds from an ISO 8601 time or a duration back from now."""
    match = _DURATION.match(value.strip())
    if match:
        return time.time() - int(match[1]) * _SECONDS[match[2]]
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 time or a duration such as 24h: {value!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


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
    if args.command == "export" and args.select is None:
        for option in ("budget", "since"):
            if getattr(args, option) is not None:
                parser.error(f"argument --{option}: only with --select")
    if args.command == "export" and args.select is not None and args.budget is None:
        parser.error("argument --budget: required with --select")
    if args.command in ("export", "select") and not args.out.strip():
        parser.error("argument --out: must not be empty")
    if args.command == "export" and args.select is not None:
        return _cmd_select(args, prog)
    return int(args.run(args, prog))


def _trainer_missing(prog: str, exc: ImportError) -> int:
    print(
        f"{prog} needs the trainer and serve extras "
        f"(pip install 'kubetrain[trainer,serve]'): {exc}",
        file=sys.stderr,
    )
    return contract.EXIT_USAGE


def _cmd_export(args: argparse.Namespace, prog: str) -> int:
    try:
        from kubetrain_trainer.feedback.export import ExportError, export_snapshot
        from kubetrain_trainer.route.store import StoreError, open_store
    except ImportError as exc:
        return _trainer_missing(f"{prog} export", exc)
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
    if args.result_file:
        try:
            Path(args.result_file).write_text(json.dumps(snapshot_summary(result)))
        except OSError as exc:
            return _fail(prog, "export", f"--result-file: cannot write: {exc.strerror}")
    return 0


def snapshot_summary(result: Any) -> dict[str, Any]:
    """The snapshot as status.retraining records it (kubetrain_api.modelservice's
    FeedbackSnapshotStatus, camelCase), small enough for a termination message."""
    manifest = result.manifest
    if manifest is None:
        return {}
    counts = manifest.get("counts") or {}
    sft = (manifest.get("files") or {}).get(contract.SNAPSHOT_SFT_FILE) or {}
    return {
        "id": result.snapshot_id,
        "uri": result.path,
        "sha256": sft.get("sha256"),
        **{kind: int(counts.get(kind, 0)) for kind in ("sft", "preferences", "binary")},
    }


def _cmd_select(args: argparse.Namespace, prog: str) -> int:
    try:
        from kubetrain_trainer.feedback.select import SelectError, select_for_labelling
        from kubetrain_trainer.route.store import StoreError, open_store
    except ImportError as exc:
        return _trainer_missing(f"{prog} {args.command}", exc)
    try:
        with open_store(args.store) as store:
            picked = select_for_labelling(
                store, args.budget, since=args.since, variant=args.variant
            )
    except (StoreError, SelectError) as exc:
        return _fail(prog, args.command, str(exc))
    lines = "".join(json.dumps(s.to_dict(), ensure_ascii=False) + "\n" for s in picked)
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(lines, encoding="utf-8")
        tmp.replace(out)  # never a half-written selection
    except OSError as exc:
        return _fail(prog, args.command, f"--out: cannot write {out}: {exc.strerror}")
    print(f"selected {len(picked)} prompts for labelling into {out}")
    return 0


def _cmd_import(args: argparse.Namespace, prog: str) -> int:
    try:
        from kubetrain_trainer.feedback.labels import LabelError, import_labels, parse_labels
        from kubetrain_trainer.route.store import StoreError, open_store
    except ImportError as exc:
        return _trainer_missing(f"{prog} import", exc)
    try:
        text = args.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return _fail(prog, "import", f"{args.file}: cannot read: {exc}")
    try:
        labels = parse_labels(text.splitlines(), default_caller=args.caller)
        with open_store(args.store) as store:
            result = import_labels(store, labels)
    except LabelError as exc:
        return _fail(prog, "import", f"{args.file}: {exc}; nothing was imported")
    except StoreError as exc:
        return _fail(prog, "import", str(exc))
    print(
        f"imported {result.total} labels from {args.file} "
        f"({result.created} new, {result.replaced} replacing earlier ones)"
    )
    return 0


def _fail(prog: str, command: str, message: str) -> int:
    print(f"{prog} {command}: error: {message}", file=sys.stderr)
    return 1
