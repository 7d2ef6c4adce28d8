"""The language model as training and evaluation both see it: chat format, label scoring and the completion's loss,
the block stand-ins, fast kernels and device set-up; every use of mlx-lm's internals is in :mod:`.mlx_lm_internals`.
"""
