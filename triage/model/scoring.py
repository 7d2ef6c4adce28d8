"""Label scores from the language model: the log-likelihood of each label as the answer, many cases at once."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from scipy.special import softmax

from triage.model.lm import ChatFormat, batch_label_log_probs, shared_prefix
from triage.schema import LABELS


def on_streams(tasks: list[Callable[[], mx.array]], streams: Sequence = ()) -> list[mx.array]:
    """The tasks' results, in order; each round of tasks (one per stream) is built on the streams, then evaluated.

    On a CPU every MLX stream is a thread, so a round of independent cases runs
    in parallel; without streams the tasks run one at a time on the default stream.
    """
    lanes = list(streams) or [mx.default_stream(mx.default_device())]
    results: list[mx.array] = []
    for start in range(0, len(tasks), len(lanes)):
        round_ = []
        for task, stream in zip(tasks[start : start + len(lanes)], lanes):
            with mx.stream(stream):
                round_.append(task())
        mx.eval(round_)
        results.extend(round_)
    return results


def label_log_likelihoods(
    model: nn.Module, fmt: ChatFormat, prompts: Sequence[str], batch_size: int, streams: Sequence = ()
) -> np.ndarray:
    """(n, 3) log-probabilities of the label options as the answer, not renormalised, dropout off.

    Cases go through in batches of similar prompt length, so little compute goes
    to padding, after the tokens all prompts share have run once.
    """
    model.eval()
    tokens = [fmt.prompt_tokens(prompt) for prompt in prompts]
    order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))
    chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    prefix = shared_prefix(model, tokens)

    def score(chunk: list[int]) -> mx.array:
        return batch_label_log_probs(model, fmt, [tokens[i] for i in chunk], prefix)

    scores = np.zeros((len(tokens), len(LABELS)))
    for chunk, chunk_scores in zip(chunks, on_streams([partial(score, chunk) for chunk in chunks], streams)):
        scores[chunk] = np.array(chunk_scores, dtype=np.float64)
    return scores


def label_probabilities(
    model: nn.Module, fmt: ChatFormat, prompts: Sequence[str], batch_size: int, streams: Sequence = ()
) -> np.ndarray:
    """(n, 3) probabilities of the label options, normalised over the three, dropout off."""
    return softmax(label_log_likelihoods(model, fmt, prompts, batch_size, streams), axis=1)
