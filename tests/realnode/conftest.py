"""tests/realnode's tests share one module-scoped node."""

from __future__ import annotations

import pytest

from tests.support import realnode


@pytest.fixture(scope="module")
def rnode(real_node: realnode.RealNode) -> realnode.RealNode:
    return real_node
