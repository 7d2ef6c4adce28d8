"""The shared prompt prefix below the lowest adapter, computed once per run instead of once per step.

LoRA trains only the top ``num_layers`` blocks, and nothing below the lowest
adapted block draws dropout. So what those frozen blocks make of the prefix
every case shares (the keys and values each writes into its cache, and the
hidden state it hands up) is the same at every step of a run. It is recorded
once; each step replays it and runs the prefix through the adapted blocks
only. Same numbers as the full pass, gradients included (tests/test_shared_prefix.py).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

from triage.model.blocks import StandIn, standing_in
from triage.model.mlx_lm_internals import blocks, cache_writes, hidden_states


def frozen_blocks(model: nn.Module) -> int:
    """How many blocks, from the bottom, have no trainable parameter (all of them when none trains)."""
    for index, block in enumerate(blocks(model)):
        if tree_flatten(block.trainable_parameters()):
            return index
    return len(blocks(model))


class _Recorder(StandIn):
    """Stands in for a block during the one recorded pass: runs it and keeps what it cached and returned."""

    def __init__(self, block: nn.Module):
        super().__init__(block)
        self.write: tuple[mx.array, mx.array] | None = None
        self.output: mx.array | None = None

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        with cache_writes(cache) as writes:
            self.output = self.block(x, mask, cache)
        self.write = writes[-1]
        return self.output


class _Replay(StandIn):
    """Stands in for a frozen block: writes its recorded keys and values into the cache, returns its output."""

    def __init__(self, recorder: _Recorder):
        super().__init__(recorder.block)
        self.write, self.output = recorder.write, recorder.output

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        cache.update_and_fetch(*self.write)  # a sliding-window cache keeps what the full pass would keep
        return self.output


@dataclass(frozen=True)
class FrozenPrefix:
    """The shared prompt tokens and what the frozen blocks made of them, recorded once."""

    tokens: tuple[int, ...]
    replays: tuple[_Replay, ...]

    def replayed(self, model: nn.Module) -> AbstractContextManager[None]:
        """Inside, a pass over :attr:`tokens` runs only the blocks above the frozen ones."""
        return standing_in(model, self.replays)


def record_frozen_prefix(model: nn.Module, tokens: list[int]) -> FrozenPrefix | None:
    """Run ``tokens`` (the prefix) through the model once, keeping what its frozen blocks did; None: nothing to keep."""
    frozen = frozen_blocks(model)
    if not tokens or not frozen:
        return None
    recorders = [_Recorder(block) for block in blocks(model)[:frozen]]
    with standing_in(model, recorders):
        hidden_states(model, mx.array([tokens], mx.int32), make_prompt_cache(model))
    mx.eval([(*r.write, r.output) for r in recorders])
    return FrozenPrefix(tuple(tokens), tuple(_Replay(r) for r in recorders))
