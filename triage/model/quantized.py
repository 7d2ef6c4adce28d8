"""Fast quantized layers on a CPU, computing what MLX's own layers compute.

MLX's CPU ``quantized_matmul`` is a naive kernel (~2.4 GFLOP/s). On CPU,
QLoRA layers keep their weights quantized in memory but dequantize them to
fp32 per call and use the BLAS matmul (inputs of at most
:data:`NATIVE_MAX_ROWS` rows, i.e. decoding, stay native: there the fixed
dequantization cost dominates). Metal/CUDA keep the native kernels
(:func:`cpu_needs_dequantized_matmul`). Which BLAS that matmul runs on is
chosen in :mod:`triage.runtime.blas`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # mlx must not be imported before triage.runtime.blas has chosen a BLAS
    import mlx.core as mx
    import mlx.nn as nn


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


@functools.cache
def _unpack_affine(bits: int, group_size: int) -> Callable[..., mx.array]:
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


def _fp32_weight(
    w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int, mode: str
) -> mx.array:
    """The quantized weight as fp32: the compiled unpack where it applies, else ``mx.dequantize``."""
    import mlx.core as mx

    if mode == "affine" and biases is not None and 32 % bits == 0:
        return _unpack_affine(bits, group_size)(w, scales, biases)
    return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode, dtype=mx.float32)


@functools.cache
def _dequantized_matmul_fn(group_size: int, bits: int, mode: str, has_biases: bool) -> Callable[..., mx.array]:
    """x @ dequantize(w).T in fp32, with a VJP that re-dequantizes.

    A custom VJP so that backward does not keep every layer's fp32 weight
    alive from forward to backward (that would hold a full fp32 copy of the
    model during a training step); it recomputes it (~1 ms per layer).
    No cotangent is produced for the (frozen) quantized weight. The VJP runs
    on the forward's stream (``triage.model.fastmath.custom_function``).
    """
    import mlx.core as mx

    from triage.model.fastmath import custom_function

    def weight(w: mx.array, scales: mx.array, biases: mx.array | None) -> mx.array:
        return _fp32_weight(w, scales, biases, group_size, bits, mode)

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


def dequantized_matmul(x: mx.array, layer: nn.Module) -> mx.array:
    """``x @ W.T`` for a quantized layer's weight W, via fp32 dequantization."""
    biases = layer.get("biases")
    mode = getattr(layer, "mode", "affine")  # older layers predate modes
    fn = _dequantized_matmul_fn(layer.group_size, layer.bits, mode, biases is not None)
    args = (layer["weight"], layer["scales"]) + ((biases,) if biases is not None else ())
    return fn(x, *args)


@contextmanager
def tied_head_dequantized_once(model: nn.Module) -> Iterator[None]:
    """Inside, a fast 4/8-bit tied output head multiplies by one fp32 copy of itself, made when first used.

    A training step projects each shard's completion positions and
    back-propagates through them, and per call the fast layer dequantizes the
    whole vocabulary matrix (49,152 x 576 for SmolLM2): four times a step with
    two shards. One copy is made once a step and lives until its backward pass
    is done (113 MB for SmolLM2-135M, 671 MB for Gemma-3-270M). Same numbers:
    it is the matrix each call would make. Other heads are left as they are.
    """
    import mlx.core as mx

    from triage.model.mlx_lm_internals import tied_embedding

    embedding = tied_embedding(model)
    if type(embedding) is not _fast_classes()[1]:
        yield
        return
    weight = _fp32_weight(
        embedding["weight"],
        embedding["scales"],
        embedding.get("biases"),
        embedding.group_size,
        embedding.bits,
        getattr(embedding, "mode", "affine"),
    )  # lazy: computed once, when used
    embedding.as_linear = lambda x: (x.astype(mx.float32) @ weight.T).astype(x.dtype)
    try:
        yield
    finally:
        del embedding.as_linear


def _quantized_matmul(x: mx.array, layer: nn.Module) -> mx.array:
    """Pick the faster CPU path for ``x @ W.T`` by the number of input rows."""
    import mlx.core as mx

    if x.size // max(x.shape[-1], 1) > NATIVE_MAX_ROWS:
        return dequantized_matmul(x, layer)
    return mx.quantized_matmul(
        x,
        layer["weight"],
        scales=layer["scales"],
        biases=layer.get("biases"),
        transpose=True,
        group_size=layer.group_size,
        bits=layer.bits,
        mode=getattr(layer, "mode", "affine"),
    )


@functools.cache
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


def _swap(model: nn.Module, mapping: dict[type, type]) -> int:
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


def use_cpu_dequantized_matmul(model: nn.Module) -> int:
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


def use_native_quantized_matmul(model: nn.Module) -> int:
    """Undo :func:`use_cpu_dequantized_matmul`; returns layers switched back."""
    import mlx.nn as nn

    linear, embedding = _fast_classes()
    return _swap(model, {linear: nn.QuantizedLinear, embedding: nn.QuantizedEmbedding})
