"""The driver's exit code says who has to act: the user (permanent) or the infrastructure
(the operator retries). Real `kubetrain run` processes, plus the classification of the
errors Ray Train and the Hugging Face Hub raise."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest
from huggingface_hub.errors import HfHubHTTPError
from ray.exceptions import ActorDiedError
from ray.train.v2.api.exceptions import WorkerGroupError

from kubetrain_api import contract
from kubetrain_api.validation import load_documents, parse
from kubetrain_trainer import exits
from kubetrain_trainer.data.readers import DataError
from kubetrain_trainer.local import ray_train_max_failures

ROOT = Path(__file__).resolve().parents[3]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "kubetrain_cli.main", "run", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=180,
        env={**os.environ, **(env or {})},
    )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_invalid_data_is_a_user_error_without_traceback(tmp_path: Path) -> None:
    spec = tmp_path / "run.yaml"
    spec.write_text(
        QUICKSTART.read_text().replace(
            "uri: builtin://quickstart-corpus", f"uri: file://{tmp_path}/missing.jsonl"
        )
    )
    out = run(str(spec), cwd=tmp_path)
    assert out.returncode == contract.EXIT_INVALID_DATA, out.stderr[-3000:]
    assert "invalid data: source 'corpus'" in out.stderr
    assert "Traceback" not in out.stderr


def test_an_unreachable_ray_cluster_is_an_infrastructure_error(tmp_path: Path) -> None:
    started = time.monotonic()
    out = run(
        str(QUICKSTART),
        "--address",
        f"127.0.0.1:{_closed_port()}",
        cwd=tmp_path,
        env={"KUBETRAIN_RAY_CONNECT_TIMEOUT_S": "3"},
    )
    assert out.returncode == contract.EXIT_RAY_UNAVAILABLE, out.stderr[-3000:]
    assert "Ray unavailable" in out.stderr
    assert "KUBETRAIN_RAY_CONNECT_TIMEOUT_S" in out.stderr
    assert time.monotonic() - started < 90  # not Ray's own minutes of retries


def test_an_invalid_spec_is_a_user_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUICKSTART.read_text().replace("microBatchSize: 8", "microBatchSize: 0"))
    out = run(str(bad), cwd=tmp_path)
    assert out.returncode == contract.EXIT_INVALID_SPEC
    assert "spec.hyperparameters.microBatchSize: must be >= 1" in out.stderr
    assert "Traceback" not in out.stderr


def _hub_error(status: int) -> HfHubHTTPError:
    request = httpx2.Request("GET", "https://huggingface.co/api/datasets/org/name")
    return HfHubHTTPError(f"{status} error", response=httpx2.Response(status, request=request))


def _wrapped(cause: BaseException, outer: BaseException) -> BaseException:
    try:
        raise outer from cause
    except BaseException as exc:
        return exc


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (DataError("source 'corpus': bad JSON"), contract.EXIT_INVALID_DATA),
        # The hub's 5xx under the DataError that names the source: the hub's failure.
        (_wrapped(_hub_error(503), DataError("source 'c': cannot load")), contract.EXIT_NETWORK),
        (_wrapped(_hub_error(429), RuntimeError("download failed")), contract.EXIT_NETWORK),
        # A 404 is the spec naming a model or dataset that is not there.
        (_wrapped(_hub_error(404), RuntimeError("download failed")), contract.EXIT_INVALID_SPEC),
        (_wrapped(_hub_error(404), DataError("source 'c'")), contract.EXIT_INVALID_DATA),
        (_wrapped(ConnectionResetError("peer"), RuntimeError("x")), contract.EXIT_NETWORK),
        (WorkerGroupError("rank 1 died", {1: ActorDiedError()}), contract.EXIT_WORKERS_LOST),
        (WorkerGroupError("rank 0 failed", {0: RuntimeError("nccl")}), contract.EXIT_WORKERS_LOST),
        (WorkerGroupError("rank 0", {0: DataError("source 'c'")}), contract.EXIT_INVALID_DATA),
        (exits.RayUnavailable("no GCS"), contract.EXIT_RAY_UNAVAILABLE),
        (KeyError("a bug"), contract.EXIT_FAILED),
    ],
)
def test_classify(error: BaseException, code: int) -> None:
    assert exits.classify(error)[0] == code


def test_user_and_infrastructure_codes_are_distinct() -> None:
    assert not contract.USER_ERROR_EXIT_CODES & contract.INFRASTRUCTURE_EXIT_CODES
    assert contract.EXIT_FAILED not in contract.USER_ERROR_EXIT_CODES | (
        contract.INFRASTRUCTURE_EXIT_CODES
    )
    assert all(1 <= c <= 127 for c in contract.INFRASTRUCTURE_EXIT_CODES)


def test_ray_train_restarts_nothing_on_kubernetes() -> None:
    """One layer counts runPolicy.backoffLimit: on Kubernetes (the head joins its cluster)
    the operator's attempts, on a laptop Ray Train's restarts."""
    (doc,) = load_documents(QUICKSTART.read_text())
    doc["spec"]["runPolicy"] = {"backoffLimit": 4}
    run = parse(doc)
    assert ray_train_max_failures(run, address="auto") == 0
    assert ray_train_max_failures(run, address=None) == 4
    assert ray_train_max_failures(run, address="auto", override=2) == 2
