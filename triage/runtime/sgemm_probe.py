"""Prove one BLAS library in a throwaway process: ``python sgemm_probe.py LIBRARY``.

:mod:`triage.runtime.blas` runs this file as a child process and never imports
it, so a library built for another CPU family dies here (SIGILL), not in the
caller. It prints one JSON line with the library's OpenBLAS build description,
before any BLAS call so that it survives a crash, then one with the largest
error of two ``cblas_sgemm`` products against numpy's float64 result.

It imports nothing from ``triage``: it runs beside the process that chooses a BLAS.
"""

from __future__ import annotations

import ctypes
import json
import sys

import numpy as np

ROW_MAJOR, NO_TRANS = 101, 111  # CBLAS enum values
# 256^3 runs OpenBLAS's optimised kernels on several threads (where
# cmeel-openblas's SKYLAKEX build dies on a CPU without AVX-512); the odd shape
# runs its edge kernels.
SHAPES = ((256, 256, 256), (67, 45, 33))


def openblas_build(lib: ctypes.CDLL) -> dict[str, str]:
    """``openblas_get_config()`` and the core it picked; empty for other BLAS libraries."""
    described = {}
    for key, function in (("config", "openblas_get_config"), ("core", "openblas_get_corename")):
        if hasattr(lib, function):
            getattr(lib, function).restype = ctypes.c_char_p
            described[key] = getattr(lib, function)().decode()
    return described


def sgemm(lib: ctypes.CDLL, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """C = A @ B through the library's ``cblas_sgemm`` (row-major float32)."""
    (m, k), n = a.shape, b.shape[1]
    c = np.zeros((m, n), dtype=np.float32)
    pointer = ctypes.POINTER(ctypes.c_float)
    lib.cblas_sgemm(
        ROW_MAJOR,
        NO_TRANS,
        NO_TRANS,
        m,
        n,
        k,
        ctypes.c_float(1.0),
        a.ctypes.data_as(pointer),
        k,
        b.ctypes.data_as(pointer),
        n,
        ctypes.c_float(0.0),
        c.ctypes.data_as(pointer),
        n,
    )
    return c


def relative_error(lib: ctypes.CDLL) -> float:
    """Largest |sgemm - exact| over the largest |exact|, across :data:`SHAPES`."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for m, k, n in SHAPES:
        a = rng.uniform(-1, 1, (m, k)).astype(np.float32)
        b = rng.uniform(-1, 1, (k, n)).astype(np.float32)
        exact = a.astype(np.float64) @ b.astype(np.float64)
        worst = max(worst, float(np.abs(sgemm(lib, a, b) - exact).max() / np.abs(exact).max()))
    return worst


def main(path: str) -> None:
    lib = ctypes.CDLL(path)  # local symbols: nothing else in this process binds to it
    print(json.dumps(openblas_build(lib)), flush=True)
    print(json.dumps({"max_relative_error": relative_error(lib)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
