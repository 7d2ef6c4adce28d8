"""Microbenchmark: is MLX on this CPU using a fast BLAS, and is QLoRA's matmul fast?

Run: ``python bench/blas.py [--out bench/blas.json]`` (about 10-30 s).

1. fp32 n x n matmul GFLOP/s (and a 1x576 @ 576x1536 matmul's latency) with
   mlx's bundled reference BLAS, the preloaded OpenBLAS, and OpenBLAS with one
   thread, each in a fresh process (the BLAS of a process in which mlx is
   loaded can no longer change).
2. For a 576x1536 quantized layer (SmolLM2-135M's MLP) and a (4, 256, 576)
   fp32 input, 4 and 8 bit: mlx's native quantized_matmul vs
   dequantize-to-fp32 + BLAS matmul (triage.model.device's CPU path), plus a
   single-row input (token-by-token decoding).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import triage.runtime

triage.runtime.setup()  # before any import that may load mlx (triage/runtime/__init__.py)

from triage.model import device, quantized


def best_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Best wall time of ``repeats`` evaluated calls, after one warm-up, in ms."""
    import mlx.core as mx

    mx.eval(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def quantized_layer_timings(bits: int, rows_shape: tuple[int, ...], repeats: int) -> dict:
    """Native quantized_matmul vs dequantize + fp32 matmul for one layer."""
    import mlx.core as mx
    import mlx.nn as nn

    mx.random.seed(0)
    layer = nn.QuantizedLinear.from_linear(nn.Linear(576, 1536, bias=False), 64, bits)
    x = mx.random.normal((*rows_shape, 576))
    mx.eval(layer.parameters(), x)
    native = lambda: mx.quantized_matmul(  # noqa: E731
        x, layer.weight, layer.scales, layer.biases, transpose=True, group_size=64, bits=bits
    )
    dequant = lambda: mx.dequantize(layer.weight, layer.scales, layer.biases, 64, bits)  # noqa: E731
    fast = lambda: quantized.dequantized_matmul(x, layer)  # noqa: E731
    flops = 2 * x.size * 1536
    result = {
        "bits": bits,
        "input": list(x.shape),
        "quantized_matmul_ms": best_ms(native, repeats),
        "dequantize_ms": best_ms(dequant, repeats),
        "dequantize_matmul_ms": best_ms(fast, repeats),
        "max_abs_diff": mx.abs(native() - fast()).max().item(),
    }
    for key in ("quantized_matmul", "dequantize_matmul"):
        result[f"{key}_gflops"] = flops / result[f"{key}_ms"] / 1e6
    result["speedup"] = result["quantized_matmul_ms"] / result["dequantize_matmul_ms"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    parser.add_argument("--n", type=int, default=1024, help="matmul size")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    blas = triage.BLAS
    report: dict[str, Any] = {"platform": platform.platform(), "blas_in_process": blas}
    runs = {"reference": ("reference", None), "openblas": ("auto", None), "openblas-1t": ("auto", 1)}
    report["matmul_fp32"] = {
        name: device.measure_blas_in_subprocess(choice, args.n, args.repeats, threads)
        for name, (choice, threads) in runs.items()
    }
    report["quantized_576x1536"] = [
        quantized_layer_timings(bits, shape, args.repeats * 2) for bits in (4, 8) for shape in ((4, 256), (1,))
    ]

    print(f"in-process BLAS: {blas}")
    for choice, res in report["matmul_fp32"].items():
        print(
            f"[{choice:11}] matmul {args.n}^3 fp32 {res['gflops']:6.1f} GFLOP/s, 1x576x1536"
            f" {res['latency_1x576x1536_ms']:6.2f} ms  {res['blas']}"
        )
    for r in report["quantized_576x1536"]:
        print(
            f"{r['bits']}-bit x{r['input']}: quantized_matmul {r['quantized_matmul_ms']:8.2f} ms"
            f" | dequantize {r['dequantize_ms']:6.2f} ms + matmul = "
            f"{r['dequantize_matmul_ms']:7.2f} ms  ({r['speedup']:.1f}x, "
            f"max|diff| {r['max_abs_diff']:.1e})"
        )
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
