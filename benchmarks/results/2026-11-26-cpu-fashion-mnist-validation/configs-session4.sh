#!/bin/bash
# usage: job.sh CFG SEED WORKTREE  -- one --full --validation 10000 agpe run
cfg=$1; seed=$2; wt=$3
case $cfg in
  A) opts="";;
  H) opts="--agpe saliency=magnitude";;
  J) opts="--agpe protect_grown=1";;
  K) opts="--min-layer-share 0.5";;
  P) opts="--agpe protect_grown=2";;
  Q) opts="--agpe saliency=magnitude --agpe protect_grown=1";;
  *) echo "unknown $cfg"; exit 2;;
esac
out=/tmp/fm_val2/${cfg}_s${seed}
cd $wt && PYTHONPATH=$wt OMP_NUM_THREADS=1 /work/main/.venv/bin/python examples/fashion_mnist.py --full --validation 10000 --methods agpe --seed $seed $opts --out $out > $out.log 2>$out.err
echo "$cfg $seed done rc=$? $(date +%T)"
