#!/bin/bash
# usage: job.sh SEED... -- --full AGPE test-set runs from /tmp/v5tree (a worktree of fba3722 with the adaptive_schedule.py committed after re-audit DB), one thread
for seed in "$@"; do
  out=/tmp/fm36c/agpe_s${seed}; mkdir -p $out
  cd /tmp/v5tree && OMP_NUM_THREADS=1 PYTHONPATH=/tmp/v5tree /work/main/.venv/bin/python examples/fashion_mnist.py --full \
      --methods agpe --seed $seed --out $out > $out/stdout.txt 2> $out/stderr.txt
  echo "agpe $seed rc=$? $(date +%T)"
done
