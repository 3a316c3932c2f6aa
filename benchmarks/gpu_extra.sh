#!/usr/bin/env bash
# Three short GPU measurements in ONE device call (audit CW), every result under $OUT (7 files:
# the device tool returns at most 8). Estimated 260-350 s on an H200 from earlier leases' logs
# (not measured as a whole):
#   1. block 64 with persistent TMA (kernels.py main table, 18 rows)           ~40-60 s
#   2. a d=0.75 step, AGPE_TMA off and persistent in one process (graphed)     ~110-170 s
#   3. the d=0.25 profile, persistent TMA, graphed BlockSparseAdamW             ~100-130 s
#   run from the repository root:  bash benchmarks/gpu_extra.sh
# Each part runs under its own limit, capped so the script ends by DEADLINE seconds (a positive
# integer; default 570 for a full 600 s call: set it to the call's limit_s - 30 when less device
# time is left). A part cut by its limit keeps its partial JSON (train_step's SIGTERM handler);
# a failing part does not stop the others; the script exits 1 naming the failed parts.
# Files: kernels_b64_persistent.json, ts_d075.{json,txt}, ts_profile.{json,txt},
# profile_dense.txt and profile_agpe_d0.25.txt (beside ts_profile.json) in $OUT (default
# runs/gpu_extra).
# ALLOW_NO_CUDA=1: run without CUDA, for a CPU dry run of the script (otherwise it exits 3 up
# front when torch.cuda.is_available() is False).
set -uo pipefail
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DEADLINE="${DEADLINE:-570}"
if ! [[ "$DEADLINE" =~ ^[1-9][0-9]*$ ]]; then
  echo "gpu_extra.sh: DEADLINE: expected a positive integer (seconds), got '$DEADLINE'" >&2
  exit 2
fi
if [ "${ALLOW_NO_CUDA:-0}" != 1 ] && ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_extra.sh: torch.cuda.is_available() is False on this machine: nothing run (ALLOW_NO_CUDA=1 for a CPU dry run)" >&2
  exit 3
fi
O="${OUT:-runs/gpu_extra}"
mkdir -p "$O"
cap() { local left=$((DEADLINE - SECONDS - 15)); [ "$left" -lt 10 ] && left=10; echo $(($1 < left ? $1 : left)); }
FAILED=""
python -c "import torch, triton; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA', 'torch', torch.__version__, 'triton', triton.__version__)"
# 1. block 64 with persistent TMA; the plain block-64 kernels are PARTS=kernels' (another process)
AGPE_TMA=persistent timeout -k 10 "$(cap 120)" python benchmarks/kernels.py --no-sweep --no-tma --block-sizes 64 \
  --out "$O/kernels_b64_persistent.json" 2>&1 | tail -32
s=${PIPESTATUS[0]}; [ "$s" -eq 0 ] || FAILED="$FAILED kernels_b64($s)"
# 2. d=0.75 (the crossover persistent TMA now follows), off and persistent against one dense step
timeout -k 10 "$(cap 220)" python benchmarks/train_step.py --tma-settings off,persistent --densities 0.75 \
  --optimizers graphed,graphed_block_sparse --no-mask-update --schedule-steps 0 \
  --out "$O/ts_d075.json" > "$O/ts_d075.txt" 2>&1
s=$?; [ "$s" -eq 0 ] || FAILED="$FAILED d075($s)"
grep -E "ms/step|best at" "$O/ts_d075.txt"
# 3. graphed first, graphed_block_sparse LAST: --profile profiles the last variant timed at the
# last density; --out is required for --profile (the tables go beside it); graphed is the
# dense baseline
AGPE_TMA=persistent timeout -k 10 "$(cap 200)" python benchmarks/train_step.py --densities 0.25 \
  --optimizers graphed,graphed_block_sparse --no-mask-update --schedule-steps 0 --profile \
  --out "$O/ts_profile.json" > "$O/ts_profile.txt" 2>&1
s=$?; [ "$s" -eq 0 ] || FAILED="$FAILED profile($s)"
grep -E "ms/step|best at|profile" "$O/ts_profile.txt"
ls -la "$O"
if [ -n "$FAILED" ]; then
  echo "== failed parts:$FAILED (exit status in brackets; 124/137: its time limit)"
  exit 1
fi
