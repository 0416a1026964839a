"""The node runner's fixture, and its logs attached to the reports of failed tests."""

from tests.support.node import node, pytest_runtest_makereport

__all__ = ["node", "pytest_runtest_makereport"]
