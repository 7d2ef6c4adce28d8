"""The completion's cross-entropy: the objective training minimises and the test loss evaluation reports.

A batch is ``(tokens, labels, positions, mask, label_mask, prefix)`` from
:func:`collate`: ``positions[i, k]`` is the hidden-state index that predicts
completion token k of example i, so the vocabulary projection runs only there,
never on the prompt; ``label_mask`` marks the completion tokens that spell the
label. ``prefix`` holds the prompt tokens every row starts with, cut off the
rows: it runs once, as one row, and every row attends to its keys and values.
With dropout 0 that is the plain batch's loss and gradient; with dropout the
prefix's activations share one dropout mask across the rows of a step.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from triage.model.lm import TokenizedCase, hidden_after_prefix, prefix_cache
from triage.model.mlx_lm_internals import project
from triage.model.scoring import on_streams

# mlx-lm compiles its training step once per batch shape (~2 s each on 2 cores). Measured on the real
# workload (q4 SmolLM2-135M, shared prefix): rows padded to a multiple of 1 / 8 / 32 tokens give 370 / 385 /
# 436 token positions, 3.11 / 3.24 / 3.60 s per compiled step and 106 / 27 / 10 shapes per epoch, so 8 is
# as fast as exact padding over an 800-step run and much faster over a short one.
PAD_MULTIPLE = 8
POSITION_MULTIPLE = 8

Prefix = mx.array | list | None  # the shared prompt tokens (1, P), or the model cache after them


def collate(cases: Sequence[TokenizedCase], mask_prompt: bool, shared: int = 0) -> tuple[mx.array, ...]:
    """Pad token ids and list, per case, the positions whose next token is trained on.

    Returns ``(tokens, labels, positions, mask, label_mask, prefix)``: ``mask``
    is 1 at every trained position, ``label_mask`` 1 at those that predict a
    token of the label (the start of the completion), so an objective can weigh
    the decision apart from the reason text. The first ``shared`` tokens, which
    every case starts with, are cut off the rows and returned once as
    ``prefix`` (shape (1, shared)); positions count from the end of the prefix.
    """
    if shared and not mask_prompt:
        raise ValueError("a shared prefix needs mask_prompt: without it the prompt's own tokens are trained on")
    rows = [c.tokens[shared:] for c in cases]
    if any(c.tokens[:shared] != cases[0].tokens[:shared] or c.prompt_length <= shared for c in cases):
        raise ValueError(f"every case must start with the same {shared} prompt tokens and go on after them")
    longest = max(map(len, rows))
    width = PAD_MULTIPLE * -(-longest // PAD_MULTIPLE) + 1
    tokens = np.zeros((len(cases), width), np.int32)
    starts = [c.prompt_length - shared if mask_prompt else 1 for c in cases]
    counts = [len(row) - start for row, start in zip(rows, starts)]
    k = POSITION_MULTIPLE * -(-max(counts) // POSITION_MULTIPLE)
    positions = np.zeros((len(cases), k), np.int32)
    mask = np.zeros((len(cases), k), np.float32)
    label_mask = np.zeros((len(cases), k), np.float32)
    for i, (case, row, start, count) in enumerate(zip(cases, rows, starts, counts)):
        tokens[i, : len(row)] = row
        positions[i, :count] = np.arange(start - 1, start - 1 + count)
        mask[i, :count] = 1.0
        # The index of the label's first token among the trained positions.
        first_label = case.prompt_length - shared - start
        label_mask[i, first_label : first_label + case.label_length] = 1.0
    labels = np.array([c.label for c in cases], np.int32)
    prefix = np.array([cases[0].tokens[:shared]], np.int32).reshape(1, shared)
    return (
        mx.array(tokens),
        mx.array(labels),
        mx.array(positions),
        mx.array(mask),
        mx.array(label_mask),
        mx.array(prefix),
    )


def completion_logits(model: nn.Module, tokens: mx.array, positions: mx.array, prefix: Prefix = None) -> mx.array:
    """Logits at the gathered positions only: shape (batch, K, vocab); the rows continue ``prefix``."""
    cache = prefix_cache(model, prefix) if isinstance(prefix, mx.array) else prefix
    hidden = hidden_after_prefix(model, tokens[:, :-1], cache)
    picked = mx.take_along_axis(hidden, positions[..., None], axis=1)
    return project(model, picked).astype(mx.float32)


def token_cross_entropy(logits: mx.array, tokens: mx.array, positions: mx.array, weights: mx.array) -> mx.array:
    """Weighted sum of each example's completion token cross-entropies: shape (batch,)."""
    targets = mx.take_along_axis(tokens, positions + 1, axis=1)
    return (nn.losses.cross_entropy(logits, targets) * weights).sum(axis=1)


def plain_loss(
    model: nn.Module, tokens, labels, positions, mask, label_mask, prefix: Prefix = None
) -> tuple[mx.array, mx.array]:
    """Masked cross-entropy on the completion, mean over its tokens (the study's objective and test loss)."""
    logits = completion_logits(model, tokens, positions, prefix)
    ntoks = mask.sum()
    return token_cross_entropy(logits, tokens, positions, mask).sum() / ntoks, ntoks


def completion_loss(model: nn.Module, cases: list[TokenizedCase], batch_size: int, streams: Sequence = ()) -> float:
    """Mean cross-entropy per completion token over every case (the study's test loss).

    Batches are cut from the length-sorted cases here rather than by the
    training batcher, which only forms full batches and would drop the
    remainder of a split whose size is not a multiple of ``batch_size``.
    """
    model.eval()
    ordered = sorted(cases, key=lambda case: len(case.tokens))

    def summed(batch: list[TokenizedCase]) -> mx.array:
        loss, ntoks = plain_loss(model, *collate(batch, mask_prompt=True))
        return mx.stack([loss * ntoks, ntoks.astype(loss.dtype)])

    batches = [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]
    total, tokens = np.sum(
        [
            np.array(pair, dtype=np.float64)
            for pair in on_streams([partial(summed, batch) for batch in batches], streams)
        ],
        axis=0,
    )
    return float(total / tokens)
