#!/usr/bin/env bash
# Install Debian packages the examples read their data from, if missing:
#   dataset-fashion-mnist (files under /usr/share/datasets/fashion-mnist/)
#   bible-kjv + bible-kjv-text (the `bible` command; English text for examples/char_lm.py)
set -euo pipefail
need=()
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
command -v bible >/dev/null 2>&1 || need+=(bible-kjv bible-kjv-text)
if [ "${#need[@]}" -gt 0 ]; then
  echo "[apt] installing ${need[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
