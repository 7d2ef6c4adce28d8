"""Training objectives on the completion tokens, for mlx-lm's ``train(loss=...)``.

The batches and the completion's cross-entropy (:func:`plain_loss` among it) are
in :mod:`triage.model.completion`, which evaluation's test loss shares.

Standard configs minimise the masked cross-entropy, averaged over completion tokens:

    L_plain = sum_i CE_i / N,   CE_i = sum of token cross-entropies of completion i,
                                N = completion tokens in the batch.

``train.label_weight`` = v counts each label token's cross-entropy v times in
CE_i (still divided by N, the tokens actually there): v = 1 is the study's
objective; a larger v trains the decision harder than the ~15 tokens of reason
text that follow it.

Safety configs add class weights w and the cost matrix C (rows: true label):

    L_safety = ( sum_i w[y_i] * CE_i  +  sum_i sum_j C[y_i, j] * -log(1 - p_ij) ) / N

where p_i is the model's distribution over the three label options at the first
completion token (softmax over the logits of each label's first token). The
second term is a surrogate of the expected cost sum_j C[y_i, j] * p_ij that does not
saturate: when the model is confidently wrong (p_ij -> 1) its gradient with
respect to the label logits is C[y_i, j] times that of the cross-entropy, so an
ED case answered HOME pushes ~100x harder, while a confidently correct case adds
almost nothing beyond its class weight.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from triage.config import LoraConfig
from triage.model.completion import Prefix, completion_logits, plain_loss, token_cross_entropy
from triage.model.frozen import FrozenPrefix
from triage.model.lm import prefix_cache
from triage.model.quantized import tied_head_dequantized_once
from triage.schema import LABELS

Loss = Callable[..., tuple[mx.array, mx.array]]


def token_weights(mask: mx.array, label_mask: mx.array, label_weight: float) -> mx.array:
    """``label_weight`` at the label's tokens, 1 at the reason text's, 0 off the completion."""
    return mask if label_weight == 1.0 else mask + (label_weight - 1.0) * label_mask


def make_completion_loss(label_weight: float) -> Loss:
    """A standard config's objective: :func:`plain_loss` with each label token counted ``label_weight`` times."""
    if label_weight == 1.0:
        return plain_loss

    def loss(
        model: nn.Module, tokens, labels, positions, mask, label_mask, prefix: Prefix = None
    ) -> tuple[mx.array, mx.array]:
        logits = completion_logits(model, tokens, positions, prefix)
        ntoks = mask.sum()
        weights = token_weights(mask, label_mask, label_weight)
        return token_cross_entropy(logits, tokens, positions, weights).sum() / ntoks, ntoks

    return loss


def split_cross_entropy(
    model: nn.Module, tokens, labels, positions, mask, label_mask, prefix: Prefix = None
) -> mx.array:
    """[summed CE of the label tokens, their count, summed CE of the reason text, its count], for curves."""
    logits = completion_logits(model, tokens, positions, prefix)
    reason_mask = mask - label_mask
    return mx.stack(
        [
            token_cross_entropy(logits, tokens, positions, label_mask).sum(),
            label_mask.sum(),
            token_cross_entropy(logits, tokens, positions, reason_mask).sum(),
            reason_mask.sum(),
        ]
    )


def sharded(loss: Loss, streams: list, frozen: FrozenPrefix | None = None) -> Loss:
    """``loss`` of the whole batch, computed as row shards, each on its own MLX stream.

    The shared prefix runs once, before the shards, and every shard's rows
    continue its cache; with ``frozen`` (recorded from the batches' prefix) it
    runs through the adapted blocks only. Every loss here is (sum over the
    batch) / (completion tokens), so the token-weighted mean of the shards'
    values is the whole batch's loss, up to the order of summation. Gradients
    follow: MLX builds each shard's backward pass on the stream of its forward
    ops. A 4/8-bit tied output head is dequantized once for all shards
    (``triage.model.quantized.tied_head_dequantized_once``).
    """

    def sharded_loss(model: nn.Module, *batch) -> tuple[mx.array, mx.array]:
        *rows_of, prefix = batch
        with tied_head_dequantized_once(model):
            cache = prefix_cache(model, prefix, frozen)
            if len(streams) < 2:
                return loss(model, *rows_of, cache)
            rows = rows_of[0].shape[0]
            bounds = [round(rows * k / len(streams)) for k in range(len(streams) + 1)]
            total = count = mx.array(0.0)
            for stream, start, stop in zip(streams, bounds, bounds[1:]):
                if start < stop:
                    with mx.stream(stream):
                        value, ntoks = loss(model, *(part[start:stop] for part in rows_of), cache)
                    total, count = total + value * ntoks, count + ntoks
            return total / count, count

    return sharded_loss


def complement_log_probs(option_logits: mx.array) -> mx.array:
    """log(1 - p_j) for each option j, computed stably as log sum_{m != j} p_m."""
    n = option_logits.shape[-1]
    others = option_logits[:, None, :] + mx.where(mx.eye(n, dtype=mx.bool_), -mx.inf, 0.0)
    return mx.logsumexp(others, axis=-1) - mx.logsumexp(option_logits, axis=-1, keepdims=True)


def safety_objective(
    logits: mx.array,
    tokens,
    labels,
    positions,
    token_weight,
    label_first_tokens: mx.array,
    class_weights: mx.array,
    cost: mx.array,
) -> mx.array:
    """Sum over the batch of w[y] * CE + sum_j C[y, j] * -log(1 - p_j) (see module doc)."""
    ce = token_cross_entropy(logits, tokens, positions, token_weight)
    option_logits = logits[:, 0, :][:, label_first_tokens]
    cost_term = -(cost[labels] * complement_log_probs(option_logits)).sum(axis=1)
    return (class_weights[labels] * ce + cost_term).sum()


def make_safety_loss(
    label_first_tokens: list[int],
    class_weights: dict[str, float],
    cost_matrix: dict[str, dict[str, float]],
    label_weight: float = 1.0,
) -> Loss:
    """The cost-sensitive loss of a safety config, in mlx-lm's ``loss(model, *batch)`` form.

    ``label_weight`` weighs the label tokens inside CE_i as in :func:`make_completion_loss`.
    """
    first = mx.array(label_first_tokens)
    weights = mx.array([class_weights[label] for label in LABELS])
    cost = mx.array([[cost_matrix[true][pred] for pred in LABELS] for true in LABELS])

    def loss(
        model: nn.Module, tokens, labels, positions, mask, label_mask, prefix: Prefix = None
    ) -> tuple[mx.array, mx.array]:
        logits = completion_logits(model, tokens, positions, prefix)
        ntoks = mask.sum()
        token_weight = token_weights(mask, label_mask, label_weight)
        total = safety_objective(logits, tokens, labels, positions, token_weight, first, weights, cost)
        return total / ntoks, ntoks

    return loss


def objective(config: LoraConfig, label_first_tokens: list[int], label_weight: float) -> Loss:
    """A config's training loss: the cost-sensitive one for a safety config, else the completion's cross-entropy."""
    if config.kind == "safety":
        return make_safety_loss(label_first_tokens, config.class_weights, config.cost_matrix, label_weight)
    return make_completion_loss(label_weight)
