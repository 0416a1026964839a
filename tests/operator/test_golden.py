"""Golden files: what the operator creates for the quickstart run and for the example
ModelService is reviewed as a diff.

After an intended change, `make golden` rewrites tests/golden/quickstart/ and
tests/golden/modelservice-ab/, and the diff of those files goes into the same commit."""

from __future__ import annotations

import pytest

from tests.golden import render

RENDERED = render.render()


def test_the_golden_folder_holds_exactly_the_rendered_children() -> None:
    on_disk = sorted(path.name for path in render.GOLDEN.glob("*.yaml"))
    assert on_disk == sorted(RENDERED), "run `make golden` and review the diff"


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_rendered_child_matches_its_golden_file(name: str) -> None:
    path = render.GOLDEN / name
    assert path.exists(), f"{name} is new: run `make golden` and review the diff"
    assert RENDERED[name] == path.read_text(), f"{name} changed: run `make golden`, review"


def test_rendering_is_deterministic() -> None:
    assert render.render() == RENDERED


MODELSERVICE = render.render_modelservice()


def test_the_modelservice_golden_folder_holds_exactly_its_rendered_children() -> None:
    on_disk = sorted(path.name for path in render.MODELSERVICE_GOLDEN.glob("*.yaml"))
    assert on_disk == sorted(MODELSERVICE), "run `make golden` and review the diff"


@pytest.mark.parametrize("name", sorted(MODELSERVICE))
def test_rendered_modelservice_child_matches_its_golden_file(name: str) -> None:
    path = render.MODELSERVICE_GOLDEN / name
    assert path.exists(), f"{name} is new: run `make golden` and review the diff"
    assert MODELSERVICE[name] == path.read_text(), f"{name} changed: run `make golden`, review"


def test_modelservice_rendering_is_deterministic() -> None:
    assert render.render_modelservice() == MODELSERVICE
