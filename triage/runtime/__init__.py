"""How this process runs: the BLAS that MLX calls, the allocator, MLX's evaluation order.

All three must be settled before ``mlx`` is first imported or evaluates
anything, so ``import triage`` does it, and nothing here imports mlx.
"""
