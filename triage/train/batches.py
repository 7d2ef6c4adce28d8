"""Batches for mlx-lm's ``train(iterate_batches=...)`` that carry labels and loss positions."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import mlx.core as mx
import numpy as np

from triage.model.lm import TokenizedCase, common_prefix

# mlx-lm compiles its training step once per batch shape (~2 s each on 2 cores). Measured on the real
# workload (q4 SmolLM2-135M, shared prefix): rows padded to a multiple of 1 / 8 / 32 tokens give 370 / 385 /
# 436 token positions, 3.11 / 3.24 / 3.60 s per compiled step and 106 / 27 / 10 shapes per epoch, so 8 is
# as fast as exact padding over an 800-step run and much faster over a short one.
PAD_MULTIPLE = 8
POSITION_MULTIPLE = 8


def batch_order(n_cases: int, lengths: Sequence[int], batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless stream of batches (case indices): length-sorted buckets in a seeded shuffled order.

    Each pass over the buckets (an epoch) holds every case once: when the batch
    size does not divide the split, the longest cases form one smaller bucket.
    Cases of similar length share a batch, so little of it is padding.
    Deterministic for a seed, so a resumed run can skip exactly the batches it
    already trained on.
    """
    if n_cases < batch_size:
        raise ValueError(f"the split has {n_cases} cases, fewer than the batch size {batch_size}")
    by_length = sorted(range(n_cases), key=lambda i: lengths[i])
    buckets = [by_length[i : i + batch_size] for i in range(0, n_cases, batch_size)]
    rng = np.random.default_rng(seed)
    while True:
        for b in rng.permutation(len(buckets)):
            yield buckets[b]


def batches_per_epoch(n_cases: int, batch_size: int) -> int:
    """The batches :func:`batch_order` makes of a split: every case once, the last batch maybe smaller."""
    return -(-n_cases // batch_size)


def validation_indices(cases: Sequence[TokenizedCase], batch_size: int, val_batches: int, seed: int) -> list[int]:
    """The cases that the first ``val_batches`` validation batches hold (-1: all), as mlx-lm's evaluate sees them."""
    n_batches = batches_per_epoch(len(cases), batch_size)
    wanted = n_batches if val_batches < 0 else min(val_batches, n_batches)
    order = batch_order(len(cases), [len(case.tokens) for case in cases], batch_size, seed)
    return [index for _, batch in zip(range(wanted), order) for index in batch]


def prefix_length(cases: Sequence[TokenizedCase], mask_prompt: bool) -> int:
    """How many leading tokens every case's prompt shares, to be computed once per batch (0: none).

    Only the completion is trained on with ``mask_prompt``, so the shared part
    of the prompt needs no logits, only its keys and values; without it every
    prompt position is trained on and nothing is shared.
    """
    if not mask_prompt or not cases:
        return 0
    return len(common_prefix([case.tokens[: case.prompt_length] for case in cases]))


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
        first_label = case.prompt_length - shared - start  # index of the label's first token among the trained positions
        label_mask[i, first_label : first_label + case.label_length] = 1.0
    labels = np.array([c.label for c in cases], np.int32)
    prefix = np.array([cases[0].tokens[:shared]], np.int32).reshape(1, shared)
    return (mx.array(tokens), mx.array(labels), mx.array(positions), mx.array(mask), mx.array(label_mask),
            mx.array(prefix))


def make_iterate_batches(mask_prompt: bool, seed: int, skip: int = 0, share_prefix: bool = True):
    """An ``iterate_batches`` for mlx-lm's trainer and evaluator.

    The order depends only on ``seed`` (mlx-lm passes none); ``skip`` drops the
    training batches a resumed run has already seen. With ``share_prefix`` the
    prompt tokens that every case of the dataset starts with travel once per
    batch (see :func:`collate`).
    """

    def iterate_batches(dataset, batch_size, max_seq_length, loop=False, **_):
        shared = prefix_length(dataset, mask_prompt) if share_prefix else 0
        lengths = [len(case.tokens) for case in dataset]
        order = batch_order(len(dataset), lengths, batch_size, seed)
        n_batches = batches_per_epoch(len(dataset), batch_size)
        for step, indices in enumerate(order):
            if not loop and step >= n_batches:
                return
            if step >= skip or not loop:
                yield collate([dataset[i] for i in indices], mask_prompt, shared)

    return iterate_batches
