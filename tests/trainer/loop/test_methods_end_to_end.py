"""Every fine-tuning method through the whole product path: `kubetrain run` on a local Ray
cluster (2 workers, FSDP2 over gloo), checkpoints, evaluation on a labelled set, the gate,
export, then `kubetrain serve` on the exported folder answering the `openai` client.

Two runs in all (Ray has tens of seconds of fixed cost here):
- `sft` with LoRA on prompt/response pairs; rank 1 is SIGKILLed after the first checkpoint
  and once a later step has been logged, so Ray Train restarts the workers, they resume,
  and the replayed step must reproduce the logged loss. The export is merged.
- `instruction` (full fine-tune) on chat messages, straight through.
Both evaluate accuracy/precision/recall/F1 on the held-out built-in sentiment set and gate
on a metric of that named dataset.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch

from kubetrain_trainer.data.builtin import rows
from tests.trainer.loop.test_ray_fsdp import events, finish, kubetrain_run

pytestmark = pytest.mark.trainer

LABELLED = ("accuracy", "precision", "recall", "f1")
DATASETS = ("quickstart-instructions", "quickstart-sentiment")
KUBETRAIN = [sys.executable, "-m", "kubetrain_cli.main"]


def run_yaml(name: str, method: str, *, base: Path | None = None) -> str:
    """`instruction` trains tiny-llama fully from scratch on chat `messages`; `sft` puts
    LoRA adapters on an exported model (`base`) and trains them on prompt/response rows.
    Both mix in labelled reviews, so the sentiment gate measures something learned."""
    if base is None:  # from scratch: enough steps for the task to be learned
        model = "source: builtin://tiny-llama\n    configOverrides: {vocab_size: 512}"
        data_format, steps, lr, lora = "chat", 90, 3e-3, ""
    else:
        model = f"source: file://{base}"
        data_format, steps, lr = "prompt-response", 30, 3e-3
        lora = (
            "  lora: {rank: 8, alpha: 16, targetModules: [q_proj, k_proj, v_proj, o_proj, "
            "gate_proj, up_proj, down_proj]}\n"
        )
    return f"""\
apiVersion: kubetrain.dev/v1alpha1
kind: TrainingRun
metadata:
  name: {name}
spec:
  model:
    {model}
  method: {method}
{lora}  data:
    sources:
      - name: tasks
        uri: builtin://quickstart-instructions
        format: {data_format}
      - name: reviews
        uri: builtin://quickstart-sentiment
        format: prompt-response
        weight: 3
    sequenceLength: 64
    validationSplit: 0.05
  hyperparameters:
    learningRate: {lr}
    schedule: {{warmupSteps: 1}}
    globalBatchSize: 8
    microBatchSize: 4
    maxSteps: {steps}
    seed: 11
  resources: {{workers: 2}}
  runPolicy: {{backoffLimit: 2}}
  checkpoint: {{intervalSteps: {steps // 3}, keepLast: 2}}
  evaluation:
    intervalSteps: {steps}
    maxBatches: 2
    metrics: [loss, accuracy, precision, recall, f1]
    datasets:
      - name: sentiment
        uri: builtin://quickstart-sentiment
        labels: [positive, negative]
    gate:
      - {{metric: sentiment/accuracy, min: 0.9}}
      - {{metric: loss, max: 100}}
"""


def start(tmp: Path, name: str, method: str, base: Path | None = None) -> tuple[Any, Path]:
    spec = tmp / f"{name}.yaml"
    spec.write_text(run_yaml(name, method, base=base))
    return kubetrain_run(spec, tmp), tmp / name


@pytest.fixture(scope="module")
def instruction(tmp_path_factory: pytest.TempPathFactory) -> Path:
    proc, run_dir = start(tmp_path_factory.mktemp("instr"), "instr", "instruction")
    (run_dir / "output.txt").write_text(finish(proc))
    return run_dir


@pytest.fixture(scope="module")
def sft_lora(instruction: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("sft")
    proc, run_dir = start(tmp, "sft-lora", "sft", base=instruction / "model")
    crash_once_and_finish(proc, run_dir)
    return run_dir


def crash_once_and_finish(proc: subprocess.Popen[str], run_dir: Path) -> None:
    """Kill rank 1 like the OOM killer once a checkpoint is committed and a later step has
    been logged (that step is then trained twice, before and after the resume), then wait
    for the run to succeed; its output goes to `output.txt`."""
    deadline = time.monotonic() + 300
    while True:
        seen = events(run_dir)
        saved = [e["step"] for e in seen if e.get("kind") == "checkpoint"]
        if saved and any(e["kind"] == "step" and e["step"] > saved[0] for e in seen):
            break
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, "no checkpoint and later step within 300 s"
        time.sleep(0.1)
    os.kill(int((run_dir / "pids" / "rank1").read_text()), signal.SIGKILL)
    (run_dir / "output.txt").write_text(finish(proc))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_and_chat(model_dir: Path, content: str) -> tuple[Any, dict[str, str]]:
    """`kubetrain serve MODEL_DIR` as a user starts it; one greedy chat completion of a
    user turn through the official client. Returns the completion and response headers."""
    port = free_port()
    proc = subprocess.Popen(
        [*KUBETRAIN, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "the server was not ready within 120 s"
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model=model_dir.parent.name,
            messages=[{"role": "user", "content": content}],
            max_tokens=8,
            temperature=0,
        )
        return raw.parse(), dict(raw.headers)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def check_finished_run(run_dir: Path, *, method: str, steps: int) -> dict[str, Any]:
    """What every method must leave: all steps, committed checkpoints, a labelled
    evaluation gated on a named dataset's metric, an exported folder that is the model
    that was evaluated."""
    seen = events(run_dir)
    (setup, *_) = [e for e in seen if e["kind"] == "setup"]
    assert setup["world_size"] == 2
    assert 0.45 <= setup["params_local"] / setup["params_total"] <= 0.55, setup  # FSDP2
    assert max(e["step"] for e in seen if e["kind"] == "step") == steps
    committed = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert committed[-1].startswith(f"step-{steps:06d}"), committed

    result = json.loads((run_dir / "result.json").read_text())
    assert result["step"] == steps
    metrics = result["metrics"]
    assert metrics["sentiment/accuracy"] >= 0.9, metrics
    assert result["gate"] == {"passed": True, "failures": []}

    model_dir = run_dir / "model"
    info = json.loads((model_dir / "kubetrain-run.json").read_text())
    assert (info["spec"]["method"], info["step"]) == (method, steps)
    # Its validation loss on the rows the final evaluation used is the reported one (for
    # LoRA: the adapters were merged right) ...
    assert exported_validation_loss(run_dir) == pytest.approx(metrics["loss"], abs=1e-4)
    # ... and the metrics the two FSDP2 ranks computed are those of the exported model
    # scored alone, its prompts through the chat template as the server renders them.
    for name, value in exported_labelled_metrics(run_dir).items():
        assert metrics[f"sentiment/{name}"] == pytest.approx(value, abs=1e-9), name
    # The sample `kubetrain run` prints asks a whole prompt of the data, as trained.
    (line,) = [x for x in (run_dir / "output.txt").read_text().splitlines() if "sample: " in x]
    prompt = ast.literal_eval(line.split("sample: ", 1)[1].split(" -> ", 1)[0])
    assert prompt in {r["prompt"].strip() for name in DATASETS for r in rows(name)}, line
    return result


def exported_labelled_metrics(run_dir: Path) -> dict[str, float]:
    from kubetrain_api.v1alpha1 import EvalDataset
    from kubetrain_trainer.data import load_eval_examples
    from kubetrain_trainer.evaluate import score_dataset
    from kubetrain_trainer.export import load_exported

    model, tokenizer, info = load_exported(run_dir / "model")
    (ds,) = [EvalDataset.model_validate(d) for d in info["spec"]["evaluation"]["datasets"]]
    examples = load_eval_examples(ds)
    prompts, truth = [e.prompt for e in examples], [e.label for e in examples]
    scores = score_dataset(model, tokenizer, ds, prompts, truth, "macro", chat=True)
    return {name: scores[name] for name in LABELLED}


def exported_validation_loss(run_dir: Path) -> float:
    from kubetrain_trainer.data import open_split
    from kubetrain_trainer.evaluate import evaluate_loss
    from kubetrain_trainer.export import load_exported

    model, _, _ = load_exported(run_dir / "model")
    # maxBatches (2) micro batches (4 rows) from the start of the validation split.
    split = open_split(run_dir / "data", "validation")
    batches = [
        # position_ids too: packed rows keep their examples apart, as in training
        {k: torch.from_numpy(v.astype(np.int64)) for k, v in split.take(range(i, i + 4)).items()}
        for i in (0, 4)
    ]
    return evaluate_loss(model, batches, "cpu")[0]


def check_served(run_dir: Path, step: int) -> None:
    """The exported folder served by `kubetrain serve` classifies a held-out review."""
    review = next(rows("quickstart-sentiment", "test"))
    completion, headers = serve_and_chat(run_dir / "model", review["prompt"])
    assert completion.object == "chat.completion"
    (choice,) = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content.strip() == review["label"], choice.message.content
    assert choice.finish_reason == "stop"  # the trained end of turn
    # The server says which trained model answered: the run and its final step.
    assert headers["x-model-version"] == f"{run_dir.name}-step{step}"


def test_instruction_trains_evaluates_exports_and_serves(instruction: Path) -> None:
    result = check_finished_run(instruction, method="instruction", steps=90)
    check_served(instruction, result["step"])


def test_sft_lora_survives_a_crash_and_resumes(sft_lora: Path) -> None:
    seen = events(sft_lora)
    setups = [e for e in seen if e["kind"] == "setup"]
    assert len(setups) == 2, "the workers should have been restarted once"
    resumed = setups[1]["resumed_from"]
    assert resumed >= 10
    # A step trained before the crash and again after the resume has the same loss: the
    # adapters, their optimizer state, the schedule and the data position all came back.
    losses: dict[int, list[float]] = {}
    for e in seen:
        if e["kind"] == "step":
            losses.setdefault(e["step"], []).append(e["loss"])
    replayed = {s: v for s, v in losses.items() if len(v) == 2}
    assert replayed, losses
    for step, (before, after) in replayed.items():
        assert step > resumed
        assert after == pytest.approx(before, abs=1e-5), step


def test_sft_lora_evaluates_exports_merged_and_serves(sft_lora: Path) -> None:
    from safetensors.torch import load_file

    result = check_finished_run(sft_lora, method="sft", steps=30)
    # Merged: a plain model folder, no adapter files and no LoRA tensors.
    model_dir = sft_lora / "model"
    assert not (model_dir / "adapter_config.json").exists()
    assert not any("lora" in k for k in load_file(model_dir / "model.safetensors"))
    check_served(sft_lora, result["step"])
