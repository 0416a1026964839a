"""The continuous-evaluation Job's entry point (`python -m kubetrain_trainer.evaluate_service`)
on a real tiny exported model folder (tests/serve/conftest.py's): its metrics are the
ones training's evaluation code gives on the same model and data, its result fits the
termination message, and bad input ends with one line and a contract exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kubetrain_api import contract
from kubetrain_api.v1alpha1 import EvalDataset
from kubetrain_trainer import evaluate, evaluate_service, storage
from kubetrain_trainer.data import load_eval_examples
from tests.serve.conftest import model_dir  # noqa: F401  (fixture)
from tests.support.s3 import S3Server

LABELS = ["positive", "negative"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval-data")
    rows = [
        {"prompt": f"review {i}: the fox is {'quick' if i % 2 else 'lazy'}", "label": LABELS[i % 2]}
        for i in range(6)
    ]
    (root / "intents.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = ["the quick brown fox jumps over the lazy dog", "a small model learns text"] * 5
    (root / "held.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return root


def spec_json(data: Path, **extra: object) -> str:
    return json.dumps(
        {
            "schedule": "0 * * * *",
            "datasets": [
                {"name": "intents", "uri": f"file://{data}/intents.jsonl", "labels": LABELS}
            ],
            "heldOut": f"file://{data}/held.jsonl",
            "metrics": ["accuracy", "f1", "loss", "perplexity"],
            **extra,
        }
    )


def test_metrics_equal_training_s_evaluation_code(
    model_dir: Path,  # noqa: F811
    data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = tmp_path / "termination-log"
    code = evaluate_service.main(
        ["--model", str(model_dir), "--spec", spec_json(data), "--result-file", str(result)]
    )
    assert code == 0, capsys.readouterr().err
    text = result.read_text()
    assert capsys.readouterr().out.strip() == text
    assert len(text.encode()) < contract.TERMINATION_MESSAGE_LIMIT
    metrics = json.loads(text)["metrics"]
    assert set(metrics) == {
        "accuracy", "f1", "intents/accuracy", "intents/f1", "loss", "perplexity",
    }  # fmt: skip

    # The same numbers, straight from evaluate.py.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ds = EvalDataset(name="intents", uri=f"file://{data}/intents.jsonl", labels=LABELS)
    examples = load_eval_examples(ds)
    scores = evaluate.score_dataset(
        model, tokenizer, ds, [e.prompt for e in examples], [e.label for e in examples], "macro"
    )
    spec = evaluate_service.parse_spec(spec_json(data))
    batches = evaluate_service._held_out_batches(spec, tokenizer, 512)
    loss, count = evaluate.evaluate_loss(model, islice(batches, 50), "cpu")
    assert count > 100
    assert metrics["intents/accuracy"] == pytest.approx(scores["accuracy"], rel=1e-5)
    assert metrics["intents/f1"] == pytest.approx(scores["f1"], rel=1e-5)
    assert metrics["accuracy"] == metrics["intents/accuracy"]
    assert metrics["loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(evaluate.perplexity(loss), rel=1e-5)
    # A random tiny model on a 384-token vocabulary: loss near ln(384).
    assert 4.0 < metrics["loss"] < 8.0


def test_the_result_stays_within_the_termination_message() -> None:
    many = {f"set{i:02d}-with-a-rather-long-name/accuracy": 1 / 3 for i in range(200)}
    text = evaluate_service.render({"perplexity": float("inf"), **many})
    assert len(text.encode()) <= contract.TERMINATION_MESSAGE_LIMIT
    metrics = json.loads(text)["metrics"]
    assert "perplexity" not in metrics  # JSON has no infinity
    assert 0 < len(metrics) <= evaluate_service.MAX_METRICS
    assert set(metrics.values()) == {0.333333}


@pytest.mark.parametrize(
    ("args", "env", "code", "names"),
    [
        (["--spec", '{"schedule": "0 * * * *", "maxBatches": 0}'], {}, 10, "maxBatches"),
        (["--spec", "not json"], {}, 10, "--spec"),
        ([], {}, 10, "KUBETRAIN_EVALUATION_SPEC"),
        (
            [
                "--spec",
                '{"schedule": "0 * * * *", "heldOut": "file:///nope.jsonl", "metrics": ["loss"]}',
            ],
            {},
            11,
            "heldOut",
        ),
    ],
)
def test_bad_input_is_one_line_naming_the_field(
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
    args: list[str],
    env: dict[str, str],
    code: int,
    names: str,
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kubetrain_trainer.evaluate_service", "--model", str(model_dir),
         "--result-file", str(tmp_path / "out"), *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert names in lines[0]
    assert "Traceback" not in done.stderr


def test_a_missing_model_folder_names_model(tmp_path: Path, data: Path) -> None:
    code = evaluate_service.main(["--model", str(tmp_path / "none"), "--spec", spec_json(data)])
    assert code == contract.EXIT_INVALID_SPEC


def test_the_model_where_the_job_finds_it(
    model_dir: Path,  # noqa: F811
    data: Path,
    tmp_path: Path,
    s3: S3Server,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A claim mounted at $KUBETRAIN_PVC_ROOT/<claim> (pvc://) and a committed folder on a
    real S3 server (s3://) give what the folder itself gives; the spec from the Job's
    environment variable."""
    spec = spec_json(data, metrics=["loss"])
    monkeypatch.setenv(contract.EVALUATION_SPEC_ENV, spec)

    def run(model: str, cache: Path | None = None) -> tuple[int, str, str]:
        extra = ["--model-cache", str(cache)] if cache else []
        code = evaluate_service.main(["--model", model, *extra])
        out, err = capsys.readouterr()
        return code, out, err.splitlines()[-1] if code else ""

    local = run(str(model_dir))
    assert local[0] == 0
    claim_root = tmp_path / "pvc"
    (claim_root / "models").mkdir(parents=True)
    (claim_root / "models" / "chat").symlink_to(model_dir)
    monkeypatch.setenv(contract.PVC_ROOT_ENV, str(claim_root))
    assert run("pvc://models/chat") == local
    url = f"s3://{s3_bucket}/runs/chat/model"
    with s3.environ():
        code, _, err = run(url, tmp_path / "cache" / "model")
        assert code == contract.EXIT_INVALID_SPEC
        assert "--model: " in err
        assert "not a committed folder" in err
        storage.upload_folder(model_dir, url)
        assert run(url, tmp_path / "cache" / "model") == local
    with s3.environ(secret_key="wrong"):
        code, _, err = run(url, tmp_path / "other" / "model")
        assert code == contract.EXIT_INVALID_SPEC
        assert "access denied" in err


def test_the_operator_s_job_command_runs_and_its_result_reads_back(
    model_dir: Path,  # noqa: F811
    data: Path,
    tmp_path: Path,
) -> None:
    """The contract end to end: the container the operator builds (command, arguments,
    the spec in its environment, claims under the PVC root) runs this module, and the
    operator reads what it wrote as the termination message."""
    import os
    from datetime import datetime, timezone

    from kubetrain_api.modelservice_validation import parse_modelservice
    from kubetrain_operator.modelservice import evaluation
    from kubetrain_operator.modelservice.sources import ModelSource
    from kubetrain_operator.settings import OperatorSettings

    root = tmp_path / "pvc"
    (root / "models").mkdir(parents=True)
    (root / "models" / "chat").symlink_to(model_dir)
    (root / "data").symlink_to(data)
    service = parse_modelservice(
        {
            "apiVersion": "kubetrain.dev/v1alpha1",
            "kind": "ModelService",
            "metadata": {"name": "chat", "namespace": "ml"},
            "spec": {
                "variants": [{"name": "a", "source": {"uri": "pvc://models/chat"}}],
                "evaluation": {
                    "schedule": "@hourly",
                    "datasets": [
                        {"name": "intents", "uri": "pvc://data/intents.jsonl", "labels": LABELS}
                    ],
                    "heldOut": "pvc://data/held.jsonl",
                    "metrics": ["accuracy", "perplexity"],
                },
            },
        }
    )
    source = ModelSource("chat-v1", claim="models", sub_path="chat")
    now = datetime.now(timezone.utc)
    job = evaluation.build_job(service, "uid", "ml", "a", source, OperatorSettings(), now)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    command = [sys.executable, *container["command"][1:]]
    result_file = tmp_path / "termination-log"
    args = [str(result_file) if a == "/dev/termination-log" else a for a in container["args"]]
    env = {e["name"]: e["value"] for e in container["env"]}
    env |= {"HOME": str(tmp_path), contract.PVC_ROOT_ENV: str(root)}
    done = subprocess.run(
        [*command, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    pod = {
        "metadata": {"name": "p"},
        "status": {
            "containerStatuses": [
                {
                    "name": container["name"],
                    "state": {"terminated": {"exitCode": 0, "message": result_file.read_text()}},
                }
            ]
        },
    }
    finished = {
        **job,
        "status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]},
    }
    result = evaluation.read_result(finished, [pod], now)
    assert result is not None
    assert result.error is None
    assert set(result.metrics) == {"accuracy", "intents/accuracy", "perplexity"}
    assert result.model_version == "chat-v1"
