"""`kubetrain feedback select` and `kubetrain feedback import`: the active-learning half of
the feedback loop, over the router's store (the library: kubetrain_trainer/feedback/)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kubetrain_api.routing import STORE_ENV

_DURATION = re.compile(r"^(\d+)([smhd])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def add_commands(commands: Any) -> None:
    """The `feedback` group and its `select` and `import` subcommands."""
    group = commands.add_parser(
        "feedback",
        help="work with the router's log: pick prompts to label, import labels",
        description="Work with the feedback the router logs (its store: a SQLite file or a "
        f"PostgreSQL DSN, --store or ${STORE_ENV}).",
    )
    sub = group.add_subparsers(dest="feedback_command", metavar="COMMAND", required=True)
    add_select(sub)
    add_import(sub)


def add_select(sub: Any) -> None:
    select = sub.add_parser(
        "select",
        help="pick the most informative unlabelled prompts for labelling (JSONL)",
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
    select.add_argument("--out", required=True, type=Path, metavar="FILE")
    select.set_defaults(func=_cmd_select)


def add_import(sub: Any) -> None:
    imp = sub.add_parser(
        "import",
        help="import labels and corrections (JSONL) as feedback",
        description="Import a JSONL file of labels: response_id, rating (-1/0/1 or "
        "down/neutral/up), label, correction, caller. Every line is checked first: a bad "
        "line is reported with its number and field, and then nothing is imported.",
    )
    _store_option(imp)
    imp.add_argument("file", type=Path, metavar="FILE")
    imp.add_argument("--caller", help="who labelled, for lines without `caller`")
    imp.set_defaults(func=_cmd_import)


def _store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        default=os.environ.get(STORE_ENV),
        metavar="TARGET",
        help=f"the router's store: a SQLite file or postgresql://... (default: ${STORE_ENV})",
    )


def _cmd_select(args: argparse.Namespace) -> int:
    from kubetrain_trainer.feedback.select import SelectError, select_for_labelling
    from kubetrain_trainer.route.store import StoreError, open_store

    if not args.store:
        return _fail("select", f"--store: required (or set ${STORE_ENV})")
    try:
        with open_store(args.store) as store:
            picked = select_for_labelling(
                store, args.budget, since=args.since, variant=args.variant
            )
    except (StoreError, SelectError) as exc:
        return _fail("select", str(exc))
    lines = "".join(json.dumps(s.to_dict(), ensure_ascii=False) + "\n" for s in picked)
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(lines, encoding="utf-8")
        tmp.replace(args.out)  # never a half-written selection
    except OSError as exc:
        return _fail("select", f"--out: cannot write {args.out}: {exc.strerror}")
    print(f"selected {len(picked)} prompts for labelling into {args.out}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from kubetrain_trainer.feedback.labels import LabelError, import_labels, parse_labels
    from kubetrain_trainer.route.store import StoreError, open_store

    if not args.store:
        return _fail("import", f"--store: required (or set ${STORE_ENV})")
    try:
        text = args.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return _fail("import", f"{args.file}: cannot read: {exc}")
    try:
        labels = parse_labels(text.splitlines(), default_caller=args.caller)
        with open_store(args.store) as store:
            result = import_labels(store, labels)
    except LabelError as exc:
        return _fail("import", f"{args.file}: {exc}; nothing was imported")
    except StoreError as exc:
        return _fail("import", str(exc))
    print(
        f"imported {result.total} labels from {args.file} "
        f"({result.created} new, {result.replaced} replacing earlier ones)"
    )
    return 0


def _fail(command: str, message: str) -> int:
    print(f"kubetrain feedback {command}: error: {message}", file=sys.stderr)
    return 1


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
