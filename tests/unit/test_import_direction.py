"""The import direction of the house, as a test: read with `ast` (every import, module- or
function-level, relative ones resolved), so it is fast, needs none of the heavy packages,
and fails on the line that breaks a rule.

- kubetrain_api imports nothing heavy (no torch, ray, kopf, kubernetes, ...) and none of
  the packages that use it;
- the operator and the CLI's operator side never import the trainer;
- the model server (kubetrain_trainer.serve) imports nothing of training: only itself,
  the API package, kubetrain_trainer.model_folder (what an exported model holds) and
  kubetrain_trainer.storage (fetching a committed model from an object store); the router
  (kubetrain_trainer.route), which runs from the same image, the same, the server and the
  standard-library-only drift modules (feedback.drift, feedback.prompts);
- kubetrain_monitoring imports nothing of ours at run time (TYPE_CHECKING blocks aside);
- no import cycle among module-level imports of our packages.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"operator": ROOT / "operator", "trainer_image": ROOT / "trainer_image"}
OURS = ("kubetrain_api", "kubetrain_cli", "kubetrain_monitoring", "kubetrain_operator")
OURS += ("kubetrain_trainer",)
HEAVY = ("torch", "ray", "kopf", "kubernetes", "transformers", "fastapi", "prometheus_client")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. kubetrain_operator.status
    target: str  # what it imports, absolute, e.g. kubetrain_api.v1alpha1
    line: int
    top_level: bool  # executed on import (not inside a function or TYPE_CHECKING)

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.target}"


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(source: str, module: str, is_package: bool = False) -> list[Import]:
    """Every import in `source`, the text of `module`, with relative ones made absolute."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, top_level: bool, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = top_level and not isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            )
            typing = typing_only or (isinstance(child, ast.If) and _is_type_checking(child))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(module, alias.name, child.lineno, top_level))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    parent = ".".join(parts[: len(parts) - child.level + 1])
                    base = f"{parent}.{base}" if base else parent
                for alias in child.names:
                    # `from a import b` may import module a.b; count both a and a.b.
                    found.append(Import(module, base, child.lineno, top_level))
                    if alias.name != "*":
                        target = f"{base}.{alias.name}"
                        found.append(Import(module, target, child.lineno, top_level))
            # Imports for type checkers only are never executed.
            visit(child, nested and not typing, typing)

    visit(ast.parse(source), True, False)
    return found


def modules() -> Iterator[tuple[str, Path, bool]]:
    for root in SOURCES.values():
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if not parts or parts[0] not in OURS:
                continue
            is_package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_package else parts)
            yield name, path, is_package


def all_imports() -> list[Import]:
    return [
        imp
        for name, path, is_package in modules()
        for imp in imports_of(path.read_text(), name, is_package)
    ]


def _within(target: str, prefixes: tuple[str, ...]) -> bool:
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def violations(imports: list[Import]) -> list[str]:
    """Every broken rule, one line each."""
    # storage: fetching a committed model from an object store; exits: its error class.
    # Both import only fsspec and kubetrain_api. feedback.drift and feedback.prompts: the
    # router's prompt drift (standard library only).
    serve_may = (
        "kubetrain_api",
        "kubetrain_trainer.route",
        "kubetrain_trainer.serve",
        "kubetrain_trainer.model_folder",
        "kubetrain_trainer.storage",
        "kubetrain_trainer.exits",
        "kubetrain_trainer.feedback.drift",
        "kubetrain_trainer.feedback.prompts",
    )
    bad: list[str] = []
    for imp in imports:
        mod, target = imp.module, imp.target
        ours = _within(target, OURS)
        if _within(mod, ("kubetrain_api",)) and (
            _within(target, HEAVY) or (ours and not _within(target, ("kubetrain_api",)))
        ):
            bad.append(f"{imp}: kubetrain_api stays light and imports none of its users")
        if _within(mod, ("kubetrain_operator",)) and _within(target, ("kubetrain_trainer",)):
            bad.append(f"{imp}: the operator never imports the trainer")
        if (
            _within(mod, ("kubetrain_trainer.serve", "kubetrain_trainer.route"))
            and ours
            and not _within(target, serve_may)
            and target != "kubetrain_trainer"  # the package itself: its __init__ is empty
        ):
            bad.append(f"{imp}: the model server imports nothing of training")
        if (
            _within(mod, ("kubetrain_monitoring",))
            and imp.top_level
            and ours
            and not _within(target, ("kubetrain_monitoring",))
        ):
            bad.append(f"{imp}: kubetrain_monitoring imports nothing of ours at run time")
    return bad


def cycles(imports: list[Import]) -> list[list[str]]:
    """Cycles among module-level imports of our own modules."""
    known = {name for name, _, _ in modules()}
    graph: dict[str, set[str]] = {name: set() for name in known}
    for imp in imports:
        # A package importing its own submodules is the usual re-export, not a cycle.
        if (
            imp.top_level
            and imp.target in known
            and imp.target != imp.module
            and not imp.target.startswith(imp.module + ".")
        ):
            graph[imp.module].add(imp.target)
    found: list[list[str]] = []
    state: dict[str, int] = {}

    def dfs(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                dfs(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node, [node])
    return found


IMPORTS = all_imports()


def test_the_source_tree_is_read() -> None:
    names = {name for name, _, _ in modules()}
    assert {"kubetrain_api.v1alpha1", "kubetrain_operator.reconcile"} <= names
    assert "kubetrain_trainer.serve.engine" in names
    assert len(IMPORTS) > 100


def test_no_forbidden_import() -> None:
    assert violations(IMPORTS) == []


def test_no_import_cycle() -> None:
    assert cycles(IMPORTS) == []


# The rules can fail: each synthetic module below breaks one.
BROKEN = [
    ("kubetrain_api.v1alpha1", "import torch\n"),
    ("kubetrain_api.crd", "def f():\n    from kubernetes import client\n"),
    ("kubetrain_api.crd", "from kubetrain_operator import builders\n"),
    ("kubetrain_operator.status", "from kubetrain_trainer import metrics\n"),
    ("kubetrain_operator.status", "def f():\n    import kubetrain_trainer.local\n"),
    ("kubetrain_trainer.serve.engine", "from kubetrain_trainer.data.tokenize import X\n"),
    ("kubetrain_trainer.serve.engine", "from ..export import RUN_INFO_FILE\n"),
    ("kubetrain_trainer.serve.app", "def f():\n    from kubetrain_trainer import models\n"),
    ("kubetrain_trainer.serve.app", "from kubetrain_trainer.loop import train\n"),
    ("kubetrain_trainer.route.store", "from kubetrain_trainer.loop import train\n"),
    ("kubetrain_monitoring.grafana", "from kubetrain_api import v1alpha1\n"),
]


@pytest.mark.parametrize(("module", "source"), BROKEN)
def test_a_forbidden_import_is_caught(module: str, source: str) -> None:
    assert violations(imports_of(source, module)) != []


ALLOWED = [
    ("kubetrain_api.v1alpha1", "import pydantic\nfrom kubetrain_api import crd\n"),
    ("kubetrain_operator.status", "from kubetrain_api import v1alpha1 as api\n"),
    ("kubetrain_trainer.serve.engine", "from ..model_folder import RUN_INFO_FILE\n"),
    ("kubetrain_trainer.serve.engine", "from .schemas import FinishReason\n"),
    (
        "kubetrain_monitoring.grafana",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from kubetrain_api import x\n",
    ),
]


@pytest.mark.parametrize(("module", "source"), ALLOWED)
def test_an_allowed_import_passes(module: str, source: str) -> None:
    assert violations(imports_of(source, module)) == []


def test_a_cycle_is_caught() -> None:
    imports = [
        Import("kubetrain_operator.status", "kubetrain_operator.reconcile", 1, True),
        Import("kubetrain_operator.reconcile", "kubetrain_operator.status", 1, True),
    ]
    assert cycles(imports) == [
        [
            "kubetrain_operator.reconcile",
            "kubetrain_operator.status",
            "kubetrain_operator.reconcile",
        ]
    ]


# KUBECONFIG is the Kubernetes client's convention (k8s.load_configuration); POD_NAME is
# kopf's identity (cli.py); cli.py also hands --metrics-port to settings through the env.
ENV_READERS = {"settings.py", "k8s.py", "cli.py"}


def test_the_operator_reads_the_environment_only_through_its_settings() -> None:
    readers = set()
    for path in (SOURCES["operator"] / "kubetrain_operator").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                readers.add(path.name)
    assert readers <= ENV_READERS, "read it in OperatorSettings.from_env"


# Third-party import name -> the distribution that provides it.
DISTRIBUTIONS = {
    "fastapi": "fastapi",
    "starlette": "fastapi",  # a dependency of fastapi
    "uvicorn": "uvicorn",
    "prometheus_client": "prometheus-client",
    "torch": "torch",
    "transformers": "transformers",
    "jinja2": "jinja2",
    "pydantic": "pydantic",
    "yaml": "PyYAML",
}


def test_the_serve_extra_suffices_for_the_model_server() -> None:
    """Every third-party package that kubetrain_trainer.serve (and what it imports of ours)
    imports is in the base dependencies or the serve extra."""
    import re
    import sys

    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["serve"]
    names = {re.split(r"[<>=\[ ]", spec, maxsplit=1)[0] for spec in declared}
    serving = ("kubetrain_trainer.serve", "kubetrain_trainer.model_folder", "kubetrain_api")
    third_party = {
        imp.target.split(".")[0]
        for imp in IMPORTS
        if _within(imp.module, serving)
        and not _within(imp.target, OURS)
        and imp.target.split(".")[0] not in sys.stdlib_module_names
    }
    assert third_party, "the model server imports third-party packages"
    missing = {m for m in third_party if DISTRIBUTIONS.get(m) not in names}
    assert missing == set(), "add them to the serve extra (and to DISTRIBUTIONS)"
