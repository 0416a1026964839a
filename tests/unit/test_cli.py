"""`kubetrain` command line, run as a real subprocess."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from kubetrain_api import crd

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


def kubetrain(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubetrain_cli.main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
    )


def test_help_lists_the_commands() -> None:
    out = kubetrain("--help")
    assert out.returncode == 0
    for command in ("validate", "crds", "run", "operator", "serve"):
        assert command in out.stdout


def test_validate_examples() -> None:
    examples = sorted(str(p) for p in (ROOT / "examples").glob("*.yaml"))
    assert len(examples) >= 5  # the quickstart, two GPU examples and their CPU twins
    out = kubetrain("validate", *examples)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(": valid") == len(examples)


def test_validate_reports_field_paths_and_exits_1(tmp_path: Path) -> None:
    bad = QUICKSTART.read_text().replace("learningRate: 3e-3", "learningRate: -1")
    bad = bad.replace("workers: 2", "workers: 0")
    (tmp_path / "bad.yaml").write_text(bad)
    out = kubetrain("validate", str(tmp_path / "bad.yaml"))
    assert out.returncode == 1
    assert "spec.hyperparameters.learningRate: must be > 0.0" in out.stderr
    assert "spec.resources.workers: must be >= 1" in out.stderr


def test_validate_multi_document(tmp_path: Path) -> None:
    good = QUICKSTART.read_text()
    bad = good.replace("name: quickstart", "name: second").replace("method: pretrain", "method: x")
    (tmp_path / "runs.yaml").write_text(good + "\n---\n" + bad)
    out = kubetrain("validate", str(tmp_path / "runs.yaml"))
    assert out.returncode == 1
    assert "runs.yaml[0]: TrainingRun quickstart: valid" in out.stdout
    assert "runs.yaml[1]: TrainingRun second: invalid" in out.stderr
    assert "spec.method: must be one of" in out.stderr


def test_validate_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("spec: [unclosed\n")
    out = kubetrain("validate", str(tmp_path / "broken.yaml"), str(tmp_path / "missing.yaml"))
    assert out.returncode == 1
    assert "broken.yaml: cannot read" in out.stderr
    assert "missing.yaml: cannot read" in out.stderr


def test_validate_prints_the_resolved_run() -> None:
    out = kubetrain("validate", "-o", "yaml", str(QUICKSTART))
    assert out.returncode == 0
    assert "strategy: fsdp" in out.stdout  # a default the file does not set
    assert "learningRate: 0.003" in out.stdout


def test_crds_check_detects_drift(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "crds", tmp_path / "crds")
    assert kubetrain("crds", "--check", "--out", str(tmp_path / "crds")).returncode == 0
    target = next((tmp_path / "crds").glob("*.yaml"))
    target.write_text(target.read_text().replace("maxItems: 64", "maxItems: 65"))
    out = kubetrain("crds", "--check", "--out", str(tmp_path / "crds"))
    assert out.returncode == 1
    assert "out of date" in out.stderr
    assert kubetrain("crds", "--out", str(tmp_path / "crds")).returncode == 0
    assert kubetrain("crds", "--check", "--out", str(tmp_path / "crds")).returncode == 0


def test_crds_writes_and_checks_the_chart_copy_too(tmp_path: Path) -> None:
    """Without --out, from the repository root: crds/ and helm/kubetrain/crds/."""
    assert kubetrain("crds", cwd=tmp_path).returncode == 0
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.yaml"))
    assert written == [f"crds/{crd.CRD_FILENAME}", f"helm/kubetrain/crds/{crd.CRD_FILENAME}"]
    assert kubetrain("crds", "--check", cwd=tmp_path).returncode == 0
    chart_copy = tmp_path / "helm" / "kubetrain" / "crds" / crd.CRD_FILENAME
    chart_copy.write_text(chart_copy.read_text() + "# edited\n")
    out = kubetrain("crds", "--check", cwd=tmp_path)
    assert out.returncode == 1
    assert f"helm/kubetrain/crds/{crd.CRD_FILENAME}" in out.stderr
    assert kubetrain("crds", "--check").returncode == 0, "the repository's copies drifted"


def test_serve_has_its_own_help() -> None:
    out = kubetrain("serve", "--help")
    assert out.returncode == 0
    assert out.stdout.startswith("usage: kubetrain serve")
    assert "--max-concurrency" in out.stdout


def test_serve_refuses_a_missing_model_folder(tmp_path: Path) -> None:
    out = kubetrain("serve", str(tmp_path / "nope"), "--port", "0")
    assert out.returncode == 2
    assert "nope: not an exported model folder (no config.json)" in out.stderr
