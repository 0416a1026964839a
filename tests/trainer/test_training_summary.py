"""training_summary.json: written while the data is prepared (the user turns of a
conversation, the text of plain documents), exported with the model, readable by drift."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetrain_api import contract, validation
from kubetrain_trainer.config import resolve
from kubetrain_trainer.data import training_summary
from kubetrain_trainer.data.readers import Record
from kubetrain_trainer.feedback.drift import TrainingSummary, compare
from kubetrain_trainer.loop import Trainer, WorkerContext
from kubetrain_trainer.prepare import prepare


def instruction_run(data_uri: str) -> dict:
    return {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "chatty"},
        "spec": {
            "model": {"source": "builtin://tiny-llama"},
            "method": "instruction",
            "data": {
                "sources": [{"name": "qa", "uri": data_uri, "format": "prompt-response"}],
                "sequenceLength": 64,
                "validationSplit": 0.1,
            },
            "hyperparameters": {
                "learningRate": 3e-3,
                "globalBatchSize": 4,
                "microBatchSize": 4,
                "maxSteps": 1,
                "seed": 1,
            },
            "resources": {"workers": 1, "cpuPerWorker": 1, "memoryPerWorker": "2Gi"},
            "checkpoint": {"intervalSteps": 100, "resume": "never"},
            "evaluation": {"intervalSteps": 100, "maxBatches": 1, "metrics": ["loss"]},
        },
    }


@pytest.mark.trainer
def test_a_run_exports_the_summary_of_its_prompts(tmp_path: Path) -> None:
    rows = [
        {"prompt": f"how many apples are in basket {i}", "response": f"zebra {i % 7} giraffe"}
        for i in range(120)
    ]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = resolve(
        validation.parse(instruction_run(f"file://{data}")), tmp_path, use_gpu=False, world_size=1
    )
    prepare(config, log=lambda _: None)
    assert (config.data_dir / contract.TRAINING_SUMMARY_FILE).exists()
    model = Path(Trainer(config, WorkerContext()).fit()["model"])

    summary = TrainingSummary.from_dict(
        json.loads((model / contract.TRAINING_SUMMARY_FILE).read_text())
    )
    assert summary.texts == 108  # the training split's documents, validation left out
    assert {"apples", "basket"} <= set(summary.vocabulary)
    assert "zebra" not in summary.vocabulary  # answers are not what requests look like
    same = compare(summary, [f"how many apples are in basket {i}" for i in range(60)])
    other = compare(summary, [f"translate the sentence number {i} to french" for i in range(60)])
    assert not same.drifted
    assert other.drifted


def test_plain_text_is_summarized_whole_and_nothing_is_written_without_text(
    tmp_path: Path,
) -> None:
    assert training_summary.prompt_text(Record(text="one two")) == "one two"
    chat = Record(
        messages=(
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "bye"},
        )
    )
    assert training_summary.prompt_text(chat) == "hello there\nbye"
    assert not training_summary.write_summary([], tmp_path / "s.json")
    assert not (tmp_path / "s.json").exists()


def test_the_summary_samples_at_most_max_texts_and_about_max_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [{"prompt": f"question number {i} " * 3, "response": "answer"} for i in range(120)]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def summarized(out: str) -> int:
        doc = instruction_run(f"file://{data}")
        config = resolve(validation.parse(doc), tmp_path / out, use_gpu=False, world_size=1)
        prepare(config, log=lambda _: None)
        text = (config.data_dir / contract.TRAINING_SUMMARY_FILE).read_text()
        return TrainingSummary.from_dict(json.loads(text)).texts

    monkeypatch.setattr(training_summary, "MAX_TEXTS", 30)
    assert summarized("few") == 30
    monkeypatch.setattr(training_summary, "MAX_BYTES", 30 * 60 // 3)  # about a third
    assert 2 <= summarized("small") <= 20
