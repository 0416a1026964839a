"""Fixtures for the operator's unit tests (no cluster)."""

from __future__ import annotations

import pytest

from kubetrain_operator.settings import OperatorSettings


@pytest.fixture
def settings() -> OperatorSettings:
    """The operator's defaults, as an installation without overrides runs it."""
    return OperatorSettings()
