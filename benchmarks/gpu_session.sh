#!/usr/bin/env bash
# Everything a lent GPU (H100/H200; torch 2.11 + triton 3.6, no network) should run, in one
# or two calls: correctness at real sizes first, then the benchmarks and diagnostics, each under its
# own time limit so one hang cannot eat the session. Results land in RUN_DIR (default
# runs/gpu/<UTC time>); when the device tool's $OUT is set, RUN_DIR is packed into
# $OUT/gpu_session.tgz after every part (the tool returns at most 8 files). The limits below
# are the parts' timeouts; each may run 10 s past its own (timeout -k 10) plus ~10 s of start.
#   run from the repository root:  bash benchmarks/gpu_session.sh
# PARTS picks the sections, space-separated (default: "tests diagnose kernels train"; also "tma",
# "tmakernels", "ckpt" and "probe"; an unknown word exits 2 before any work). "tests" (<= 400 s;
# 179.5 s for 68 tests in the twenty-fifth session, 80 tests now) is best a call of its own,
# "diagnose kernels" (<= 195 s) and "train" (<= 300 s; 126 s) fit one more; calls on the same
# warm machine must follow at once (it stays warm only 30 s after a call). "tma" (<= 430 s)
# times the training step with AGPE_TMA off and persistent (TMA_SETTINGS) in one process,
# each compiled anew (Note [TMA by default] in agpe_compile/kernels/launch.py); "tmakernels" (<= 270 s) times the kernels with AGPE_TMA=persistent against cuBLAS
# (block 128) and every TMA variant against the plain kernels; "ckpt" (<= 200 s) times the step with
# every block under activation checkpointing; "probe" (<= 120 s) runs
# benchmarks/gpu_host_probe.py (host time and synchronizations of a step). KERNEL_ARGS="" adds the config sweep (+~60 s);
# TRAIN_STEP_ARGS=--no-mask-update shortens the training step; TRAIN_STEP_LOGS sets its TORCH_LOGS
# (default output_code, for inductor_copies.py); SCHEDULE_STEPS=N adds the simulated N-step
# schedule's compile count, which needs no GPU (the --small stack, block 32, aot_eager; the
# same on every device): 2,000 steps gave 5 compilations for 4 crossings on the CPU
# (benchmarks/results/2026-11-29-cpu-schedule-count-session35/).
# DEADLINE (seconds, a positive integer; default 570 for a full 600 s call): every part's limit
# is capped so the script ends by then; set it to the call's limit_s - 30 when less device time
# is left, or the tool kills a part before it writes its partial JSON.
# ALLOW_NO_CUDA=1: run without CUDA, for a CPU dry run of the script (otherwise it exits 3 up
# front when torch.cuda.is_available() is False: the parts would skip or time the CPU instead).
# Every part's exit status is kept: a failing part prints its log's tail, the others still
# run, and the script exits 1 if any failed. Under the device tool ($OUT set) the results are
# packed into $OUT after every part, so a call cut off by its own time limit keeps what ended;
# each call writes a folder of its own under runs/gpu (a warm machine keeps earlier calls').
set -uo pipefail
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The variables first, before any work (a typo used to run nothing and exit 0: audit CW LOW-1/3)
KNOWN_PARTS="tests diagnose kernels train tma tmakernels ckpt probe"
PARTS="${PARTS:-tests diagnose kernels train}"
read -r -a words <<< "$PARTS"  # (no glob expansion of the words)
if [ "${#words[@]}" -eq 0 ]; then
  echo "gpu_session.sh: PARTS: no part named (PARTS='$PARTS'); expected space-separated words of: $KNOWN_PARTS" >&2
  exit 2
fi
for word in "${words[@]}"; do
  case " $KNOWN_PARTS " in
    *" $word "*) ;;
    *) echo "gpu_session.sh: PARTS: unknown part '$word' (PARTS='$PARTS'); expected space-separated words of: $KNOWN_PARTS" >&2
       exit 2;;
  esac
done
DEADLINE="${DEADLINE:-570}"
if ! [[ "$DEADLINE" =~ ^[1-9][0-9]*$ ]]; then
  echo "gpu_session.sh: DEADLINE: expected a positive integer (seconds), got '$DEADLINE'" >&2
  exit 2
fi
if [ "${ALLOW_NO_CUDA:-0}" != 1 ] && ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_session.sh: torch.cuda.is_available() is False on this machine: nothing run (ALLOW_NO_CUDA=1 for a CPU dry run)" >&2
  exit 3
fi
RUN_DIR="${RUN_DIR:-runs/gpu/$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$RUN_DIR"
FAILED=""
# part NAME LOG STATUS: record a part's exit status; on failure say so with the log's tail
part() {
  if [ "$3" -ne 0 ]; then
    FAILED="$FAILED $1"
    echo "== PART $1 FAILED (exit $3; 124/137: its time limit); last lines of $2:"
    [ -f "$2" ] && tail -15 "$2"
  fi
  pack
}
pack() {
  [ -n "${OUT:-}" ] || return 0
  tar czf "$OUT/gpu_session.tgz.tmp" -C "$RUN_DIR" . && mv "$OUT/gpu_session.tgz.tmp" "$OUT/gpu_session.tgz"
  # (the device tool returns at most 8 files: the archive and the summaries one call writes)
  # (at most 7 besides the archive, which holds them all, counting those copied by earlier
  # packs: audit BU, re-audit BW)
  local n
  n=$(find "$OUT" -maxdepth 1 -type f ! -name 'gpu_session.tgz*' | wc -l)
  for f in gpu_tests.txt kernels.txt train_step.txt train_step_tma.txt diagnose.txt host_probe.txt inductor_copies.txt \
           train_step_ckpt.txt kernels_persistent.txt kernels_tma.txt; do
    [ -f "$RUN_DIR/$f" ] || continue
    if [ -f "$OUT/$f" ]; then cp "$RUN_DIR/$f" "$OUT/"
    elif [ "$n" -lt 7 ]; then cp "$RUN_DIR/$f" "$OUT/"; n=$((n + 1)); fi
  done
  return 0
}
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; date -u; } \
  | tee "$RUN_DIR/machine.txt"
# Every part's limit is capped so the script ends by DEADLINE seconds (default 570, inside
# the device tool's 600 s call): a part the tool would kill mid-write gets its own SIGTERM
# instead and keeps its partial JSON (audit BU).
cap() { local left=$((DEADLINE - SECONDS - 15)); [ "$left" -lt 10 ] && left=10; echo $(($1 < left ? $1 : left)); }
has() { case " $PARTS " in *" $1 "*) return 0;; esac; return 1; }
if ! has tests; then :
elif python -c "import pytest, hypothesis" 2>/dev/null; then
  # -v: a log cut by the limit still names every test that finished; --timeout (pytest-timeout,
  # when installed) stops one hanging test rather than the whole part (audit CW HIGH-5)
  per_test=""
  python -c "import pytest_timeout" 2>/dev/null && per_test="--timeout 120"
  timeout -k 10 $(cap 400) python -m pytest -v -m gpu -p no:cacheprovider --no-header -rfE --durations=15 $per_test \
    tests/test_graphs.py tests/controller/test_host_sync.py tests/controller/test_zero_weights.py \
    tests/test_kernels_gpu.py tests/test_gpu_end_to_end.py tests/test_distributed.py \
    2>&1 | tee "$RUN_DIR/gpu_tests.txt" | tail -30
  part tests "$RUN_DIR/gpu_tests.txt" "${PIPESTATUS[0]}"
else
  echo "pytest/hypothesis missing on this machine: GPU tests not run" | tee "$RUN_DIR/gpu_tests.txt"
fi
if has diagnose; then
  # where the op's dense path loses time against cuBLAS (docs/benchmarks.md, "dense path")
  timeout -k 10 $(cap 45) python benchmarks/gpu_diagnose.py --out-dir "$RUN_DIR/diagnose" 2>&1 | tee "$RUN_DIR/diagnose.txt" | tail -14
  part diagnose "$RUN_DIR/diagnose.txt" "${PIPESTATUS[0]}"
fi
if has kernels; then
  timeout -k 10 $(cap 150) python benchmarks/kernels.py ${KERNEL_ARGS---no-sweep} --out "$RUN_DIR/kernels.json" 2>&1 \
    | tee "$RUN_DIR/kernels.txt" | tail -70
  part kernels "$RUN_DIR/kernels.txt" "${PIPESTATUS[0]}"
fi
# The training step with its mask-update cost; 60-row kernel tables, and Inductor's generated
# code of both steps (to see which reductions and copies surround the agpe op).
if has train; then
  TORCH_LOGS="${TRAIN_STEP_LOGS:-output_code}" TORCH_LOGS_OUT="$RUN_DIR/output_code.txt" \
    timeout -k 10 $(cap 300) python benchmarks/train_step.py --schedule-steps ${SCHEDULE_STEPS:-0} --profile --profile-rows 60 \
    ${TRAIN_STEP_ARGS:-} --out "$RUN_DIR/train_step.json" 2>&1 | tee "$RUN_DIR/train_step.txt" | tail -30
  part train "$RUN_DIR/train_step.txt" "${PIPESTATUS[0]}"
  # kernels writing one value to several outputs (Note [Kernel operands]): none expected now
  if [ -f "$RUN_DIR/output_code.txt" ]; then
    python benchmarks/inductor_copies.py "$RUN_DIR/output_code.txt" 2>&1 | tee "$RUN_DIR/inductor_copies.txt"
    part inductor_copies "$RUN_DIR/inductor_copies.txt" "${PIPESTATUS[0]}"
  fi
fi
# The persistent TMA kernels (Note [Persistent TMA programs]): the targets' table with them
# (block 128, cuBLAS side by side), then every TMA variant against the plain kernels.
if has tmakernels; then
  AGPE_TMA=persistent timeout -k 10 $(cap 150) python benchmarks/kernels.py --no-sweep --no-tma --block-sizes 128 \
    --out "$RUN_DIR/kernels_persistent.json" 2>&1 | tee "$RUN_DIR/kernels_persistent.txt" | tail -25
  part kernels_persistent "$RUN_DIR/kernels_persistent.txt" "${PIPESTATUS[0]}"
  timeout -k 10 $(cap 120) python benchmarks/kernels.py --only-tma --out "$RUN_DIR/kernels_tma.json" 2>&1 \
    | tee "$RUN_DIR/kernels_tma.txt" | tail -20
  part kernels_tma "$RUN_DIR/kernels_tma.txt" "${PIPESTATUS[0]}"
fi
# TMA settings side by side in ONE process (--tma-settings: each compiled anew against the
# same dense step; the twenty-fifth session's two processes on one machine differed more than
# the effect): the compile caches key agpe graphs on AGPE_TMA (Note [Compile caches and the
# traced kernels]), so each setting's first step after a crossing is a real compile (20-35 s).
if has tma; then
  settings="${TMA_SETTINGS:-off persistent}"
  timeout -k 10 $(cap 420) python benchmarks/train_step.py --tma-settings "${settings// /,}" \
    --densities 0.5,0.25,0.1 --optimizers fused,block_sparse,graphed,graphed_block_sparse --no-mask-update \
    --schedule-steps 0 --out "$RUN_DIR/train_step_tma.json" > "$RUN_DIR/train_step_tma.txt" 2>&1
  status=$?
  grep -E "ms/step|best at|after rebucket" "$RUN_DIR/train_step_tma.txt"
  part tma "$RUN_DIR/train_step_tma.txt" "$status"
fi
# Activation checkpointing (Note [Weights inside higher-order ops]): every block, dense and
# agpe, under torch.utils.checkpoint; the agpe/dense ratios next to the plain "train" ones.
if has ckpt; then
  timeout -k 10 $(cap 200) python benchmarks/train_step.py --activation-checkpointing --densities 1.0,0.25,0.1 \
    --optimizers fused --no-mask-update --schedule-steps 0 --out "$RUN_DIR/train_step_ckpt.json" \
    > "$RUN_DIR/train_step_ckpt.txt" 2>&1
  status=$?
  grep -E "ms/step|best at" "$RUN_DIR/train_step_ckpt.txt"
  part ckpt "$RUN_DIR/train_step_ckpt.txt" "$status"
fi
if has probe; then
  timeout -k 10 $(cap 120) python benchmarks/gpu_host_probe.py > "$RUN_DIR/host_probe.txt" 2>&1
  status=$?
  grep -E "^==" "$RUN_DIR/host_probe.txt"
  part probe "$RUN_DIR/host_probe.txt" "$status"
fi
if [ -n "${OUT:-}" ]; then
  [ -f "$RUN_DIR/output_code.txt" ] && gzip -f "$RUN_DIR/output_code.txt"
  pack
  ls -la "$OUT"
fi
if [ -n "$FAILED" ]; then
  echo "== failed parts:$FAILED (their logs are in $RUN_DIR)"
  exit 1
fi
# The char-LM --full comparison needs its own call (the per-call limit is 10 minutes):
# benchmarks/gpu_char_lm.sh. Block 64 with persistent TMA, the d=0.75 step and the d=0.25
# profile: benchmarks/gpu_extra.sh, one call.
