"""GET /v1/training-summary: the exported training_summary.json, read once at start; an
OpenAI-style 404 for a model without one (or with one that is not a bounded JSON object)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx

from kubetrain_api import contract
from kubetrain_trainer.feedback.drift import summarize
from kubetrain_trainer.serve import app as serve_app

from .conftest import LiveServer, error_of, running


def test_the_summary_exported_with_the_model_is_served(model_dir: Path, tmp_path: Path) -> None:
    summary = summarize(["how many apples", "where is the basket of apples"]).to_dict()
    with_summary = tmp_path / "model"
    shutil.copytree(model_dir, with_summary)
    (with_summary / contract.TRAINING_SUMMARY_FILE).write_text(json.dumps(summary))
    with running(with_summary, ready=False) as live:
        (with_summary / contract.TRAINING_SUMMARY_FILE).unlink()  # read once, at start
        response = httpx.get(f"{live.base_url}/v1/training-summary")
    assert response.status_code == 200
    assert response.json() == summary


def test_a_model_without_a_summary_answers_404(server: LiveServer) -> None:
    response = httpx.get(f"{server.base_url}/v1/training-summary")
    assert response.status_code == 404
    assert error_of(response)["code"] == "training_summary_not_found"


def test_oversized_or_malformed_summaries_are_ignored(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / contract.TRAINING_SUMMARY_FILE
    path.write_text("[1, 2]")
    assert serve_app.read_training_summary(tmp_path) is None
    path.write_text("{not json")
    assert serve_app.read_training_summary(tmp_path) is None
    path.write_text(json.dumps({"texts": 1, "pad": "x" * 64}))
    monkeypatch.setattr(serve_app, "MAX_TRAINING_SUMMARY_BYTES", 32)
    assert serve_app.read_training_summary(tmp_path) is None
    monkeypatch.setattr(serve_app, "MAX_TRAINING_SUMMARY_BYTES", 1024)
    assert serve_app.read_training_summary(tmp_path) == {"texts": 1, "pad": "x" * 64}
