"""The bounded YAML reader, through the commands users run: `kubetrain validate` and
`kubetrain run` refuse hostile or broken files with one line naming the problem, exit 1,
and never print a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubetrain_api import validation

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).parent / "invalid"
RUN = (ROOT / "examples" / "quickstart.yaml").read_text()


def kubetrain(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "operator"), str(ROOT / "trainer_image"), str(ROOT), env.get("PYTHONPATH", "")]
    )
    return subprocess.run(
        [sys.executable, "-m", "kubetrain_cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


# name -> (file contents, a part of the one-line reason)
FILES: dict[str, tuple[bytes, str]] = {
    "too-large": (b"# padding\n" * 110_000, "is larger than 1048576 bytes"),
    "alias-bomb": ((CORPUS / "yaml-alias-bomb.yaml").read_bytes(), "expands to more than"),
    "too-deep": ((CORPUS / "yaml-too-deep.yaml").read_bytes(), "nests deeper than 64"),
    "binary": ((CORPUS / "yaml-binary.yaml").read_bytes(), "is binary"),
    "latin-1": ((CORPUS / "yaml-not-utf8.yaml").read_bytes(), "is not UTF-8 text"),
    "not-yaml": (b"spec: [unclosed\n", "is not valid YAML"),
    "self-alias": (b"spec: &a {x: *a}\n", "inside its own anchor"),
}


def test_kubetrain_validate_refuses_each_in_one_line(tmp_path: Path) -> None:
    paths = {}
    for name, (data, _) in FILES.items():
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_bytes(data)
    # One process for all files (each start costs a second); each gets its own line.
    out = kubetrain("validate", *map(str, paths.values()))
    assert out.returncode == 1, out
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == len(FILES), out.stderr
    for line, (name, (_, reason)) in zip(lines, FILES.items(), strict=True):
        assert line.startswith(f"{paths[name]}: cannot read: "), line
        assert reason in line, line


def test_kubetrain_run_refuses_in_one_line(tmp_path: Path) -> None:
    # `kubetrain run` reads the file before it imports torch or starts Ray.
    path = tmp_path / "bomb.yaml"
    path.write_bytes(FILES["alias-bomb"][0])
    out = kubetrain("run", str(path), "--output-dir", str(tmp_path / "runs"))
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    assert "expands to more than" in out.stderr, out.stderr


ODD_DOCUMENTS = [
    "apiVersion: kubetrain.dev/v1alpha1\nkind: TrainingRun\nmetadata: [a]\nspec: {}\n",
    "apiVersion: kubetrain.dev/v1alpha1\nkind: TrainingRun\nmetadata: {name: x}\n"
    "spec: {2020-01-01: 1}\n",
    "- just\n- a list\n",
]


def test_odd_documents_are_field_errors(tmp_path: Path) -> None:
    paths = []
    for i, text in enumerate(ODD_DOCUMENTS):
        paths.append(tmp_path / f"odd-{i}.yaml")
        paths[-1].write_text(text)
    out = kubetrain("validate", *map(str, paths))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr, out.stderr
    for path in paths:
        assert (
            f"{path}: TrainingRun ?: invalid" in out.stderr
            or f"{path}: TrainingRun x: invalid" in out.stderr
        ), out.stderr
    assert "spec.2020-01-01: unknown field" in out.stderr
    assert "(document): must be a YAML mapping" in out.stderr


def test_limits_are_configurable_and_valid_files_pass() -> None:
    small = validation.YamlLimits(max_bytes=len(RUN) - 1)
    with pytest.raises(validation.InvalidYaml, match="larger than"):
        validation.load_documents(RUN, small)
    (doc,) = validation.load_documents(RUN.encode())
    assert validation.validate_document(doc) == []
    # Aliases within the bounds keep working, and count as often as they are used.
    text = "a: &x {b: 1, c: 2}\nd: *x\ne: *x\n"
    assert validation.load_documents(text)[0]["e"] == {"b": 1, "c": 2}
    with pytest.raises(validation.InvalidYaml, match="more than 9 values"):
        validation.load_documents(text, validation.YamlLimits(max_nodes=9))
    # A byte-order mark is text, not binary.
    assert validation.load_documents(b"\xef\xbb\xbfa: 1\n") == [{"a": 1}]


def test_documents_from_elsewhere_are_bounded_too() -> None:
    # The webhook gets JSON, not YAML: parse itself refuses what would recurse forever.
    deep: dict[str, object] = {}
    node = deep
    for _ in range(5000):
        node["a"] = {}
        node = node["a"]  # type: ignore[assignment]
    cyclic: dict[str, object] = {}
    cyclic["self"] = cyclic
    for spec in (deep, cyclic):
        doc = {"apiVersion": "kubetrain.dev/v1alpha1", "kind": "TrainingRun", "spec": spec}
        assert [e.path for e in validation.validate_document(doc)] == ["(document)"]
