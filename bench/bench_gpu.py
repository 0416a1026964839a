"""GPU check and MFU (`make bench-gpu`, on a machine with an NVIDIA GPU).

Trains a ~0.7B Llama-shaped config with FSDP2 + bf16 mixed precision on the GPUs of this
machine through torchrun and the same loop as every run, for a few hundred steps, and
reports tokens/s and MFU against the device's published dense bf16 peak (published FSDP
figures on H100 are 33-46% MFU). Writes bench/results/gpu.json.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

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
  checkpoint: {{intervalSteps: 100000}}
  evaluation: {{intervalSteps: 100000, maxBatches: 2}}
"""


def main(steps: int = 300, warmup: int = 20) -> int:
    if not torch.cuda.is_available():
        print("bench-gpu: no CUDA device here", file=sys.stderr)
        return 2
    from kubetrain_api import validation
    from kubetrain_trainer.config import resolve
    from kubetrain_trainer.driver import prepare

    gpus = torch.cuda.device_count()
    text = RUN_YAML.format(steps=steps, gpus=gpus, global_batch=4 * gpus * 4)
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "run.yaml", Path(tmp) / "out"
        spec.write_text(text)
        (doc,) = validation.load_documents(text)
        prepare(resolve(validation.parse(doc), out, use_gpu=True), log=print)
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
        events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [e for e in events if e["kind"] == "step" and e["step"] > warmup]
    setup = next(e for e in events if e["kind"] == "setup")
    result = {
        "device": torch.cuda.get_device_name(0),
        "gpus": gpus,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        "torch": torch.__version__,
        "params": setup["params_total"],
        "steps": steps,
        "tokens_per_second_median": statistics.median(e["tokens_per_second"] for e in steady),
        "mfu_median": statistics.median(e["mfu"] for e in steady if e.get("mfu") is not None),
        "final_loss": steady[-1]["loss"],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
