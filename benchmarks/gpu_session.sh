#!/usr/bin/env bash
# Everything a lent GPU (H100/H200; torch 2.11 + triton 3.6, no network) should run, in one
# call: correctness at real sizes first, then the two benchmarks, each under its own time
# limit so one hang cannot eat the session. Results land in $OUT (default runs/gpu).
#   run from the repository root:  bash benchmarks/gpu_session.sh
# Budget: under 10 minutes in all (tests <= 150 s, kernels <= 120 s, training step <= 300 s);
# KERNEL_ARGS=--no-sweep, SCHEDULE_STEPS=100 and TRAIN_STEP_ARGS=--no-mask-update shorten it.
set -uo pipefail
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; date -u; } \
  | tee "$OUT/machine.txt"
if python -c "import pytest, hypothesis" 2>/dev/null; then
  timeout 150 python -m pytest -q -m gpu -p no:cacheprovider -x --no-header -rfE \
    tests/test_kernels_gpu.py tests/test_gpu_end_to_end.py tests/test_graphs.py 2>&1 | tee "$OUT/gpu_tests.txt" | tail -30
else
  echo "pytest/hypothesis missing on this machine: GPU tests not run" | tee "$OUT/gpu_tests.txt"
fi
timeout 120 python benchmarks/kernels.py ${KERNEL_ARGS:-} --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt" | tail -70
timeout 300 python benchmarks/train_step.py --schedule-steps ${SCHEDULE_STEPS:-200} --profile ${TRAIN_STEP_ARGS:-} --out "$OUT/train_step.json" 2>&1 \
  | tee "$OUT/train_step.txt" | tail -30
# The char-LM --full comparison needs its own call (the per-call limit is 10 minutes):
# benchmarks/gpu_char_lm.sh.
