"""MLX's evaluation order, widened so that CPU streams run side by side."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

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
    """Set ``MLX_BFS_MAX_WIDTH`` to :data:`WIDE_SCHEDULE` for MLX's Linux CPU build unless the user did; say what holds.

    MLX reads the variable once, at the first evaluation in the process, so
    this runs in :func:`triage.runtime.setup`, before mlx is imported. Other
    builds (Metal, CUDA) keep MLX's own default: there one stream runs on the
    GPU and the order was not measured.
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
