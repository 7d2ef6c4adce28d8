"""Triage QLoRA study: shared logic for the DVC stages in ``stages/``.

Importing the package first selects a fast BLAS for MLX on Linux (see
``triage.backend``), which only works before anything imports ``mlx``.
"""

from triage.backend import load_fast_blas

BLAS = load_fast_blas()
