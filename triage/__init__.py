"""Triage QLoRA study: shared logic for the DVC stages in ``stages/``.

Importing the package first selects a fast BLAS for MLX on Linux, which only
works before anything imports ``mlx``, has glibc keep freed buffers for
reuse, and widens MLX's evaluation order so that CPU streams run side by side
(see ``triage.backend``).
"""

from triage.backend import keep_freed_buffers, load_fast_blas, widen_schedule

BLAS = load_fast_blas()
ALLOCATOR = keep_freed_buffers()
SCHEDULE = widen_schedule()
RUNTIME = f"BLAS: {BLAS}; {ALLOCATOR}; {SCHEDULE}"  # what the stages log about the above
