"""Give MLX's Linux CPU build a fast BLAS that is proven to run on this CPU; say what was chosen and why.

:func:`load_fast_blas` runs in :func:`triage.runtime.setup`, which every
entry point calls before anything imports ``mlx``: MLX binds its
``cblas_sgemm`` calls when it is loaded, to whichever library then provides
the symbol globally. Each candidate is first proven on
this CPU (:mod:`triage.runtime.blas_proof`); the first that passes is loaded
with ``RTLD_GLOBAL``. When none passes MLX keeps its reference BLAS and one
warning line says so. On macOS MLX uses Accelerate and nothing is loaded.

This module never imports mlx.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from dataclasses import replace
from pathlib import Path

from triage.runtime.blas_proof import Candidate, Cpu, Verdict, candidates, prove, this_cpu, verdict_cache_path

BLAS_ENV = "TRIAGE_BLAS"
"""Environment variable choosing the BLAS preloaded on Linux.

``auto`` (default): the first candidate that passes its proof, Debian's
DYNAMIC_ARCH OpenBLAS first, cmeel-openblas after it; MLX's reference BLAS,
with a warning, when none passes. ``reference``/``off``: keep the BLAS bundled
with mlx. ``system``: a system libopenblas only; ``cmeel``: cmeel-openblas
only; anything containing ``/``: that file. An explicit choice is proven too
and raises instead of falling back, so a benchmark never runs on a BLAS it did
not ask for.
"""

THREADS_ENV = "TRIAGE_BLAS_THREADS"
"""OpenBLAS thread count after preloading (default: OpenBLAS's own, i.e. all
cores or ``OPENBLAS_NUM_THREADS``). On a CPU shared with other busy processes
1 is steadier: a worker thread that is not scheduled stalls the call (measured
on a busy 2-core machine: 1x576 @ 576x1536 took 12-19 ms in some runs with 2
threads, 0.3-0.6 ms with 1; 1024^3 matmul 10-134 GFLOP/s vs 31-88).
"""

INSTALL_HINT = (
    "install a DYNAMIC_ARCH OpenBLAS (Debian/Ubuntu: sudo apt-get install libopenblas0-pthread; "
    "or run scripts/system-deps.sh)"
)
_OPT_OUT = frozenset({"reference", "off", "none", "0", "false", "no"})
_BLAS_DESCRIPTION: str | None = None  # cached: the preload can only happen once per process
_BLAS_HANDLES: list[ctypes.CDLL] = []  # keep loaded libraries referenced


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
    """The file that provides ``symbol`` in the process's global scope, or None.

    This is the library a later-loaded ``libmlx.so`` binds ``symbol`` to
    (global scope wins over mlx's own RPATH dependencies), so it shows whether
    a preload will take effect.
    """
    process = ctypes.CDLL(None)
    address = _address(process, symbol)
    if address is None:
        return None
    info = _DlInfo()
    if not process.dladdr(ctypes.c_void_p(address), ctypes.byref(info)):
        return None
    return info.dli_fname.decode() if info.dli_fname else None


def _openblas_config(lib: ctypes.CDLL, threads: int | None = None) -> str:
    """Set OpenBLAS's thread count if given; describe version, core and threads ("" when not OpenBLAS)."""
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
    build = "DYNAMIC_ARCH" if "DYNAMIC_ARCH" in config else "single-target build"
    return f"openblas {version}, core {core}, {threads} threads, {build}"


def _skipped(verdicts: list[Verdict]) -> str:
    failed = [f"{v.candidate.label}: {v.problem}" for v in verdicts if not v.ok]
    return f" [skipped {' | '.join(failed)}]" if failed else ""


def _make_global(verdict: Verdict, threads: int | None) -> str | None:
    """dlopen a proven library with global symbols; its description, or None when mlx would not bind to it."""
    path = verdict.candidate.path
    assert path is not None
    lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    _BLAS_HANDLES.append(lib)
    mine = _address(lib, "cblas_sgemm")
    if mine is None or mine != _address(ctypes.CDLL(None), "cblas_sgemm"):
        return None
    proof = "probe cached" if verdict.cached else "probed now"
    return f"{_openblas_config(lib, threads) or path.name} ({verdict.candidate.label}, proven on this CPU: {proof})"


def choose_and_load(choice: str, threads: int | None, cpu: Cpu, cache: Path) -> str:
    """Prove every candidate ``choice`` allows on ``cpu``, make the first that passes global; describe it all."""
    verdicts = [prove(candidate, cpu, cache) for candidate in candidates(choice)]
    for index, verdict in enumerate(verdicts):
        if verdict.ok:
            loaded = _make_global(verdict, threads)
            if loaded:
                return loaded + _skipped(verdicts)
            provider = global_symbol_provider()
            verdicts[index] = replace(verdict, problem=f"loaded, but cblas_sgemm resolves to {provider}")
    if choice != "auto":
        raise RuntimeError(f"{BLAS_ENV}={choice}: no BLAS passed its proof on this CPU{_skipped(verdicts)}")
    print(
        f"[triage] WARNING: no optimised BLAS passed its proof on this CPU, so MLX uses its reference BLAS "
        f"and matmuls will be about 30x slower: {INSTALL_HINT}{_skipped(verdicts)}",
        file=sys.stderr,
    )
    return f"reference BLAS bundled with mlx (slow: {INSTALL_HINT}){_skipped(verdicts)}"


def load_fast_blas(threads: int | None = None) -> str:
    """Make mlx use a proven, optimised BLAS on Linux; return a one-line description.

    Must run before the first ``import mlx.core`` anywhere in the process. If
    mlx is already imported this does nothing and says so. The result is
    cached: later calls return the first description. ``TRIAGE_BLAS``
    (:data:`BLAS_ENV`) overrides the choice; ``threads`` (else
    ``TRIAGE_BLAS_THREADS``, :data:`THREADS_ENV`) sets OpenBLAS's thread count.
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
        # Too late: libmlx.so is bound already. Only a BLAS that was global
        # before mlx loaded (LD_PRELOAD or an earlier preload) is in use.
        where = f"; global cblas_sgemm from {already}" if already else ""
        return f"unknown/reference: mlx was imported before load_fast_blas(){where}"
    if already:  # checked first: a library made global by LD_PRELOAD cannot be unloaded
        return _describe_already_global(Path(already), threads)
    if choice.lower() in _OPT_OUT:
        return f"reference BLAS bundled with mlx ({BLAS_ENV}={choice})"
    return choose_and_load(choice if "/" in choice else choice.lower(), threads, this_cpu(), verdict_cache_path())


def _describe_already_global(path: Path, threads: int | None) -> str:
    """A BLAS made global before us (LD_PRELOAD): prove it too, so a bad one fails clearly instead of with SIGILL."""
    verdict = prove(Candidate("already global", path), this_cpu(), verdict_cache_path())
    if not verdict.ok:
        raise RuntimeError(
            f"{path} provides cblas_sgemm in this process (LD_PRELOAD?) but cannot run on this "
            f"CPU: {verdict.problem}. Unset LD_PRELOAD, or {INSTALL_HINT}."
        )
    config = _openblas_config(ctypes.CDLL(str(path)), threads) or path.name
    return f"{config} (already global, e.g. LD_PRELOAD: {path}; proven on this CPU)"


def set_blas_threads(threads: int) -> bool:
    """Set the preloaded OpenBLAS's thread count now; False when no OpenBLAS was preloaded."""
    for lib in _BLAS_HANDLES:
        if hasattr(lib, "openblas_set_num_threads"):
            lib.openblas_set_num_threads(threads)
            return True
    return False
