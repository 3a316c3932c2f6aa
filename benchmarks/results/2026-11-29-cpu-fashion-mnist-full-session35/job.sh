#!/bin/bash
# usage: job.sh METHOD:SEED... -- --full test-set runs, one after another, from a clone of main
# at 51ec167 in /tmp/fm35b/src (one OpenMP thread; two such jobs shared the 2-core VM)
for spec in "$@"; do
  method=${spec%%:*}; seed=${spec##*:}
  out=/tmp/fm35b/${method}_s${seed}; mkdir -p $out
  cd /tmp/fm35b/src && OMP_NUM_THREADS=1 /work/main/.venv/bin/python examples/fashion_mnist.py --full \
      --methods $method --seed $seed --out $out > $out/stdout.txt 2> $out/stderr.txt
  echo "$method $seed rc=$? $(date +%T)"
done
