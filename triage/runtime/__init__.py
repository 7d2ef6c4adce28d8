"""How this process runs: the BLAS that MLX calls, the allocator, MLX's evaluation order.

All three must be settled before ``mlx`` is first imported or evaluates
anything, so every entry point (the stages, ``python -m triage``, the bench
scripts, the tests' ``conftest.py``) calls :func:`setup` first, before any
import that may load mlx, and only then imports the rest::

    import triage.runtime

    triage.runtime.setup()  # before anything imports mlx

    import mlx.core as mx

A statement between two groups of imports is where import sorters (ruff's
isort) stop, so they cannot move an import above the call;
``tests/test_entry_points.py`` checks every entry point. Importing
``triage`` or this package does nothing by itself, and nothing here imports mlx.
"""

from __future__ import annotations

from dataclasses import dataclass

from triage.runtime.allocator import keep_freed_buffers
from triage.runtime.blas import load_fast_blas
from triage.runtime.schedule import widen_schedule


@dataclass(frozen=True)
class Runtime:
    """What :func:`setup` settled, each part in one line; ``str()`` is the line the stages log."""

    blas: str
    allocator: str
    schedule: str

    def __str__(self) -> str:
        return f"BLAS: {self.blas}; {self.allocator}; {self.schedule}"


_SETTLED: Runtime | None = None


def setup() -> Runtime:
    """Settle the BLAS, the allocator and MLX's evaluation order for this process; say what was done.

    Call it before anything imports mlx (a call after that still returns, but
    its BLAS line says mlx came first). Idempotent: later calls return the
    first call's record, also as :func:`settled` and ``triage.RUNTIME``
    (``triage.BLAS``, ``triage.ALLOCATOR``, ``triage.SCHEDULE``). Raises
    when an explicit ``TRIAGE_BLAS`` choice cannot be loaded
    (:func:`triage.runtime.blas.load_fast_blas`).
    """
    global _SETTLED
    if _SETTLED is None:
        _SETTLED = Runtime(load_fast_blas(), keep_freed_buffers(), widen_schedule())
    return _SETTLED


def settled() -> Runtime | None:
    """What :func:`setup` settled in this process, or None when it has not run."""
    return _SETTLED
