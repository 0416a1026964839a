"""`kubetrain lineage MODEL`: the chain from an exported model back through its parents to
their data, as an indented tree or (`--json`) one JSON object. `kubetrain lineage
modelservice/NAME` does it for every model a ModelService serves now (read from its status
with the kubeconfig's credentials; `pvc://` models under $KUBETRAIN_PVC_ROOT, where a pod
that mounts the claims at /mnt/<claim> finds them)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

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
    parser.add_argument(
        "model",
        metavar="PATH_OR_URL",
        help="an exported model folder, or modelservice/NAME (ms/NAME) for the models a "
        "ModelService serves",
    )
    parser.add_argument("-n", "--namespace", default="default", help="the ModelService's")
    parser.add_argument("--json", action="store_true", help="print the chain as JSON")
    parser.set_defaults(func=main)


SERVICE_PREFIXES = ("modelservice/", "modelservices/", "ms/")


def main(args: argparse.Namespace) -> int:
    if args.model.startswith(SERVICE_PREFIXES):
        return _service(args.model.split("/", 1)[1], args.namespace, args.json)
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


def _service(name: str, namespace: str, as_json: bool) -> int:
    """The chain of every variant's model, from the ModelService's status."""
    try:
        status = _service_status(name, namespace)
    except Exception as exc:  # any client error: credentials, 404, network
        print(f"kubetrain lineage: modelservice/{name}: {_short(exc)}", file=sys.stderr)
        return 1
    out: list[dict[str, object]] = []
    failed = False
    for variant in status.get("variants") or []:
        uri = variant.get("modelUri")
        head = f"variant {variant.get('name')} ({variant.get('weight')}% of the traffic)"
        if not uri:
            print(f"{head}: no model yet ({variant.get('message') or 'not resolved'})")
            continue
        try:
            where = contract.pvc_path(uri) if uri.startswith("pvc://") else uri
            chain = load_chain(where, _read_url)
        except (LineageError, ValueError) as exc:
            print(f"kubetrain lineage: {head}: {exc}", file=sys.stderr)
            failed = True
            continue
        if as_json:
            out.append({"variant": variant.get("name"), **chain_json(chain)})
        else:
            print(f"{head}, {uri}:")
            print("".join(f"  {line}\n" for line in render_tree(chain).splitlines()), end="")
    if as_json:
        print(json.dumps({"modelService": name, "variants": out}, indent=2))
    return 1 if failed else 0


def _service_status(name: str, namespace: str) -> dict[str, Any]:
    from kubernetes import client

    from kubetrain_api import modelservice as ms
    from kubetrain_api import v1alpha1 as api_v1
    from kubetrain_operator.k8s import load_configuration

    api = client.CustomObjectsApi(client.ApiClient(load_configuration()))
    body = api.get_namespaced_custom_object(
        api_v1.GROUP, api_v1.VERSION, namespace, ms.PLURAL, name, _request_timeout=30
    )
    status = body.get("status") if isinstance(body, dict) else None
    return dict(status or {})


def _short(exc: Exception) -> str:
    reason = getattr(exc, "reason", None)
    status = getattr(exc, "status", None)
    if status is not None:
        return f"HTTP {status} {reason or ''}".strip()
    return " ".join(str(exc).split())[:300]


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
