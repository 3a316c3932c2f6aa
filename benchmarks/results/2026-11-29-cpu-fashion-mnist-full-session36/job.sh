#!/bin/bash
# usage: job.sh SEED... -- --full AGPE test-set runs from a worktree with the noise-aware schedule after audit DA, one thread
for seed in "$@"; do
  out=/tmp/fm36b/agpe_s${seed}; mkdir -p $out
  cd /tmp/v4tree && OMP_NUM_THREADS=1 PYTHONPATH=/tmp/v4tree /work/main/.venv/bin/python examples/fashion_mnist.py --full \
      --methods agpe --seed $seed --out $out > $out/stdout.txt 2> $out/stderr.txt
  echo "agpe $seed rc=$? $(date +%T)"
done
