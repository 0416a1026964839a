"""The generated CRD: no drift from the models, and an API lint of its schema."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetrain_api import crd

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "crds" / crd.CRD_FILENAME

Node = dict[str, Any]

# kind -> (the CRD object, its file name): the API lint holds for every generated CRD.
CRDS: dict[str, tuple[Callable[[], Node], str]] = {
    "TrainingRun": (crd.trainingrun_crd, crd.CRD_FILENAME),
    "ModelService": (crd.modelservice_crd, crd.MODELSERVICE_CRD_FILENAME),
}


@pytest.fixture(params=sorted(CRDS))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def schema(kind: str = "TrainingRun") -> Node:
    make, _ = CRDS[kind]
    return make()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def walk(node: Node, path: str = "") -> Iterator[tuple[str, Node]]:
    """Every schema node with its field path (`[]` for list items, `{}` for map values)."""
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}" if path else name)
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")


def test_committed_crd_matches_the_models(kind: str) -> None:
    _, filename = CRDS[kind]
    assert (ROOT / "crds" / filename).read_text() == crd.render_crds()[filename], (
        "crds/ drifted from operator/kubetrain_api: run `kubetrain crds` and commit"
    )


def test_chart_crd_matches_the_models(kind: str) -> None:
    _, filename = CRDS[kind]
    chart_copy = ROOT / "helm" / "kubetrain" / "crds" / filename
    assert chart_copy.read_text() == crd.render_crds()[filename], (
        "helm/kubetrain/crds/ drifted from operator/kubetrain_api: run `kubetrain crds`"
    )


def test_every_crd_is_generated() -> None:
    assert sorted(crd.render_crds()) == sorted(filename for _, filename in CRDS.values())
    on_disk = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    assert on_disk == sorted(crd.render_crds())


def test_crd_is_not_hand_edited() -> None:
    assert COMMITTED.read_text().startswith(crd.HEADER)
    modelservice = ROOT / "crds" / crd.MODELSERVICE_CRD_FILENAME
    assert modelservice.read_text().startswith(crd.MODELSERVICE_HEADER)


def test_every_string_is_bounded(kind: str) -> None:
    unbounded = [
        path
        for path, node in walk(schema(kind))
        if node.get("type") == "string"
        and not ({"maxLength", "enum", "format"} & node.keys())
        and path not in ("apiVersion", "kind")  # checked by the API server itself
    ]
    assert unbounded == []


def test_every_list_and_map_is_bounded(kind: str) -> None:
    lists = [p for p, n in walk(schema(kind)) if n.get("type") == "array" and "maxItems" not in n]
    maps = [
        p
        for p, n in walk(schema(kind))
        if n.get("type") == "object"
        and ("additionalProperties" in n or n.get("x-kubernetes-preserve-unknown-fields"))
        and "maxProperties" not in n
    ]
    assert lists == []
    assert maps == []


def test_schema_is_structural(kind: str) -> None:
    """The rules of a structural schema that pydantic's output would break."""
    problems = []
    for path, node in walk(schema(kind)):
        if node.get("x-kubernetes-int-or-string"):
            if "type" in node or node.get("anyOf") != [{"type": "integer"}, {"type": "string"}]:
                problems.append(f"{path}: malformed int-or-string")
            continue
        if "type" not in node:
            problems.append(f"{path}: no type")
        for key in ("$ref", "allOf", "oneOf", "anyOf", "const", "default", "title", "$defs"):
            if key in node:
                problems.append(f"{path}: has {key}")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{path}: properties and additionalProperties together")
        if isinstance(node.get("exclusiveMinimum"), (int, float)) and not isinstance(
            node["exclusiveMinimum"], bool
        ):
            problems.append(f"{path}: exclusiveMinimum must be boolean in OpenAPI v3.0")
        if (
            node.get("type") == "object"
            and not (
                {"properties", "additionalProperties", "x-kubernetes-preserve-unknown-fields"}
                & node.keys()
            )
            and path != "metadata"
        ):
            problems.append(f"{path}: object without properties")
    assert problems == []


# Words YAML 1.1 reads as booleans or null when bare; kubectl's YAML reader is YAML 1.1, and
# PyYAML (1.1 too, but without y/n) writes them unquoted, so a field so named breaks the file.
YAML11_WORDS = {
    word
    for base in ("y", "n", "yes", "no", "on", "off", "true", "false", "null")
    for word in (base, base.capitalize(), base.upper())
} | {"~"}


def test_no_field_name_is_a_yaml_1_1_word(kind: str) -> None:
    names = [
        path
        for path, node in walk(schema(kind))
        for name in node.get("properties", {})
        if name in YAML11_WORDS
    ]
    assert names == []


def test_every_field_is_described(kind: str) -> None:
    undescribed = [
        path
        for path, node in walk(schema(kind))
        if path
        and path != "metadata"
        and not path.endswith(("[]", "{}"))
        and not node.get("description")
    ]
    assert undescribed == []


def test_status_fields_are_optional_and_conditions_are_keyed_by_type(kind: str) -> None:
    status = schema(kind)["properties"]["status"]
    # The operator merge-patches status piece by piece, so no object may need a key; list
    # items may (a merge patch replaces a list whole, items complete).
    required_in_status = [
        path for path, node in walk(status, "status") if node.get("required") and "[]" not in path
    ]
    assert required_in_status == []
    conditions = status["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    # A list-map key must be required in the items.
    assert "type" in conditions["items"]["required"]
    # Only the standard condition fields.
    assert set(conditions["items"]["properties"]) == {
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
        "observedGeneration",
    }


def test_spec_is_required_and_status_is_a_subresource(kind: str) -> None:
    make, _ = CRDS[kind]
    version = make()["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert schema(kind)["required"] == ["spec"]


def test_names() -> None:
    names = crd.trainingrun_crd()["spec"]["names"]
    assert names["shortNames"] == ["tr"]
    assert "kubetrain" in names["categories"]
    assert crd.trainingrun_crd()["metadata"]["name"] == "trainingruns.kubetrain.dev"


@pytest.mark.parametrize(
    ("kind", "column"),
    [("TrainingRun", c) for c in crd.PRINTER_COLUMNS]
    + [("ModelService", c) for c in crd.MODELSERVICE_PRINTER_COLUMNS],
    ids=lambda c: c if isinstance(c, str) else c["name"],
)
def test_printer_columns_point_at_schema_fields(kind: str, column: Node) -> None:
    if column["jsonPath"].startswith(".metadata."):
        return
    path = column["jsonPath"].lstrip(".")
    fields = dict(walk(schema(kind)))
    assert path in fields, f"{column['name']} reads {path}, which the schema does not have"
    expected = {"integer": "integer", "number": "number", "string": "string"}[column["type"]]
    assert fields[path]["type"] == expected


def test_modelservice_names_and_columns() -> None:
    names = crd.modelservice_crd()["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (
        "ModelService",
        "modelservices",
        ["ms"],
    )
    assert crd.modelservice_crd()["metadata"]["name"] == "modelservices.kubetrain.dev"
    default = [c["name"] for c in crd.MODELSERVICE_PRINTER_COLUMNS if not c.get("priority")]
    assert default == ["Variants", "Traffic", "Decision", "Gen", "Age"]


def test_default_columns_are_phase_progress_loss_generation_age() -> None:
    default = [c["name"] for c in crd.PRINTER_COLUMNS if not c.get("priority")]
    assert default == ["Phase", "Progress", "Loss", "Gen", "Age"]


def test_defaults_are_documented_not_applied_by_the_server() -> None:
    spec = schema()["properties"]["spec"]
    strategy = spec["properties"]["distributed"]["properties"]["strategy"]
    assert "default" not in strategy
    assert strategy["description"].endswith("Default: fsdp.")


def test_yaml_is_plain_data(kind: str) -> None:
    """The file parses with a safe loader and round-trips."""
    make, filename = CRDS[kind]
    loaded = yaml.safe_load((ROOT / "crds" / filename).read_text())
    assert loaded == make()


def test_api_reference_is_current() -> None:
    from kubetrain_api import reference

    committed = (ROOT / "docs" / "api-reference.md").read_text()
    assert committed == reference.render(), (
        "docs/api-reference.md drifted: run `make docs` and commit"
    )
