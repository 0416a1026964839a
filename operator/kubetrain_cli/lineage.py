"""`kubetrain lineage MODEL`: the chain from an exported model back through its parents to
their data, as an indented tree or (`--json`) one JSON object."""

from __future__ import annotations

import argparse
import json
import sys

from kubetrain_api import contract
from kubetrain_api.lineage import NOT_FOLLOWED, ChainLink, LineageError, ModelLineage, load_chain

SHORT = 12
"""Hex digits of an id shown in the tree (the JSON has them whole)."""


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "lineage",
        help="show where an exported model came from: parents, data, runs",
        description="Print the chain from an exported model folder (a path or a URL such as "
        f"s3://bucket/run/model) back through its parent models to their data, read from "
        f"each folder's {contract.LINEAGE_FILE}.",
    )
    parser.add_argument("model", metavar="PATH_OR_URL", help="an exported model folder")
    parser.add_argument("--json", action="store_true", help="print the chain as JSON")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        chain = load_chain(args.model, _read_url)
    except (LineageError, ValueError) as exc:
        print(f"kubetrain lineage: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(chain_json(chain), indent=2))
    else:
        print(render_tree(chain), end="")
    return 0


def chain_json(chain: list[ChainLink]) -> dict[str, object]:
    """{"model": where the first was read, "chain": [{location, lineage, note}, ...]} with
    the model first and the oldest ancestor last."""
    return {
        "model": chain[0].location,
        "chain": [link.model_dump(by_alias=True, mode="json") for link in chain],
    }


def render_tree(chain: list[ChainLink]) -> str:
    lines: list[str] = []
    for depth, link in enumerate(chain):
        pad = "    " * depth
        if link.lineage is None:
            lines.append(f"{pad}{link.location}  ({link.note})")
            continue
        lines += [pad + line for line in _model_lines(link.location, link.lineage)]
        if link.note:
            lines.append(f"{pad}  warning: {link.note}")
        parent = link.lineage.parent
        if depth + 1 == len(chain):  # the chain ends at this model's parent
            lines.append(f"{pad}  parent: {parent.source}  ({_end(parent.source, parent.init)})")
        else:
            lines.append(f"{pad}  parent:")
    return "\n".join(lines) + "\n"


def _model_lines(location: str, record: ModelLineage) -> list[str]:
    run = record.run
    who = f"run {run.namespace}/{run.name}" if run.namespace else f"run {run.name}"
    if run.uid:
        who += f" (uid {run.uid})"
    made = [who, record.method]
    if record.step is not None:
        made.append(f"{record.step} steps")
    made.append(f"kubetrain {record.kubetrain_version}")
    made.append(f"image {record.image}" if record.image else "no image (local run)")
    lines = [
        f"model {location}  (lineage {record.id[:SHORT]}, generation {record.generation})",
        f"  {', '.join(made)}",
        f"  created {record.created.isoformat()}",
    ]
    if record.id != record.content_id():
        lines.append("  warning: the record was edited after export (its id does not match)")
    lines.append("  data:")
    for source in record.data:
        facts = [source.uri]
        if source.snapshot_id:
            facts.append(f"snapshot {source.snapshot_id[:SHORT]}")
        if source.sha256:
            facts.append(f"sha256 {source.sha256[:SHORT]}")
        if source.documents is not None:
            facts.append(f"{source.documents} documents")
        lines.append(f"    {source.name}: {'  '.join(facts)}")
    if not record.data:
        lines.append("    (none recorded)")
    return lines


def _end(source: str, init: str) -> str:
    if init == "random":
        return "architecture only: trained from random weights"
    return NOT_FOLLOWED.get(source.split("://", 1)[0], "not a kubetrain export")


def _read_url(url: str) -> bytes | None:
    try:
        from kubetrain_trainer.lineage import read_url
    except ImportError as exc:  # fsspec comes with the trainer and object-store extras
        raise LineageError(
            f"{url}: reading URLs needs fsspec (pip install 'kubetrain[object-store]'): {exc}"
        ) from None
    data: bytes | None = read_url(url)
    return data
