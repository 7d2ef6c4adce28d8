"""Stand-ins for a model's transformer blocks, and the one place that swaps them in.

Two things run some blocks differently from the model's own pass: training
replays what the frozen lower blocks made of the shared prompt prefix
(:mod:`triage.model.frozen`), and MC dropout runs the blocks below the first
dropout layer once for all its samples (:func:`shared_lower_blocks`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from triage.model.mlx_lm_internals import blocks


class StandIn:
    """Takes a block's place: called as the block is, ``(x, mask, cache)``; any other attribute is the block's.

    mlx-lm's model loops read flags off each block (llama picks the attention
    mask by ``use_sliding``), so a stand-in answers for the block it replaces.
    """

    def __init__(self, block: nn.Module):
        self.block = block

    def __getattr__(self, key: str) -> Any:
        if key == "block":  # not yet set: no block to ask
            raise AttributeError(key)
        return getattr(self.block, key)


@contextmanager
def standing_in(model: nn.Module, stand_ins: Sequence[StandIn], first: int = 0) -> Iterator[None]:
    """Inside, ``stand_ins`` take the places of the blocks from index ``first`` up; the model's own come back after."""
    layers = blocks(model)
    end = first + len(stand_ins)
    own = layers[first:end]
    layers[first:end] = stand_ins
    try:
        yield
    finally:
        layers[first:end] = own


class FanOut(StandIn):
    """Runs its block on ``copies`` repeats of each row of its input, a row's repeats side by side."""

    def __init__(self, block: nn.Module, copies: int):
        super().__init__(block)
        self.copies = copies

    def __call__(self, x: mx.array, *args, **kwargs) -> mx.array:
        return self.block(mx.repeat(x, self.copies, axis=0), *args, **kwargs)


def first_random_block(model: nn.Module) -> int:
    """Index of the lowest transformer block holding a dropout layer (0 when there is none)."""
    for index, block in enumerate(blocks(model)):
        if any(isinstance(module, nn.Dropout) for _, module in block.named_modules()):
            return index
    return 0


@contextmanager
def shared_lower_blocks(model: nn.Module, copies: int) -> Iterator[None]:
    """Compute the blocks below the first dropout layer once instead of once per sample.

    Dropout lives only in the LoRA layers of the top blocks, so every sample
    sees the same activations below them. Inside the context the first random
    block repeats each row of its input ``copies`` times, so every input row
    comes out as ``copies`` rows. The dropout masks are drawn with the same
    shapes in the same order as for a batch of ``copies`` repeats, so a seeded
    run gives the same samples.
    """
    first = first_random_block(model)
    with standing_in(model, [FanOut(blocks(model)[first], copies)], first):
        yield
