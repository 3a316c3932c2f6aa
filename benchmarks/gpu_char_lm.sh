#!/usr/bin/env bash
# The char-LM --full comparison at 75% sparsity (issue 5's char-LM target) on a lent GPU, in
# its own device call. The GPU machine has no `bible`: write the text where bible-kjv is
# installed and carry it:
#   bible -l0 "gen1:1-rev22:21" > runs/kjv.txt        # here (runs/ is ignored: carry it)
#   device run: carry ["runs/kjv.txt"], command: bash benchmarks/gpu_char_lm.sh
# Dense and agpe-75, 5000 steps each; results.json is rewritten after each run and at each
# evaluation (the unfinished run's row marked partial_step; its audit log is
# NAME.jsonl.partial), so a timeout keeps the finished run and the cut run's curve so far.
# Results land in $OUT (default runs/gpu_char_lm).
# Extra arguments go to examples/char_lm.py after the defaults, e.g. a second call after a
# cut that trains only the agpe run (dense is not trained again):
#   bash benchmarks/gpu_char_lm.sh --runs agpe-75
# and CHAR_LM_RESULTS=<the first call's results.json, carried> is copied into $OUT first, so
# the new results.json holds both runs and the table compares with that dense run.
# CHAR_LM_TEXT: the text file (default runs/kjv.txt); CHAR_LM_LIMIT: the time limit of the
# runs together in seconds (a positive integer; default 540, for the device tool's 10-minute
# call: set it to the call's limit_s - 30 when less device time is left).
# ALLOW_NO_CUDA=1: run without CUDA (a CPU dry run of the script; the check below exits 3
# otherwise, rather than training --full on the CPU until the time limit).
set -uo pipefail
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LIMIT="${CHAR_LM_LIMIT:-540}"
if ! [[ "$LIMIT" =~ ^[1-9][0-9]*$ ]]; then
  echo "gpu_char_lm.sh: CHAR_LM_LIMIT: expected a positive integer (seconds), got '$LIMIT'" >&2
  exit 2
fi
if [ "${ALLOW_NO_CUDA:-0}" != 1 ] && ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_char_lm.sh: torch.cuda.is_available() is False on this machine: nothing run (ALLOW_NO_CUDA=1 for a CPU dry run)" >&2
  exit 3
fi
OUT="${OUT:-runs/gpu_char_lm}"
TEXT="${CHAR_LM_TEXT:-runs/kjv.txt}"
mkdir -p "$OUT"
if [ -n "${CHAR_LM_RESULTS:-}" ]; then
  cp "$CHAR_LM_RESULTS" "$OUT/results.json" || exit 2
fi
{ nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"; } | tee "$OUT/machine.txt"
# --prune-until 0.4: the schedule that met the target on the CPU at this model size (three
# seeds at 1,000 and 2,000 steps, docs/benchmarks.md); the default 0.5 gave 0.523x FLOPs
# (attention counted).
timeout -k 10 "$LIMIT" python examples/char_lm.py --full --sparsities 0.75 --prune-until 0.4 \
  --text-file "$TEXT" \
  --out "$OUT" "$@" 2>&1 | tee "$OUT/char_lm.txt" | tail -14
exit "${PIPESTATUS[0]}"
