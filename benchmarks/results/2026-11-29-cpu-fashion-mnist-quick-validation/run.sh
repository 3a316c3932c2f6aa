#!/bin/bash
# AGPE in --quick on the validation split: default (end_step 0.75 = 585) vs pruning until 0.5 (390)
cd /work/main
for seed in 0 1 2; do
  OMP_NUM_THREADS=1 python examples/fashion_mnist.py --quick --validation 10000 --methods agpe --seed $seed --out runs/quick_validation/default_s$seed > runs/quick_validation/default_s$seed.log 2>&1
  OMP_NUM_THREADS=1 python examples/fashion_mnist.py --quick --validation 10000 --methods agpe --seed $seed --agpe end_step=390 --out runs/quick_validation/end50_s$seed > runs/quick_validation/end50_s$seed.log 2>&1
done
echo done
