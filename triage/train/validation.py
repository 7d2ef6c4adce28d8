"""What training measures on the validation split besides its objective: the task metrics of the label scores."""

from __future__ import annotations

import random
from collections.abc import Sequence

import mlx.nn as nn

from triage.model.lm import ChatFormat
from triage.model.scoring import label_probabilities
from triage.schema import Example
from triage.scores import ED, argmax_decision, classification_metrics, ed_discrimination


def task_metrics(
    model: nn.Module, fmt: ChatFormat, examples: list[Example], batch_size: int, streams: Sequence = ()
) -> dict[str, float | None]:
    """``val_accuracy`` (argmax) and ``val_ed_auroc`` of the label scores, for curves and checkpoint selection.

    The AUROC is None when the cases are all ED or all not.
    """
    probs = label_probabilities(model, fmt, [example.prompt for example in examples], batch_size, streams)
    labels = [example.label for example in examples]
    discrimination = ed_discrimination(labels, probs[:, ED], ())
    return {
        "val_accuracy": classification_metrics(labels, argmax_decision(probs))["accuracy"],
        "val_ed_auroc": discrimination["ed_auroc"],
    }


def train_sample(examples: Sequence[Example], seed: int, size: int) -> list[Example]:
    """A fixed sample of the training cases, the same at every validation and on resume."""
    picked = sorted(random.Random(seed).sample(range(len(examples)), min(size, len(examples))))
    return [examples[i] for i in picked]


def sample_accuracy(
    model: nn.Module, fmt: ChatFormat, examples: Sequence[Example], batch_size: int, streams: Sequence = ()
) -> float:
    """Argmax accuracy of the label scores on ``examples``."""
    probs = label_probabilities(model, fmt, [example.prompt for example in examples], batch_size, streams)
    return classification_metrics([example.label for example in examples], argmax_decision(probs))["accuracy"]
