"""Make MLX fast on a Linux CPU without changing what it computes: throughput probes and fast quantized layers.

:func:`use_cpu_dequantized_matmul` -- MLX's CPU ``quantized_matmul`` is a
naive kernel (~2.4 GFLOP/s). On CPU, QLoRA layers keep their weights
quantized in memory but dequantize them to fp32 per call and use the BLAS
matmul (inputs of at most :data:`NATIVE_MAX_ROWS` rows, i.e. decoding, stay
native: there the fixed dequantization cost dominates). Metal/CUDA keep the
native kernels (:func:`cpu_needs_dequantized_matmul`). Which BLAS that matmul
runs on is chosen in :mod:`triage.runtime.blas`.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from triage.runtime.blas import BLAS_ENV, THREADS_ENV, set_blas_threads

if TYPE_CHECKING:  # mlx must not be imported before triage.runtime.blas has chosen a BLAS
    import mlx.core as mx
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
import triage
from triage.backend import matmul_latency_ms, matmul_peak_gflops
blas = triage.BLAS
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
        env=env, capture_output=True, text=True, timeout=timeout, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_needs_dequantized_matmul() -> bool:
    """True when quantized matmuls will run on the CPU.

    That is the case when the default device is the CPU, or when no GPU
    backend (Metal, CUDA) exists; there the native kernels are the fast ones.
    """
    import mlx.core as mx

    if mx.default_device().type == mx.cpu:
        return True
    gpu = mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())
    return not gpu


@functools.lru_cache(maxsize=None)
def _unpack_affine(bits: int, group_size: int) -> Callable[..., "mx.array"]:
    """``mx.dequantize`` to fp32 for affine ``bits`` that divide 32, as one compiled elementwise kernel.

    The same numbers (tested bit for bit), but MLX's CPU dequantize runs a
    scalar loop: measured here, 5.5 vs 3.6 ns per weight for a 576 x 1536
    4-bit layer and 8.0 vs 3.2 for SmolLM2's 49152 x 576 tied head. QLoRA
    dequantizes every layer in the forward pass and the adapted ones again
    in the backward pass, so this is most of what 4-bit costs over float.
    """
    import mlx.core as mx

    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
    mask = (1 << bits) - 1

    @mx.compile
    def unpack(w, scales, biases):
        rows, groups = scales.shape
        q = ((w[..., None] >> shifts) & mask).reshape(rows, groups, group_size).astype(scales.dtype)
        out = q * scales[..., None] + biases[..., None]
        return out.reshape(rows, groups * group_size).astype(mx.float32)

    return unpack


@functools.lru_cache(maxsize=None)
def _dequantized_matmul_fn(group_size: int, bits: int, mode: str, has_biases: bool) -> Callable[..., "mx.array"]:
    """x @ dequantize(w).T in fp32, with a VJP that re-dequantizes.

    A custom VJP so that backward does not keep every layer's fp32 weight
    alive from forward to backward (that would hold a full fp32 copy of the
    model during a training step); it recomputes it (~1 ms per layer).
    No cotangent is produced for the (frozen) quantized weight. The VJP runs
    on the forward's stream (``triage.fastmath.custom_function``).
    """
    import mlx.core as mx

    from triage.fastmath import custom_function

    def weight(w: mx.array, scales: mx.array, biases: mx.array | None) -> mx.array:
        if mode == "affine" and biases is not None and 32 % bits == 0:
            return _unpack_affine(bits, group_size)(w, scales, biases)
        return mx.dequantize(
            w, scales, biases, group_size=group_size, bits=bits, mode=mode, dtype=mx.float32
        )

    def matmul(x: mx.array, w: mx.array, scales: mx.array, *biases: mx.array) -> mx.array:
        out = x.astype(mx.float32) @ weight(w, scales, biases[0] if has_biases else None).T
        return out.astype(x.dtype)

    def matmul_vjp(primals: tuple, cotangent: mx.array, output: mx.array) -> tuple:
        x, w, scales, *biases = primals
        dx = cotangent.astype(mx.float32) @ weight(w, scales, biases[0] if has_biases else None)
        frozen = tuple(mx.zeros_like(p) for p in (w, scales, *biases))  # lazy: never evaluated
        return (dx.astype(x.dtype), *frozen)

    return custom_function(matmul, matmul_vjp)


NATIVE_MAX_ROWS = 3
"""Inputs with at most this many rows (tokens) use the native quantized kernel.

Dequantizing costs a fixed ~1-3 ms per 576x1536 layer while the native CPU
kernel costs ~0.75 ms per row, so single-token decoding is faster natively;
prompts and training batches (hundreds of rows) are 20-50x faster dequantized.
Both agree to fp32 rounding.
"""


def dequantized_matmul(x: "mx.array", layer: "nn.Module") -> "mx.array":
    """``x @ W.T`` for a quantized layer's weight W, via fp32 dequantization."""
    biases = layer.get("biases")
    mode = getattr(layer, "mode", "affine")  # older layers predate modes
    fn = _dequantized_matmul_fn(layer.group_size, layer.bits, mode, biases is not None)
    args = (layer["weight"], layer["scales"]) + ((biases,) if biases is not None else ())
    return fn(x, *args)


def _quantized_matmul(x: "mx.array", layer: "nn.Module") -> "mx.array":
    """Pick the faster CPU path for ``x @ W.T`` by the number of input rows."""
    import mlx.core as mx

    if x.size // max(x.shape[-1], 1) > NATIVE_MAX_ROWS:
        return dequantized_matmul(x, layer)
    return mx.quantized_matmul(
        x, layer["weight"], scales=layer["scales"], biases=layer.get("biases"),
        transpose=True, group_size=layer.group_size, bits=layer.bits,
        mode=getattr(layer, "mode", "affine"),
    )


@functools.lru_cache(maxsize=None)
def _fast_classes() -> tuple[type, type]:
    """Build the fast subclasses lazily (mlx must not load at module import)."""
    import mlx.nn as nn

    class CPUQuantizedLinear(nn.QuantizedLinear):
        """QuantizedLinear that multiplies by its fp32-dequantized weight.

        Still an ``nn.QuantizedLinear`` (same parameters, same isinstance), so
        mlx-lm's LoRA wrapping (input dims), fusing and saving treat it as the
        original.  The output has the input's dtype.
        """

        def __call__(self, x: mx.array) -> mx.array:
            y = _quantized_matmul(x, self)
            if "bias" in self:
                y = y + self["bias"]
            return y

    class CPUQuantizedEmbedding(nn.QuantizedEmbedding):
        """QuantizedEmbedding whose tied output projection (``as_linear``) is fast.

        The lookup (``__call__``) only dequantizes the gathered rows and is
        already cheap, so it is inherited unchanged.
        """

        def as_linear(self, x: mx.array) -> mx.array:
            return _quantized_matmul(x, self)

    return CPUQuantizedLinear, CPUQuantizedEmbedding


def _swap(model: "nn.Module", mapping: dict[type, type]) -> int:
    """Re-class every module whose exact type is a key of ``mapping``."""
    count = 0
    for _, module in model.named_modules():
        target = mapping.get(type(module))
        if target is not None:
            # In place, so every reference (e.g. LoRALinear.linear) sees it
            # and parameters, freeze state and memory are untouched.
            module.__class__ = target
            count += 1
    return count


def use_cpu_dequantized_matmul(model: "nn.Module") -> int:
    """Switch a model's quantized layers to dequantize-then-fp32-matmul.

    Affects every ``nn.QuantizedLinear`` and ``nn.QuantizedEmbedding``
    (``as_linear`` = tied lm head), including those inside LoRA wrappers, so
    it may be called before or after ``linear_to_lora_layers`` (the project
    calls it right after loading).  Weights stay quantized in memory.
    Returns the number of layers switched (0 when already switched).
    """
    import mlx.nn as nn

    linear, embedding = _fast_classes()
    return _swap(model, {nn.QuantizedLinear: linear, nn.QuantizedEmbedding: embedding})


def use_native_quantized_matmul(model: "nn.Module") -> int:
    """Undo :func:`use_cpu_dequantized_matmul`; returns layers switched back."""
    import mlx.nn as nn

    linear, embedding = _fast_classes()
    return _swap(model, {linear: nn.QuantizedLinear, embedding: nn.QuantizedEmbedding})


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


def optimize_for_device(model: "nn.Module", inference: bool = False) -> str:
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

    from triage import fastmath

    fastmath.install()
    activations = "attention and SwiGLU use triage.fastmath"
    if inference:
        layers = sum(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
        dequantize_model(model)
        model.set_dtype(mx.float32)
        return f"CPU: {layers} quantized layers dequantized to fp32 once for inference; {activations}"
    return f"CPU: {use_cpu_dequantized_matmul(model)} quantized layers dequantize per call; {activations}"
