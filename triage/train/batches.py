"""Batches for mlx-lm's ``train(iterate_batches=...)`` that carry labels and loss positions."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from triage.model.completion import collate
from triage.model.lm import TokenizedCase, common_prefix


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


def shared_length(cases: Sequence[TokenizedCase], mask_prompt: bool, share_prefix: bool) -> int:
    """The prefix length the batches of ``cases`` carry once (:func:`collate`); 0 unless ``share_prefix``."""
    return prefix_length(cases, mask_prompt) if share_prefix else 0


def make_iterate_batches(mask_prompt: bool, seed: int, skip: int = 0, share_prefix: bool = True):
    """An ``iterate_batches`` for mlx-lm's trainer and evaluator.

    The order depends only on ``seed`` (mlx-lm passes none); ``skip`` drops the
    training batches a resumed run has already seen. With ``share_prefix`` the
    prompt tokens that every case of the dataset starts with travel once per
    batch (see :func:`collate`).
    """

    def iterate_batches(dataset, batch_size, max_seq_length, loop=False, **_):
        shared = shared_length(dataset, mask_prompt, share_prefix)
        lengths = [len(case.tokens) for case in dataset]
        order = batch_order(len(dataset), lengths, batch_size, seed)
        n_batches = batches_per_epoch(len(dataset), batch_size)
        for step, indices in enumerate(order):
            if not loop and step >= n_batches:
                return
            if step >= skip or not loop:
                yield collate([dataset[i] for i in indices], mask_prompt, shared)

    return iterate_batches
