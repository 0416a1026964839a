"""`kubetrain` command line, run as a real subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from kubetrain_api import crd, validation

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
    for command in ("validate", "plan", "crds", "run", "operator", "serve", "route", "feedback"):
        assert command in out.stdout


def test_validate_examples() -> None:
    examples = sorted(str(p) for p in (ROOT / "examples").glob("*.yaml"))
    assert len(examples) >= 5  # the quickstart, two GPU examples and their CPU twins
    out = kubetrain("validate", *examples)
    assert out.returncode == 0, out.stderr
    documents = sum(len(validation.load_documents(Path(p).read_text())) for p in examples)
    assert out.stdout.count(": valid") == documents
    # The A/B example mixes both kinds in one file.
    assert "modelservice-ab.yaml[0]: TrainingRun chat-a: valid" in out.stdout
    assert "modelservice-ab.yaml[2]: ModelService chat: valid" in out.stdout


def test_validate_mixed_kinds_names_each_kind(tmp_path: Path) -> None:
    example = (ROOT / "examples" / "modelservice-ab.yaml").read_text()
    bad = example.replace("weight: 50\n", "weight: 40\n", 1)
    (tmp_path / "ab.yaml").write_text(bad + "---\n" + QUICKSTART.read_text())
    out = kubetrain("validate", str(tmp_path / "ab.yaml"))
    assert out.returncode == 1
    assert "ab.yaml[0]: TrainingRun chat-a: valid" in out.stdout
    assert "ab.yaml[3]: TrainingRun quickstart: valid" in out.stdout
    assert "ab.yaml[2]: ModelService chat: invalid" in out.stderr
    assert "spec.variants: weights sum to 90; they must sum to 100" in out.stderr


def test_validate_prints_the_resolved_modelservice(tmp_path: Path) -> None:
    (doc,) = [
        d
        for d in validation.load_documents((ROOT / "examples" / "modelservice-ab.yaml").read_text())
        if d["kind"] == "ModelService"
    ]
    (tmp_path / "ms.yaml").write_text(yaml.safe_dump(doc))
    out = kubetrain("validate", "-o", "json", str(tmp_path / "ms.yaml"))
    assert out.returncode == 0, out.stderr
    resolved = json.loads(out.stdout)
    assert resolved["spec"]["experiment"]["guardrails"]["minRequests"] == 20  # a default
    assert resolved["spec"]["variants"][0]["engine"] == "builtin"


def test_validate_refuses_an_unknown_kind(tmp_path: Path) -> None:
    text = QUICKSTART.read_text().replace("kind: TrainingRun", "kind: ModelServce")
    (tmp_path / "typo.yaml").write_text(text)
    out = kubetrain("validate", str(tmp_path / "typo.yaml"))
    assert out.returncode == 1
    assert "typo.yaml: ModelServce quickstart: invalid" in out.stderr
    assert "kind: must be one of TrainingRun, ModelService" in out.stderr


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
    target = tmp_path / "crds" / crd.CRD_FILENAME
    target.write_text(target.read_text().replace("maxItems: 64", "maxItems: 65"))
    out = kubetrain("crds", "--check", "--out", str(tmp_path / "crds"))
    assert out.returncode == 1
    assert "out of date" in out.stderr
    assert kubetrain("crds", "--out", str(tmp_path / "crds")).returncode == 0
    assert kubetrain("crds", "--check", "--out", str(tmp_path / "crds")).returncode == 0
    # The ModelService CRD is checked too: missing, then edited.
    modelservice = tmp_path / "crds" / crd.MODELSERVICE_CRD_FILENAME
    text = modelservice.read_text()
    modelservice.unlink()
    out = kubetrain("crds", "--check", "--out", str(tmp_path / "crds"))
    assert out.returncode == 1
    assert crd.MODELSERVICE_CRD_FILENAME in out.stderr
    modelservice.write_text(text.replace("maxItems: 8", "maxItems: 9"))
    assert kubetrain("crds", "--check", "--out", str(tmp_path / "crds")).returncode == 1


def test_crds_writes_and_checks_the_chart_copy_too(tmp_path: Path) -> None:
    """Without --out, from the repository root: crds/ and helm/kubetrain/crds/."""
    assert kubetrain("crds", cwd=tmp_path).returncode == 0
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.yaml"))
    files = sorted([crd.CRD_FILENAME, crd.MODELSERVICE_CRD_FILENAME])
    assert written == [f"{folder}/{f}" for folder in ("crds", "helm/kubetrain/crds") for f in files]
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
