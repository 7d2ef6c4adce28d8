"""Make MLX fast on a Linux CPU without changing what it computes.

Two independent fixes, both no-ops where they are not needed:

1. :func:`load_fast_blas` -- the ``mlx[cpu]`` Linux wheel links the reference
   (netlib) BLAS, 15-40x slower than OpenBLAS for fp32 matmul.  Loading
   OpenBLAS with global symbols *before* ``mlx.core`` is imported makes the
   dynamic linker bind mlx's ``cblas_sgemm`` (and LAPACK) calls to it.
   It must therefore run before anything imports ``mlx``; this module does not
   import mlx at import time for that reason.  The library comes from the
   PyPI package cmeel-openblas, which needs the OS's ``libgfortran.so.5``
   (Debian: ``apt-get install libgfortran5``).

2. :func:`use_cpu_dequantized_matmul` -- MLX's CPU ``quantized_matmul`` is a
   naive kernel (~2.4 GFLOP/s).  On CPU, QLoRA layers keep their weights
   quantized in memory but dequantize them to fp32 per call and use the BLAS
   matmul (inputs of at most :data:`NATIVE_MAX_ROWS` rows, i.e. decoding,
   stay native: there the fixed dequantization cost dominates).
   Metal/CUDA keep the native kernels (:func:`cpu_needs_dequantized_matmul`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # mlx must not be imported before load_fast_blas() runs
    import mlx.core as mx
    import mlx.nn as nn

BLAS_ENV = "TRIAGE_BLAS"
"""Environment variable choosing the BLAS preloaded on Linux.

``auto`` (default): cmeel-openblas, else a system libopenblas;
``reference``/``off``: keep the BLAS bundled with mlx;
``cmeel`` / ``system``: only that source; anything containing ``/``: that file.
An explicit choice that cannot be loaded raises instead of silently falling
back, so a benchmark never runs on a BLAS it did not ask for.
"""

THREADS_ENV = "TRIAGE_BLAS_THREADS"
"""OpenBLAS thread count after preloading (default: OpenBLAS's own, i.e. all
cores or ``OPENBLAS_NUM_THREADS``).  On a CPU shared with other busy processes
1 is steadier: a worker thread that is not scheduled stalls the call (measured
on a busy 2-core machine: 1x576 @ 576x1536 took 12-19 ms in some runs with 2
threads, 0.3-0.6 ms with 1; 1024^3 matmul 10-134 GFLOP/s vs 31-88).
"""

_OPT_OUT = frozenset({"reference", "off", "none", "0", "false", "no"})
_BLAS_DESCRIPTION: str | None = None  # cached: the preload can only happen once
_BLAS_HANDLES: list[ctypes.CDLL] = []  # keep loaded libraries referenced


# --------------------------------------------------------------------------
# 1. BLAS preload
# --------------------------------------------------------------------------


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _address(lib: ctypes.CDLL, symbol: str) -> int | None:
    """Address ``symbol`` resolves to through ``lib`` (None: not exported)."""
    try:
        return ctypes.cast(getattr(lib, symbol), ctypes.c_void_p).value
    except AttributeError:
        return None


def global_symbol_provider(symbol: str = "cblas_sgemm") -> str | None:
    """Return the file that provides ``symbol`` in the process's global scope.

    This is the library a later-loaded ``libmlx.so`` binds ``symbol`` to
    (global scope wins over mlx's own RPATH dependencies), so it shows whether
    a preload will take effect.  None when no global library exports it.
    """
    process = ctypes.CDLL(None)
    address = _address(process, symbol)
    if address is None:
        return None
    info = _DlInfo()
    if not process.dladdr(ctypes.c_void_p(address), ctypes.byref(info)):
        return None
    return info.dli_fname.decode() if info.dli_fname else None


def cmeel_openblas_path() -> tuple[Path, str] | None:
    """Locate ``libopenblas.so.0`` shipped by the PyPI package cmeel-openblas.

    Returns (path, package version), or None when the package is absent.
    The package's RECORD is used rather than a hard-coded prefix so that any
    install layout (venv, --user, --target) works.
    """
    try:
        dist = metadata.distribution("cmeel-openblas")
    except metadata.PackageNotFoundError:
        return None
    libs = [f for f in dist.files or [] if f.name.startswith("libopenblas.so")]
    # Prefer the SONAME file; fall back to any versioned name.
    libs.sort(key=lambda f: (f.name != "libopenblas.so.0", len(f.name)))
    for lib in libs:
        path = Path(str(dist.locate_file(lib)))
        if path.exists():
            return path, dist.version
    return None


def _openblas_config(lib: ctypes.CDLL, threads: int | None = None) -> str:
    """Set OpenBLAS's thread count if given; describe version, core and threads.

    Empty string when ``lib`` is not OpenBLAS (e.g. BLIS or MKL given by path).
    """
    try:
        if threads:
            lib.openblas_set_num_threads(threads)
        lib.openblas_get_config.restype = ctypes.c_char_p
        lib.openblas_get_corename.restype = ctypes.c_char_p
        config = lib.openblas_get_config().decode().split()
        core = lib.openblas_get_corename().decode()
        threads = lib.openblas_get_num_threads()
    except AttributeError:
        return ""
    version = config[1] if len(config) > 1 else "?"
    return f"openblas {version}, core {core}, {threads} threads"


def _candidates(choice: str) -> list[tuple[str, Path | None, str]]:
    """(label, path, problem) for each library the choice allows, in order."""
    found: list[tuple[str, Path | None, str]] = []
    if "/" in choice:
        found.append(("path", Path(choice), ""))
        return found
    if choice in ("auto", "cmeel"):
        cmeel = cmeel_openblas_path()
        if cmeel:
            found.append((f"cmeel-openblas {cmeel[1]}", cmeel[0], ""))
        else:
            found.append(("cmeel-openblas", None, "not installed"))
    if choice in ("auto", "system"):
        name = ctypes.util.find_library("openblas")
        found.append(("system", Path(name) if name else None, "" if name else "not found"))
    return found


def _preload(choice: str, threads: int | None) -> str:
    """dlopen the first loadable library for ``choice``; describe the result."""
    problems: list[str] = []
    for label, path, problem in _candidates(choice):
        if path is None:
            problems.append(f"{label}: {problem}")
            continue
        try:
            lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError as err:
            # Typical: cmeel-openblas needs libgfortran.so.5 from the OS
            # (Debian: apt-get install libgfortran5).
            problems.append(f"{label}: {err}")
            continue
        _BLAS_HANDLES.append(lib)
        # Proof, not hope: the global cblas_sgemm (what mlx will bind to)
        # must now be this library's.
        mine = _address(lib, "cblas_sgemm")
        if mine is None or mine != _address(ctypes.CDLL(None), "cblas_sgemm"):
            provider = global_symbol_provider()
            problems.append(f"{label}: loaded but cblas_sgemm resolves to {provider}")
            continue
        return f"{_openblas_config(lib, threads) or path.name} ({label}, RTLD_GLOBAL preload)"
    if choice != "auto":
        raise RuntimeError(f"{BLAS_ENV}={choice}: no usable BLAS: {'; '.join(problems)}")
    return (
        "reference BLAS bundled with mlx (slow: install cmeel-openblas and "
        f"libgfortran5) [{'; '.join(problems)}]"
    )


def load_fast_blas(threads: int | None = None) -> str:
    """Make mlx use an optimised BLAS on Linux; return a one-line description.

    Must run before the first ``import mlx.core`` (anywhere in the process):
    mlx binds its BLAS symbols when it is loaded.  If mlx is already imported
    this does nothing and says so.  On macOS mlx uses Accelerate and nothing
    is done.  The result is cached: later calls return the first description.
    The env variable ``TRIAGE_BLAS`` (see :data:`BLAS_ENV`) overrides the choice;
    ``threads`` (else env ``TRIAGE_BLAS_THREADS``, see :data:`THREADS_ENV`)
    sets OpenBLAS's thread count.
    """
    global _BLAS_DESCRIPTION
    if _BLAS_DESCRIPTION is None:
        env_threads = os.environ.get(THREADS_ENV, "").strip()
        _BLAS_DESCRIPTION = _describe_or_load(threads or int(env_threads or 0) or None)
    return _BLAS_DESCRIPTION


def _describe_or_load(threads: int | None = None) -> str:
    system = platform.system()
    if system == "Darwin":
        return "Accelerate (macOS)"
    if system != "Linux":
        return f"mlx default BLAS ({system}: no preload)"
    choice = os.environ.get(BLAS_ENV, "auto").strip() or "auto"
    already = global_symbol_provider()  # e.g. LD_PRELOAD=libopenblas.so.0
    if "mlx.core" in sys.modules:
        # Too late: libmlx.so is bound already.  Only a BLAS that was global
        # before mlx loaded (LD_PRELOAD or an earlier preload) is in use.
        where = f"; global cblas_sgemm from {already}" if already else ""
        return f"unknown/reference: mlx was imported before load_fast_blas(){where}"
    if already:  # checked first: an LD_PRELOAD cannot be opted out of here
        config = _openblas_config(ctypes.CDLL(already), threads) or Path(already).name
        return f"{config} (already global, e.g. LD_PRELOAD: {already})"
    if choice.lower() in _OPT_OUT:
        return f"reference BLAS bundled with mlx ({BLAS_ENV}={choice})"
    return _preload(choice if "/" in choice else choice.lower(), threads)


def keep_freed_buffers() -> str:
    """Make glibc keep the large buffers MLX frees for reuse, instead of unmapping them; say what was done.

    MLX's CPU allocator asks malloc for every new array. glibc serves large
    blocks (above an adaptive threshold of 128 KB to 32 MB) with fresh mmap'd
    pages and unmaps them on free, so each step's activations page-fault and
    get zero-filled by the kernel all over again. Measured here: a multiply
    over a 38 MB array took 3.4 ns per element that way and 0.8 ns with reused
    memory. The price is that freed memory stays with the process: its
    resident size stays at its peak. Linux (glibc) only; elsewhere nothing is done.
    """
    if platform.system() != "Linux":
        return f"system allocator ({platform.system()})"
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallopt"):
        return "system allocator (no glibc mallopt)"
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # from glibc's malloc.h
    done = (libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1)
            and libc.mallopt(m_top_pad, 64 << 20))
    return "glibc malloc keeping freed buffers for reuse" if done else "system allocator (mallopt refused)"


SCHEDULE_ENV = "MLX_BFS_MAX_WIDTH"
WIDE_SCHEDULE = 1000
"""MLX's evaluation order looks this many graph nodes wide (MLX's default is 20).

MLX orders a graph breadth-first but goes depth-first as soon as more than
``MLX_BFS_MAX_WIDTH`` nodes are pending, and keeps at most ~100 ops queued
across all streams. At 20, a training step on two CPU streams (one row shard
each) comes out as long runs of one shard's ops, so the other stream's thread
idles: measured here, the CPU was busy 1.57 of 2 cores and a SmolLM2-135M
step took 6.9-7.5 s; at 1000 both shards advance together, 1.84 cores and
5.7-6.6 s, for 19 MB more peak memory.
"""


def widen_schedule() -> str:
    """Set ``MLX_BFS_MAX_WIDTH`` to :data:`WIDE_SCHEDULE` for MLX's Linux CPU build unless the user set it; say what holds.

    MLX reads the variable once, at the first evaluation in the process, so
    this runs on ``import triage``. Other builds (Metal, CUDA) keep MLX's own
    default: there one stream runs on the GPU and the order was not measured.
    """
    if os.environ.get(SCHEDULE_ENV, "").strip():
        return f"{SCHEDULE_ENV}={os.environ[SCHEDULE_ENV]} (set by the user)"
    try:
        metadata.distribution("mlx-cpu")
    except metadata.PackageNotFoundError:
        return f"MLX's default evaluation order ({platform.system()}, no mlx-cpu build)"
    os.environ[SCHEDULE_ENV] = str(WIDE_SCHEDULE)
    late = " (mlx was imported first: no effect if it has evaluated anything yet)" if "mlx.core" in sys.modules else ""
    return f"{SCHEDULE_ENV}={WIDE_SCHEDULE}: CPU streams are scheduled side by side{late}"


# --------------------------------------------------------------------------
# 2. Throughput measurement
# --------------------------------------------------------------------------


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
from triage.backend import load_fast_blas, matmul_latency_ms, matmul_peak_gflops
blas = load_fast_blas()
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


# --------------------------------------------------------------------------
# 3. CPU-fast quantized layers (dequantize per call, fp32 BLAS matmul)
# --------------------------------------------------------------------------


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


def set_blas_threads(threads: int) -> bool:
    """Set the preloaded OpenBLAS's thread count now; False when no OpenBLAS was preloaded."""
    for lib in _BLAS_HANDLES:
        if hasattr(lib, "openblas_set_num_threads"):
            lib.openblas_set_num_threads(threads)
            return True
    return False


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
