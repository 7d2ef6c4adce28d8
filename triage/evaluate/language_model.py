"""Evaluate a language model, with or without its adapter.

Label scores from the model, then the shared evaluation, then MC-dropout
votes on the test split.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import mlx.nn as nn
import numpy as np
from scipy.special import logsumexp, softmax

from triage.config import EvaluateParams
from triage.evaluate.decisions import decision_rules
from triage.evaluate.evaluation import Evaluation, ScoredSet, evaluate_sets
from triage.evaluate.mc_dropout import mc_dropout, mc_not_applicable
from triage.model.completion import completion_loss
from triage.model.lm import ChatFormat, tokenize_split
from triage.model.scoring import label_log_likelihoods
from triage.schema import Example


def score_set(
    model: nn.Module,
    fmt: ChatFormat,
    examples: list[Example],
    source: str,
    max_len: int,
    batch_size: int,
    streams: Sequence = (),
) -> ScoredSet:
    """Label probabilities and completion loss of ``examples``; an over-long case is an error naming ``source``."""
    cases = tokenize_split(fmt, examples, source, max_len)
    log_likelihoods = label_log_likelihoods(model, fmt, [example.prompt for example in examples], batch_size, streams)
    return ScoredSet(
        examples,
        softmax(log_likelihoods, axis=1),
        completion_loss(model, cases, batch_size, streams),
        np.exp(logsumexp(log_likelihoods, axis=1)),
    )


def evaluate_model(
    model: nn.Module,
    fmt: ChatFormat,
    data_dir: Path,
    params: EvaluateParams,
    max_len: int,
    target: tuple[float, str],
    dropout: float | None,
    streams: Sequence = (),
) -> Evaluation:
    """:func:`evaluate_sets` for a language model, plus MC-dropout votes on the test split.

    ``target`` is the ED recall the threshold aims for and where it comes from
    (see ``ed_recall_target``); ``dropout`` is the adapter's (``adapter_dropout``);
    ``streams`` (``triage.model.device.cpu_streams``) score independent cases in parallel.
    """

    def score(examples: list[Example], source: str) -> ScoredSet:
        return score_set(model, fmt, examples, source, max_len, params.batch_size, streams)

    metrics, predictions, test, threshold = evaluate_sets(score, data_dir, params, target)
    reason = mc_not_applicable(dropout)
    review: list[dict] = []
    if reason is None:
        rule = decision_rules(params, threshold)[params.decision]
        mc = mc_dropout(model, fmt, test.examples, [row["pred"] for row in predictions], rule, params, dropout, streams)
        metrics["mc_dropout"] = mc.metrics
        for row, case in zip(predictions, mc.cases):
            row |= {"mc_vote": case["vote"], "mc_confidence": case["confidence"], "mc_uncertainty": case["uncertainty"]}
        review = [{k: v for k, v in case.items() if k != "flagged"} for case in mc.cases if case["flagged"]]
    else:
        metrics["mc_dropout"] = {"applicable": False, "reason": reason}
    return Evaluation(metrics, predictions, review)
