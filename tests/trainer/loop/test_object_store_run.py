"""`kubetrain run` with `spec.checkpoint.storage.uri: s3://...` against a real S3 server
(SeaweedFS): the run's data, checkpoints, model and artifacts land in the bucket; a second
invocation on a wiped scratch folder resumes from the bucket; `kubetrain serve` answers from
the model's s3:// URL. Refused credentials and another run's folder are one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from kubetrain_api import contract
from tests.support.s3 import S3Server

pytestmark = pytest.mark.trainer

ROOT = Path(__file__).resolve().parents[3]
UID = "5e3a9c1d-1111-4222-8333-444455556666"


def _spec(tmp_path: Path, storage_uri: str) -> Path:
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["spec"]["checkpoint"]["storage"] = {"uri": storage_uri}
    doc["spec"]["hyperparameters"]["schedule"]["warmupSteps"] = 1  # a few steps only
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _kubetrain(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kubetrain_cli.main", *args],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_run_on_s3_resumes_from_the_bucket_and_serves_from_it(
    s3: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    spec = _spec(tmp_path, f"s3://{s3_bucket}/runs")
    scratch = tmp_path / "scratch"
    common = ["run", str(spec), "--output-dir", str(scratch), "--run-uid", UID, "--workers", "2"]
    folder = contract.run_folder("quickstart", UID)
    prefix = f"{s3_bucket}/runs/{folder}"
    fs = s3.filesystem()

    first = _kubetrain([*common, "--max-steps", "2"], s3.env(), tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    fs.invalidate_cache()
    assert fs.cat_file(f"{prefix}/{contract.RUN_UID_FILE}").decode().strip() == UID
    assert fs.exists(f"{prefix}/{contract.DATA_DIR}/{contract.FOLDER_COMMIT_MARKER}")
    assert fs.cat_file(f"{prefix}/checkpoints/latest") == b"step-000002"
    assert fs.exists(f"{prefix}/checkpoints/step-000002/COMMITTED")
    assert fs.exists(f"{prefix}/{contract.MODEL_DIR}/{contract.FOLDER_COMMIT_MARKER}")
    assert fs.exists(f"{prefix}/{contract.MODEL_DIR}/config.json")
    result = json.loads(fs.cat_file(f"{prefix}/{contract.RESULT_FILE}"))
    assert result["model"] == f"s3://{prefix}/{contract.MODEL_DIR}"
    assert f"model: s3://{prefix}/{contract.MODEL_DIR}" in first.stdout

    # A retry on a fresh pod: nothing local survives; state comes from the bucket.
    shutil.rmtree(scratch)
    second = _kubetrain([*common, "--max-steps", "4", "--resume"], s3.env(), tmp_path)
    assert second.returncode == 0, second.stderr[-4000:]
    output = second.stdout + second.stderr
    assert "downloaded the prepared data" in output
    assert "data: uploaded" not in output  # the same preparation: reused, not re-uploaded
    assert "resumed from step 2" in output
    fs.invalidate_cache()
    assert fs.cat_file(f"{prefix}/checkpoints/latest") == b"step-000004"
    steps = [
        event["step"]
        for event in map(json.loads, fs.cat_file(f"{prefix}/metrics.jsonl").splitlines())
        if event.get("kind") == "step"
    ]
    assert steps == [1, 2, 3, 4]
    assert json.loads(fs.cat_file(f"{prefix}/{contract.RESULT_FILE}"))["step"] == 4

    # The serving pod's way: the model's URL, downloaded before the server is ready.
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "kubetrain_trainer.serve", result["model"], "--host",
         "127.0.0.1", "--port", str(port), "--model-cache", str(tmp_path / "model-cache")],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **s3.env()},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.5)
        assert (tmp_path / "model-cache" / "config.json").is_file()
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": "quickstart", "prompt": "the", "max_tokens": 4},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] is not None
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_refused_credentials_are_one_line_naming_the_field(
    s3: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    spec = _spec(tmp_path, f"s3://{s3_bucket}/runs")
    out = _kubetrain(
        ["run", str(spec), "--output-dir", str(tmp_path / "scratch")],
        s3.env(secret_key="not-the-secret"),
        tmp_path,
    )
    assert out.returncode == contract.EXIT_INVALID_SPEC
    assert "spec.checkpoint.storage.uri" in out.stderr
    assert "access denied" in out.stderr
    assert "Traceback" not in out.stderr


def test_another_runs_folder_on_s3_is_refused(s3: S3Server, s3_bucket: str, tmp_path) -> None:
    """The uid check of a local run folder holds on the store: same first 8 hex digits,
    another run, refused before anything is written."""
    folder = contract.run_folder("quickstart", UID)
    other = UID[:8] + "-ffff-4fff-8fff-ffffffffffff"
    fs = s3.filesystem()
    fs.pipe_file(f"{s3_bucket}/runs/{folder}/{contract.RUN_UID_FILE}", f"{other}\n".encode())
    fs.pipe_file(f"{s3_bucket}/runs/{folder}/checkpoints/latest", b"step-000001")
    spec = _spec(tmp_path, f"s3://{s3_bucket}/runs")
    out = _kubetrain(
        ["run", str(spec), "--output-dir", str(tmp_path / "scratch"), "--run-uid", UID,
         "--resume", "--overwrite"],
        s3.env(),
        tmp_path,
    )  # fmt: skip
    assert out.returncode == contract.EXIT_INVALID_SPEC, out.stderr
    assert f"belongs to the run with uid {other}" in out.stderr
    fs.invalidate_cache()
    assert fs.cat_file(f"{s3_bucket}/runs/{folder}/checkpoints/latest") == b"step-000001"


def test_serving_an_uncommitted_model_is_refused(s3: S3Server, s3_bucket: str, tmp_path) -> None:
    fs = s3.filesystem()
    fs.pipe_file(f"{s3_bucket}/half/model/config.json", b"{}")  # an upload cut short
    out = subprocess.run(
        [sys.executable, "-m", "kubetrain_trainer.serve", f"s3://{s3_bucket}/half/model",
         "--model-cache", str(tmp_path / "cache")],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **s3.env()},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1
    assert "is not a committed folder" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "cache" / "config.json").exists()
