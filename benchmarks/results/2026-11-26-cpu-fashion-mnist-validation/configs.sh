#!/bin/bash
cfg=$1; seed=$2
case $cfg in
  A) opts="";;
  B) opts="--agpe patience=4 --agpe improve_tol=0.03";;
  C) opts="--agpe cooldown=3";;
  D) opts="--agpe cooldown=2 --agpe patience=3 --agpe improve_tol=0.02";;
  E) opts="--agpe improve_tol=0.05 --agpe patience=5";;
  F) opts="--agpe improve_tol=0.2 --agpe patience=4 --agpe cooldown=2";;
  G) opts="--agpe drop_fraction=0.1";;
esac
cd /work/main && OMP_NUM_THREADS=1 .venv/bin/python examples/fashion_mnist.py --full --validation 10000 --methods agpe --seed $seed $opts --out /tmp/fm_val/${cfg}_s${seed} > /tmp/fm_val/${cfg}_s${seed}.log 2>/tmp/fm_val/${cfg}_s${seed}.err
echo "$cfg $seed done rc=$?"
#!/bin/bash
cfg=$1; seed=$2
case $cfg in
  H) opts="--agpe saliency=magnitude";;
  I) opts="--agpe saliency=gradient";;
esac
cd /tmp/wt_fm2 && PYTHONPATH=/tmp/wt_fm2 OMP_NUM_THREADS=1 /work/main/.venv/bin/python examples/fashion_mnist.py --full --validation 10000 --methods agpe --seed $seed $opts --out /tmp/fm_val/${cfg}_s${seed} > /tmp/fm_val/${cfg}_s${seed}.log 2>/tmp/fm_val/${cfg}_s${seed}.err
echo "$cfg $seed done rc=$?"
