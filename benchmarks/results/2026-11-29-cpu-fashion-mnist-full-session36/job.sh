#!/bin/bash
# usage: job.sh SEED... -- --full AGPE test-set runs from /tmp/v3tree (noise-aware schedule), one thread
for seed in "$@"; do
  out=/tmp/fm36/agpe_s${seed}; mkdir -p $out
  cd /tmp/v3tree && V3_MAX=1 V3_Z=2.0 OMP_NUM_THREADS=1 PYTHONPATH=/tmp/v3tree /work/main/.venv/bin/python examples/fashion_mnist.py --full \
      --methods agpe --seed $seed --out $out > $out/stdout.txt 2> $out/stderr.txt
  echo "agpe $seed rc=$? $(date +%T)"
done
