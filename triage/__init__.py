"""Triage QLoRA study: shared logic for the DVC stages in ``stages/``.

Importing the package does nothing else. How the process runs is settled by
an explicit call, :func:`triage.runtime.setup`, which every entry point makes
before anything imports ``mlx``: a fast BLAS for MLX on Linux, proven on this
CPU before it is loaded (only possible before mlx is loaded); glibc keeping
freed buffers for reuse; and MLX's evaluation order widened so that CPU
streams run side by side. After it, ``triage.RUNTIME`` is the line the stages
log about it, and ``triage.BLAS``, ``triage.ALLOCATOR``, ``triage.SCHEDULE``
its parts.
"""

from __future__ import annotations

_SETTLED_PARTS = {"RUNTIME": None, "BLAS": "blas", "ALLOCATOR": "allocator", "SCHEDULE": "schedule"}


def __getattr__(name: str) -> str:
    """``triage.RUNTIME`` and its parts, as :func:`triage.runtime.setup` recorded them."""
    if name not in _SETTLED_PARTS:
        raise AttributeError(f"module 'triage' has no attribute {name!r}")
    from triage.runtime import settled

    runtime = settled()
    if runtime is None:
        raise AttributeError(
            f"triage.{name}: triage.runtime.setup() has not run in this process; "
            "an entry point calls it before anything imports mlx"
        )
    part = _SETTLED_PARTS[name]
    return str(runtime) if part is None else getattr(runtime, part)
