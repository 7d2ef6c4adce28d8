"""What training measures on the validation split besides its objective: the task metrics of the label scores, and the study's completion loss."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from triage.evaluate import metrics as m
from triage.evaluate.decisions import argmax_decision
from triage.model.lm import ChatFormat, TokenizedCase
from triage.model.scoring import label_probabilities, on_streams
from triage.schema import Example
from triage.train.batches import collate
from triage.train.losses import plain_loss


def task_metrics(model: nn.Module, fmt: ChatFormat, examples: list[Example], batch_size: int,
                 streams: Sequence = ()) -> dict[str, float | None]:
    """``val_accuracy`` (argmax) and ``val_ed_auroc`` of the label scores, for curves and checkpoint selection.

    The AUROC is None when the cases are all ED or all not.
    """
    probs = label_probabilities(model, fmt, [example.prompt for example in examples], batch_size, streams)
    labels = [example.label for example in examples]
    discrimination = m.ed_discrimination(labels, probs[:, m.ED], ())
    return {"val_accuracy": m.classification_metrics(labels, argmax_decision(probs))["accuracy"],
            "val_ed_auroc": discrimination["ed_auroc"]}


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
    total, tokens = np.sum([np.array(pair, dtype=np.float64) for pair in on_streams(
        [partial(summed, batch) for batch in batches], streams)], axis=0)
    return float(total / tokens)
