"""One real node per module: the session's `real_node` if one is already up, else a node of
the module's own (so tests/realnode runs alone, and its teardown test has the machine to
itself)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import realnode


@pytest.fixture(scope="module")
def rnode(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[realnode.RealNode]:
    existing = realnode.existing_node(cluster)
    if existing is not None:
        yield existing
        return
    with realnode.start_node(cluster, tmp_path_factory.mktemp("node")) as node:
        yield node
