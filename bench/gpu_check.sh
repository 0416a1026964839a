#!/usr/bin/env bash
# The GPU check, as run on a lent H100/H200 machine (no network there): carry pydantic's
# wheels in .whl/ (see bench/README or the device notes), then train the ~0.7B bench model
# eagerly and compiled, and keep the log and bench/results/gpu.json under $OUT.
set -euo pipefail
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD:$PWD/operator:$PWD/trainer_image"
export PYTHONUNBUFFERED=1
OUT="${OUT:-bench/results}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.csv"
python3 -m bench.bench_gpu --steps "${STEPS:-50}" --warmup "${WARMUP:-15}" 2>&1 | tee "$OUT/gpu.log"
cp bench/results/gpu.json "$OUT/gpu.json"
