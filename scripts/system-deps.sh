#!/usr/bin/env bash
# The one system library the pip packages cannot bring: cmeel-openblas (the fast
# BLAS that triage/backend.py loads for MLX on Linux) links libgfortran.so.5.
# Installs it with apt-get when we are root on Debian/Ubuntu; otherwise says how.
set -euo pipefail
[ "$(uname -s)" = "Linux" ] || exit 0
if ldconfig -p 2>/dev/null | grep -q 'libgfortran\.so\.5'; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  echo "[setup] installing libgfortran5 (needed by the fast BLAS) with apt-get"
  apt-get install -y -qq libgfortran5 >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq libgfortran5; }
else
  echo "[setup] WARNING: libgfortran.so.5 is missing, so MLX will use its slow reference BLAS (~20x slower)."
  echo "[setup]          Install it with: sudo apt-get install libgfortran5 (or your distribution's libgfortran5)."
fi
