"""Golden files: every child the operator creates for the quickstart run, and for the
ModelService of examples/modelservice-ab.yaml, as YAML.

`python -m tests.golden.render` (`make golden`) rewrites `tests/golden/quickstart/` and
`tests/golden/modelservice-ab/`;
`tests/operator/test_golden.py` fails when what the builders render differs, so a change to
what the operator creates shows up as a reviewable diff of these files. The inputs are fixed
(uid, namespace, attempt, settings, token, model version) and keys are sorted: the output
is deterministic and a diff shows content, not the order a builder happened to use.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from kubetrain_api.documents import parse_document
from kubetrain_api.modelservice import ModelService, weights
from kubetrain_api.validation import load_documents, parse
from kubetrain_operator import builders, serving
from kubetrain_operator.modelservice import build
from kubetrain_operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "quickstart.yaml"
GOLDEN = Path(__file__).resolve().parent / "quickstart"
UID = "00000000-0000-4000-8000-000000000001"
NS = "golden"
ATTEMPT = 1
TOKEN = "golden-ray-token"
MODEL_VERSION = "quickstart-golden"
SETTINGS = OperatorSettings()
MODELSERVICE_EXAMPLE = ROOT / "examples" / "modelservice-ab.yaml"
MODELSERVICE_GOLDEN = Path(__file__).resolve().parent / "modelservice-ab"
# What the reconciler resolves the example's variants to: each TrainingRun's exported model
# on its storage claim.
MODELS = {
    name: build.ModelSource(
        version=f"chat-{name}-golden",
        claim=f"chat-{name}-storage",
        sub_path=f"chat-{name}-00000000/model",
    )
    for name in ("a", "b")
}


def render() -> dict[str, str]:
    """File name -> YAML text of every child of the quickstart run, in apply order."""
    run = parse(load_documents(EXAMPLE.read_text())[0])
    objs: list[dict[str, Any]] = [
        *builders.build_cluster(run, UID, NS, ATTEMPT, SETTINGS, TOKEN),
        *serving.build_serving(run, UID, NS, SETTINGS, MODEL_VERSION),
    ]
    return _files(objs)


def render_modelservice() -> dict[str, str]:
    """File name -> YAML text of every child of the example's ModelService, in apply
    order, at the spec's split."""
    (doc,) = [
        d for d in load_documents(MODELSERVICE_EXAMPLE.read_text()) if d["kind"] == "ModelService"
    ]
    ms = parse_document(doc)
    assert isinstance(ms, ModelService)
    return _files(build.build_children(ms, UID, NS, SETTINGS, MODELS, weights(ms.spec)))


def _files(objs: list[dict[str, Any]]) -> dict[str, str]:
    files = {}
    for index, obj in enumerate(objs):
        name = f"{index:02d}-{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"
        files[name] = yaml.safe_dump(obj, sort_keys=True, width=100)
    return files


def write(folder: Path = GOLDEN, files: dict[str, str] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.yaml"):
        stale.unlink()
    for name, text in (render() if files is None else files).items():
        (folder / name).write_text(text)


if __name__ == "__main__":
    write()
    write(MODELSERVICE_GOLDEN, render_modelservice())
    for folder in (GOLDEN, MODELSERVICE_GOLDEN):
        print(f"wrote {len(list(folder.glob('*.yaml')))} files to {folder}", file=sys.stderr)
