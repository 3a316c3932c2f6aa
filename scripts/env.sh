#!/usr/bin/env bash
# Create (or reuse) .venv with the pinned toolchain and install agpe_compile into it.
# Sourced by scripts/main.sh and scripts/test.sh; safe to run repeatedly.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AGPE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.agpe-installed"
want="$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # torch first and explicitly: pinned to 2.13.0 (the CPU build where pip's configuration provides it,
  # as on this project's machines); anything unpinned would pull a newer CUDA build.
  echo "[env] installing torch==2.13.0 (the build pip's configuration provides) and the pinned packages" >&2
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q -r "$ROOT/requirements.txt"
  "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e "$ROOT"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
