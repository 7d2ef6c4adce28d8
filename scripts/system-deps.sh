#!/usr/bin/env bash
# System libraries the pip packages cannot bring, for the fast BLAS that
# triage/runtime/blas.py gives MLX on Linux (each is proven on this CPU first):
#   libopenblas0-pthread  Debian's DYNAMIC_ARCH OpenBLAS: picks its kernels for the
#                         running CPU, so it runs on any x86-64 or arm64; tried first.
#   libgfortran5          needed by cmeel-openblas (PyPI), a SKYLAKEX-only build that
#                         is used only where it passes the proof (AVX-512 CPUs).
# Installs what is missing with apt-get when we are root on Debian/Ubuntu; otherwise says how.
set -euo pipefail
[ "$(uname -s)" = "Linux" ] || exit 0
multiarch=$(gcc -print-multiarch 2>/dev/null || echo "$(uname -m)-linux-gnu")
missing=()
[ -e "/usr/lib/$multiarch/openblas-pthread/libopenblas.so.0" ] || missing+=(libopenblas0-pthread)
ldconfig -p 2>/dev/null | grep -q 'libgfortran\.so\.5' || missing+=(libgfortran5)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  echo "[setup] installing ${missing[*]} (the fast BLAS for MLX) with apt-get"
  apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "${missing[@]}"; }
else
  echo "[setup] WARNING: ${missing[*]} missing; without a BLAS that runs on this CPU, MLX uses its reference BLAS (~30x slower)."
  echo "[setup]          Debian/Ubuntu: sudo apt-get install ${missing[*]}; elsewhere your distribution's DYNAMIC_ARCH OpenBLAS."
fi
