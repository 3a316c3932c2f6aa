#!/usr/bin/env bash
# Everything a lent GPU (H100/H200; torch 2.11 + triton 3.6, no network) should run, in one
# call: correctness at real sizes first, then the two benchmarks, each under its own time
# limit so one hang cannot eat the session. Results land in $OUT (default runs/gpu).
#   run from the repository root:  bash benchmarks/gpu_session.sh
set -uo pipefail
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; date -u; } | tee "$OUT/machine.txt"
if python -c "import pytest" 2>/dev/null; then
  timeout 150 python -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_gpu.py tests/test_paths.py 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
else
  echo "pytest is not installed on this machine: GPU tests not run" | tee "$OUT/gpu_tests.txt"
fi
timeout 240 python benchmarks/kernels.py --out "$OUT/kernels.json" 2>&1 | tail -45 | tee "$OUT/kernels.txt"
timeout 200 python benchmarks/train_step.py --schedule-steps 400 --out "$OUT/train_step.json" 2>&1 | tail -25 | tee "$OUT/train_step.txt"
