"""`kubetrain run --run-uid`: a TrainingRun's folder is its own. Keyed by uid, a run
re-created under an old name gets a new folder; a folder another uid wrote is refused,
never resumed or overwritten."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kubetrain_api import contract
from kubetrain_api.validation import load_documents, parse
from kubetrain_trainer.local import RunError, output_dir_for

ROOT = Path(__file__).resolve().parents[3]
FIRST = "0b6a0e1c-1111-4222-8333-444455556666"
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
SECOND = "7c1f2e3d-aaaa-4bbb-8ccc-dddddddddddd"


@pytest.fixture
def run():
    return parse(load_documents(QUICKSTART.read_text())[0])


def test_two_runs_of_one_name_get_two_folders(run, tmp_path: Path) -> None:
    first = output_dir_for(run, tmp_path, resume=True, overwrite=False, run_uid=FIRST)
    (first / contract.CHECKPOINT_DIR).mkdir()
    second = output_dir_for(run, tmp_path, resume=True, overwrite=False, run_uid=SECOND)
    assert (
        first
        == tmp_path / contract.run_folder("quickstart", FIRST)
        == tmp_path / "quickstart-0b6a0e1c"
    )
    assert second == tmp_path / "quickstart-7c1f2e3d"
    assert not (second / contract.CHECKPOINT_DIR).exists()  # a fresh start
    assert (second / contract.RUN_UID_FILE).read_text().strip() == SECOND
    # The same run's next attempt resumes in its folder.
    again = output_dir_for(run, tmp_path, resume=True, overwrite=False, run_uid=FIRST)
    assert again == first
    assert (again / contract.CHECKPOINT_DIR).exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_of_another_uid_is_refused(run, tmp_path: Path, overwrite: bool) -> None:
    # Same first 8 hex digits, another run: the marker tells them apart.
    clash = FIRST[:8] + "-ffff-4fff-8fff-ffffffffffff"
    folder = output_dir_for(run, tmp_path, resume=True, overwrite=False, run_uid=clash)
    (folder / contract.CHECKPOINT_DIR).mkdir()
    (folder / contract.CHECKPOINT_DIR / "keep-me").write_text("x")
    with pytest.raises(RunError, match=f"belongs to the run with uid {clash}, not {FIRST}"):
        output_dir_for(run, tmp_path, resume=True, overwrite=overwrite, run_uid=FIRST)
    assert (folder / contract.CHECKPOINT_DIR / "keep-me").exists()
    assert (folder / contract.RUN_UID_FILE).read_text().strip() == clash


def test_without_a_uid_the_folder_is_the_name(run, tmp_path: Path) -> None:
    """`kubetrain run FILE` on a laptop: runs/<name>/, as documented."""
    assert output_dir_for(run, tmp_path, resume=False, overwrite=False) == tmp_path / "quickstart"


def test_the_cli_refuses_another_runs_folder_before_any_work(tmp_path: Path) -> None:
    """What the head pod runs: `kubetrain run ... --output-dir /storage --run-uid UID`."""
    folder = tmp_path / "runs" / contract.run_folder("quickstart", FIRST)
    (folder / contract.CHECKPOINT_DIR).mkdir(parents=True)
    (folder / contract.RUN_UID_FILE).write_text("0b6a0e1c-0000-4000-8000-000000000000\n")
    out = subprocess.run(
        [sys.executable, "-m", "kubetrain_cli.main", "run", str(QUICKSTART),
         "--output-dir", str(tmp_path / "runs"), "--run-uid", FIRST, "--resume"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert out.returncode == contract.EXIT_INVALID_SPEC  # a user error: permanent
    assert "belongs to the run with uid 0b6a0e1c-0000-4000-8000-000000000000" in out.stderr
    assert "spec.checkpoint.resume" in out.stderr
    assert sorted(p.name for p in folder.iterdir()) == [
        contract.CHECKPOINT_DIR,
        contract.RUN_UID_FILE,
    ]
