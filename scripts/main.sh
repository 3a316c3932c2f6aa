#!/usr/bin/env bash
# The main job: Fashion-MNIST MLP, dense vs AGPE vs RigL vs SET vs GMP at 90% sparsity,
# compiled with the agpe backend; prints the comparison table and writes plots to runs/.
# Installs what it needs first (virtualenv, pinned packages, Debian's dataset package).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/apt.sh"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
# --quick unless the arguments name a mode (--smoke, --full): e.g. `bash scripts/main.sh --full`
mode=--quick
for arg in "$@"; do
    case "$arg" in --sm*|--q*|--f*) mode= ;; esac  # (argparse takes unambiguous prefixes too)
done
exec python examples/fashion_mnist.py $mode "$@"
