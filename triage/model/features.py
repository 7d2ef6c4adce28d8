"""What a frozen base model already knows about a message, as features for the linear-probe floor.

A case's features are the mean of the model's final normalised hidden states
over its prompt tokens after the instruction every case shares: the patient's
message and the turn's closing tokens. The shared part runs once.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from triage.model.lm import ChatFormat, hidden_after_prefix, shared_prefix
from triage.model.scoring import on_streams


def prompt_features(
    model: nn.Module, fmt: ChatFormat, prompts: Sequence[str], batch_size: int, streams: Sequence = ()
) -> np.ndarray:
    """(n, hidden size) mean hidden state of each prompt's own tokens, dropout off."""
    model.eval()
    tokens = [fmt.prompt_tokens(prompt) for prompt in prompts]
    order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))
    chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    prefix = shared_prefix(model, tokens)
    own = [row[len(prefix.tokens) :] for row in tokens]

    def mean_hidden(chunk: list[int]) -> mx.array:
        width = max(len(own[i]) for i in chunk)
        rows = mx.array([own[i] + [0] * (width - len(own[i])) for i in chunk], mx.int32)
        mask = mx.array([[1.0] * len(own[i]) + [0.0] * (width - len(own[i])) for i in chunk])[..., None]
        hidden = hidden_after_prefix(model, rows, prefix.cache).astype(mx.float32)
        return (hidden * mask).sum(axis=1) / mask.sum(axis=1)

    features: np.ndarray | None = None
    for chunk, values in zip(chunks, on_streams([partial(mean_hidden, chunk) for chunk in chunks], streams)):
        values = np.array(values, dtype=np.float64)
        if features is None:
            features = np.zeros((len(tokens), values.shape[1]))
        features[chunk] = values
    return features if features is not None else np.zeros((0, 0))
