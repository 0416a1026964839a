"""`kubetrain run` refuses bad input before any work starts, with a clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kubetrain_api import contract

ROOT = Path(__file__).resolve().parents[3]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubetrain_cli.main", "run", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_invalid_spec_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUICKSTART.read_text().replace("microBatchSize: 8", "microBatchSize: 0"))
    out = run(str(bad), cwd=tmp_path)
    assert out.returncode == contract.EXIT_INVALID_SPEC
    assert "spec.hyperparameters.microBatchSize: must be >= 1" in out.stderr
    assert not (tmp_path / "runs").exists()  # nothing started


def test_missing_file(tmp_path: Path) -> None:
    out = run("nope.yaml", cwd=tmp_path)
    assert out.returncode == contract.EXIT_INVALID_SPEC
    assert "nope.yaml: cannot read" in out.stderr


def test_file_without_a_training_run(tmp_path: Path) -> None:
    other = tmp_path / "cm.yaml"
    other.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    out = run(str(other), cwd=tmp_path)
    assert out.returncode == contract.EXIT_INVALID_SPEC
    assert "expected exactly one TrainingRun, found 0" in out.stderr


def test_bad_max_steps_override_is_validated(tmp_path: Path) -> None:
    out = run(str(QUICKSTART), "--max-steps", "0", cwd=tmp_path)
    assert out.returncode == contract.EXIT_INVALID_SPEC
    assert "spec.hyperparameters.maxSteps: must be >= 1" in out.stderr


def test_an_earlier_run_is_not_overwritten_silently(tmp_path: Path) -> None:
    earlier = tmp_path / "runs" / "quickstart" / "checkpoints"
    earlier.mkdir(parents=True)
    (earlier / "keep-me").write_text("x")
    out = run(str(QUICKSTART), cwd=tmp_path)
    assert out.returncode == contract.EXIT_INVALID_SPEC
    assert "pass --resume" in out.stderr
    assert (earlier / "keep-me").exists()


def test_a_missing_model_folder_is_one_line(tmp_path: Path) -> None:
    """`--model PATH` (a laptop's base model) that is no folder: refused before Ray."""
    out = run(str(ROOT / "examples" / "dpo.yaml"), "--model", "runs/base/model", cwd=tmp_path)
    assert out.returncode == contract.EXIT_INVALID_SPEC
    assert "--model runs/base/model: no such folder" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_model_uri_naming_no_folder_is_a_spec_failure(tmp_path: Path) -> None:
    from kubetrain_api import v1alpha1 as api
    from kubetrain_trainer import exits, models

    uri = f"file://{tmp_path}/gone"
    try:
        models.load_tokenizer(api.ModelSpec(source=uri), tmp_path)
    except FileNotFoundError as exc:  # what callers that probe still catch
        code, message = exits.classify(exc)
    assert code == contract.EXIT_INVALID_SPEC
    assert message == f"invalid spec: {uri}: no folder at {tmp_path}/gone"
