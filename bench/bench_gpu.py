"""GPU check and MFU (`make bench-gpu`, on a machine with an NVIDIA GPU).

Trains a ~0.7B Llama-shaped config with FSDP2 + bf16 mixed precision on the GPUs of this
machine through torchrun and the same loop as every run, for a few hundred steps, and
reports tokens/s and MFU against the device's published dense bf16 peak (published FSDP
figures on H100 are 33-46% MFU). Writes bench/results/gpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kubetrain_trainer import metrics

RESULTS = Path(__file__).resolve().parent / "results"

RUN_YAML = """\
apiVersion: kubetrain.dev/v1alpha1
kind: TrainingRun
metadata: {{name: gpu-bench}}
spec:
  model:
    source: builtin://tiny-llama
    configOverrides:
      vocab_size: 1024
      hidden_size: 1536
      intermediate_size: 4096
      num_hidden_layers: 24
      num_attention_heads: 12
      num_key_value_heads: 4
      max_position_embeddings: 2048
  method: pretrain
  data:
    sources: [{{name: corpus, uri: builtin://quickstart-corpus}}]
    sequenceLength: 2048
    validationSplit: 0.02
  hyperparameters:
    learningRate: 3e-4
    globalBatchSize: {global_batch}
    microBatchSize: 4
    maxSteps: {steps}
    precision: bf16-mixed
  resources: {{workers: 1, gpusPerWorker: {gpus}}}
  distributed: {{compile: {compile}}}
  checkpoint: {{intervalSteps: 100000}}
  evaluation: {{intervalSteps: 100000, maxBatches: 2}}
"""

VARIANTS = {"eager": {"compile": "false"}, "compile": {"compile": "true"}}


def matmul_tflops(n: int = 8192, repeats: int = 10) -> float:
    """Achieved bf16 matmul TFLOP/s on this device: the practical ceiling MFU is read
    against, next to the published peak."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (start.elapsed_time(end) / 1e3) / 1e12


def nccl_all_reduce_ok() -> bool:
    """One NCCL all-reduce in a fresh single-process group: the collective path works."""
    import os

    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        x = torch.ones(1024, device="cuda")
        dist.all_reduce(x)
        torch.cuda.synchronize()
        return bool(torch.all(x == 1).item())
    finally:
        dist.destroy_process_group()


def run_variant(name: str, steps: int, warmup: int, gpus: int) -> dict[str, Any]:
    """Prepare data and train `steps` steps through torchrun; the steady-state figures."""
    from kubetrain_api import validation
    from kubetrain_trainer.config import resolve
    from kubetrain_trainer.prepare import prepare

    text = RUN_YAML.format(steps=steps, gpus=gpus, global_batch=4 * gpus * 4, **VARIANTS[name])
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "run.yaml", Path(tmp) / "out"
        spec.write_text(text)
        (doc,) = validation.load_documents(text)
        prepare(resolve(validation.parse(doc), out, use_gpu=True), log=print)
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nproc-per-node={gpus}",
                "-m",
                "kubetrain_trainer.launch_torchrun",
                str(spec),
                str(out),
            ],
            check=True,
        )
        wall = time.perf_counter() - started
        events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps_seen = [e for e in events if e["kind"] == "step"]
    steady = [e for e in steps_seen if e["step"] > warmup]
    setup = next(e for e in events if e["kind"] == "setup")
    return {
        "params": setup["params_total"],
        "steps": steps,
        "wall_seconds": round(wall, 1),
        "tokens_per_second_median": statistics.median(e["tokens_per_second"] for e in steady),
        "mfu_median": statistics.median(e["mfu"] for e in steady if e.get("mfu") is not None),
        "first_loss": steps_seen[0]["loss"],
        "final_loss": steady[-1]["loss"],
        "peak_memory_gib": round(
            max(max(e.get("memory_peak_bytes_by_rank") or [0]) for e in steady) / 2**30, 3
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench-gpu: no CUDA device here", file=sys.stderr)
        return 2
    gpus = torch.cuda.device_count()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "gpus": gpus,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        "nccl_all_reduce_ok": nccl_all_reduce_ok(),
        "matmul_bf16_tflops": round(matmul_tflops(), 1),
    }
    print(json.dumps(result, indent=2), flush=True)
    for name in args.variants:
        try:
            result[name] = run_variant(name, args.steps, args.warmup, gpus)
        except subprocess.CalledProcessError as exc:  # keep the other variants' numbers
            result[name] = {"error": str(exc)}
            continue
        peak = metrics.peak_flops(result["device"], torch.bfloat16)
        if peak:
            # MFU against what a bare matmul reaches here, beside the published peak.
            achieved = result[name]["mfu_median"] * peak / 1e12
            result[name]["fraction_of_matmul"] = round(achieved / result["matmul_bf16_tflops"], 3)
        print(json.dumps({name: result[name]}, indent=2), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
