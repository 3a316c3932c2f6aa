#!/bin/bash
# usage: job.sh METHOD SEED... -- --full test-set runs of one method, one after another, from a
# clone of main at fa978eb in /tmp/fm32/src (one OpenMP thread; two such jobs shared the 2-core VM)
method=$1; shift
for seed in "$@"; do
  out=/tmp/fm32/${method}_s${seed}; mkdir -p $out
  cd /tmp/fm32/src && OMP_NUM_THREADS=1 /work/main/.venv/bin/python examples/fashion_mnist.py --full \
      --methods $method --seed $seed --out $out > $out/stdout.txt 2> $out/stderr.txt
  echo "$method $seed rc=$? $(date +%T)"
done
