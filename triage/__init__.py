"""Triage QLoRA study: shared logic for the DVC stages in ``stages/``.

Importing the package first settles how this process runs (``triage.runtime``):
a fast BLAS for MLX on Linux, proven on this CPU before it is loaded (only
possible before anything imports ``mlx``); glibc keeping freed buffers for
reuse; and MLX's evaluation order widened so that CPU streams run side by side.
"""

from triage.runtime.allocator import keep_freed_buffers
from triage.runtime.blas import load_fast_blas
from triage.runtime.schedule import widen_schedule

BLAS = load_fast_blas()
ALLOCATOR = keep_freed_buffers()
SCHEDULE = widen_schedule()
RUNTIME = f"BLAS: {BLAS}; {ALLOCATOR}; {SCHEDULE}"  # what the stages log about the above
