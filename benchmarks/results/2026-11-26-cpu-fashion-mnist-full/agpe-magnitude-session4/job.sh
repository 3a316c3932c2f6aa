#!/bin/bash
# usage: job.sh NAME SEED METHOD [extra args...] -- one --full test-set run
name=$1; seed=$2; method=$3; shift 3
out=/tmp/fm_test/${name}_s${seed}
cd /tmp/wt_head && PYTHONPATH=/tmp/wt_head OMP_NUM_THREADS=1 /work/main/.venv/bin/python examples/fashion_mnist.py --full --methods $method --seed $seed "$@" --out $out > $out.log 2>$out.err
echo "$name $seed done rc=$? $(date +%T)"
