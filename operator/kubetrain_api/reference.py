"""Render the API reference (Markdown) from the same schema the CRD carries.

`python -m kubetrain_api.reference > docs/api-reference.md`; a test fails when the committed
file drifts from the models.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

from kubetrain_api import crd

Schema = dict[str, Any]


def _type(node: Schema) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "int or quantity"
    kind = str(node.get("type", "object"))
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    if kind == "array":
        return f"[]{_type(node['items'])}"
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"map[string]{_type(node['additionalProperties'])}"
    bounds = []
    if "minimum" in node:
        bounds.append((">" if node.get("exclusiveMinimum") else ">=") + f" {node['minimum']}")
    if "maximum" in node:
        bounds.append(("<" if node.get("exclusiveMaximum") else "<=") + f" {node['maximum']}")
    return kind + (f" ({', '.join(bounds)})" if bounds else "")


def _objects(node: Schema, path: str) -> Iterator[tuple[str, Schema]]:
    """Every object with named fields, depth first, list items named `path[]`."""
    if "properties" in node:
        yield path, node
        for name, child in node["properties"].items():
            yield from _objects(child, f"{path}.{name}")
    if "items" in node:
        yield from _objects(node["items"], f"{path}[]")


def _tables(schema: Schema, prefix: str = "") -> list[str]:
    lines: list[str] = []
    for root in ("spec", "status"):
        for path, obj in _objects(schema["properties"][root], prefix + root):
            required = set(obj.get("required", []))
            lines += [f"## `{path}`", "", obj.get("description", ""), ""]
            lines += ["| Field | Type | Description |", "| --- | --- | --- |"]
            for name, child in obj["properties"].items():
                mark = " (required)" if name in required else ""
                text = child.get("description", "").replace("|", "\\|")
                lines.append(f"| `{name}`{mark} | {_type(child)} | {text} |")
            lines.append("")
    return lines


def render() -> str:
    lines = [
        "# TrainingRun API reference (kubetrain.dev/v1alpha1)",
        "",
        "Generated from `operator/kubetrain_api/v1alpha1.py` by "
        "`python -m kubetrain_api.reference`; do not edit. `kubectl explain trainingrun.spec` "
        "shows the same text on a cluster.",
        "",
    ]
    lines += _tables(crd.trainingrun_schema())
    lines += [
        "# ModelService API reference (kubetrain.dev/v1alpha1)",
        "",
        "Generated from `operator/kubetrain_api/modelservice.py`; `kubectl explain "
        "modelservice.spec` shows the same text on a cluster. Short name: `ms`. Rules beyond "
        "the schema (weights summing to 100, the experiment naming existing variants, SQLite "
        "with one router replica) are checked by `kubetrain validate`.",
        "",
    ]
    lines += _tables(crd.modelservice_schema(), "modelservice.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render())
