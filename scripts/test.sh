#!/usr/bin/env bash
# Run the test suite (pytest, CPU; GPU tests skip without CUDA). Installs what it needs first.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/apt.sh"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
exec python -m pytest -q -p no:cacheprovider "$@"
