#!/usr/bin/env bash
# Run the test suite (pytest, CPU; GPU tests skip without CUDA). Installs what it needs first.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/apt.sh"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
# Two pytest-xdist workers with one OpenMP thread each: on a 2-core VM the suite takes
# 7 1/2-9 1/2 minutes in pytest (most tests are compile-bound Python).
# AGPE_TEST_WORKERS=0 runs it serially; later options (e.g. `-n 0`) override these.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m pytest -q -p no:cacheprovider -n "${AGPE_TEST_WORKERS:-2}" "$@"
