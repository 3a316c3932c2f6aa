#!/usr/bin/env bash
# The main job: Fashion-MNIST MLP, dense vs AGPE vs RigL vs SET vs GMP at 90% sparsity,
# compiled with the agpe backend; prints the comparison table and writes plots to runs/.
# Installs what it needs first (virtualenv, pinned packages, Debian's dataset package).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  echo "[main] installing Debian's dataset-fashion-mnist" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
source "$ROOT/scripts/env.sh"
cd "$ROOT"
exec python examples/fashion_mnist.py --quick --out runs/fashion_mnist "$@"
