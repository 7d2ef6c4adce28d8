"""Make MLX fast on this device without changing what it computes: throughput probes,
CPU streams, and switching a loaded model to the fast kernels (:mod:`triage.model.quantized`,
:mod:`triage.model.fastmath`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from triage.model.quantized import cpu_needs_dequantized_matmul, use_cpu_dequantized_matmul
from triage.runtime.blas import BLAS_ENV, THREADS_ENV, set_blas_threads

if TYPE_CHECKING:  # mlx must not be imported before triage.runtime.blas has chosen a BLAS
    import mlx.nn as nn


def matmul_peak_gflops(n: int = 1024, repeats: int = 5, dtype: str = "float32") -> float:
    """Best-of-``repeats`` GFLOP/s of an n x n @ n x n matmul on mx's default device.

    Best rather than mean because the machine is shared: the peak is what
    the library can do, the rest is other load.
    """
    import mlx.core as mx

    a = mx.random.normal((n, n)).astype(getattr(mx, dtype))
    b = mx.random.normal((n, n)).astype(getattr(mx, dtype))
    mx.eval(a, b, a @ b)  # warm-up: thread pools, page faults
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best / 1e9


def matmul_latency_ms(m: int = 1, k: int = 576, n: int = 1536, repeats: int = 20) -> float:
    """Best wall time in ms of ``x @ w.T``, x (m, k), w (n, k) fp32: small-input latency.

    Laid out like a Linear layer (transposed weight), as in token-by-token
    decoding; such calls are dominated by BLAS call overhead and threading.
    """
    import mlx.core as mx

    x, w = mx.random.normal((m, k)), mx.random.normal((n, k))
    mx.eval(x, w, x @ w.T)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(x @ w.T)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


_MEASURE_SNIPPET = """
import json, sys
import triage.runtime
blas = triage.runtime.setup().blas  # before mlx is imported
from triage.model.device import matmul_latency_ms, matmul_peak_gflops
gflops = matmul_peak_gflops(int(sys.argv[1]), int(sys.argv[2]))
print(json.dumps({"blas": blas, "gflops": gflops, "latency_1x576x1536_ms": matmul_latency_ms()}))
"""


def measure_blas_in_subprocess(
    choice: str = "auto",
    n: int = 1024,
    repeats: int = 3,
    threads: int | None = None,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """Run :func:`matmul_peak_gflops` in a fresh interpreter with ``TRIAGE_BLAS=choice``.

    A fresh process is the only honest comparison: once mlx is loaded in this
    process its BLAS cannot change.  ``threads`` sets ``TRIAGE_BLAS_THREADS``.
    Returns ``{"blas": str, "gflops": float, "latency_1x576x1536_ms": float}``.
    """
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, **{BLAS_ENV: choice})
    env.pop(THREADS_ENV, None)
    if threads:
        env[THREADS_ENV] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE_SNIPPET, str(n), str(repeats)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_streams(count: int) -> list:
    """``count`` new MLX CPU streams (one thread each) for data-parallel shards; [] on Metal/CUDA or count < 2.

    MLX runs every op but the BLAS matmul on its stream's single thread, so
    shards on separate streams are what put a second core to work on softmax,
    SiLU, norms, RoPE and dropout. Unless ``TRIAGE_BLAS_THREADS`` says otherwise,
    OpenBLAS then gets the cores divided among the streams, so the shards'
    matmuls do not fight over them.
    """
    import mlx.core as mx

    if count < 2 or not cpu_needs_dequantized_matmul():
        return []
    if not os.environ.get(THREADS_ENV, "").strip():
        set_blas_threads(max(1, (os.cpu_count() or 1) // count))
    return [mx.new_stream(mx.cpu) for _ in range(count)]


def optimize_for_device(model: nn.Module, inference: bool = False) -> str:
    """On a CPU: mlx-lm's attention and SwiGLU without MLX's slow exp, and fast quantized layers.

    Call it after the LoRA layers exist (``add_lora`` or loading an adapter), so
    that the quantized layers they wrap are switched too.

    For training the quantized layers dequantize per call (the weights stay
    quantized in memory); for ``inference`` they are dequantized to fp32 once,
    the same numbers without paying the dequantization on every forward pass
    (for a 135M model, 0.5 GB instead of 0.08 GB resident). Returns a phrase for
    the log saying what was switched. Metal and CUDA keep MLX's own kernels.
    """
    if not cpu_needs_dequantized_matmul():
        return "GPU: MLX's native kernels"
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import dequantize_model

    from triage.model import fastmath

    fastmath.install()
    activations = "attention and SwiGLU use triage.model.fastmath"
    if inference:
        layers = sum(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
        dequantize_model(model)
        model.set_dtype(mx.float32)
        return f"CPU: {layers} quantized layers dequantized to fp32 once for inference; {activations}"
    return f"CPU: {use_cpu_dequantized_matmul(model)} quantized layers dequantize per call; {activations}"
