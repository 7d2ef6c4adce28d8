"""How label probabilities become one answer per case.

Argmax, expected cost, or a p(ED) threshold tuned on the validation split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from triage.config import EvaluateParams, Params
from triage.evaluate.metrics import check_probs_labels
from triage.schema import LABELS, Example
from triage.scores import ED, N_CLASSES, ProbMatrix, argmax_decision, check_probs


def cost_aware_decision(probs: ProbMatrix, cost: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Label minimising expected cost per row; ties go to the more urgent label.

    ``cost[true][pred]`` is the cost of predicting ``pred`` for a case whose
    true label is ``true``; every label must appear in both levels.
    """
    arr = check_probs(probs)
    try:
        matrix = np.array([[float(cost[t][q]) for q in LABELS] for t in LABELS])
    except KeyError as missing:
        raise ValueError(f"cost matrix lacks label {missing}") from None
    # np.argmin returns the first minimum, and LABELS runs most urgent first.
    return [LABELS[k] for k in (arr @ matrix).argmin(axis=1)]


def tune_ed_threshold(probs_valid: ProbMatrix, labels_valid: Sequence[str], target_recall: float) -> float:
    """Largest threshold t on p_ED such that ``p_ED >= t`` reaches ``target_recall``
    ED recall on the validation cases.

    The answer is always one of the true-ED cases' p_ED values. Raises
    ValueError when the validation split has no ED case or the target is not
    in (0, 1].
    """
    if not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    arr, y = check_probs_labels(probs_valid, labels_valid)
    scores = np.sort(arr[y == ED, ED])[::-1]
    if scores.size == 0:
        raise ValueError("no ED cases in the validation labels: cannot tune an ED threshold")
    # Compare k/m exactly as classification_metrics computes recall, so the
    # returned threshold passes the same check instead of a rounded one.
    reached = np.arange(1, scores.size + 1) / scores.size >= target_recall
    return float(scores[np.argmax(reached)])


def threshold_decision(probs: ProbMatrix, threshold: float) -> list[str]:
    """ED when p_ED >= threshold, otherwise the more probable of the other labels
    (ties toward the more urgent one)."""
    arr = check_probs(probs)
    rest = np.delete(arr, ED, axis=1).argmax(axis=1)
    others = [k for k in range(N_CLASSES) if k != ED]
    return [LABELS[ED] if p_ed >= threshold else LABELS[others[r]] for p_ed, r in zip(arr[:, ED], rest)]


@dataclass(frozen=True)
class EdThreshold:
    """The p(ED) threshold tuned on the validation split, frozen before any other set is scored."""

    value: float | None
    target_recall: float
    target_from: str
    n_valid: int
    reason: str | None = None

    def describe(self) -> dict:
        return {
            "threshold": self.value,
            "target_recall": self.target_recall,
            "target_from": self.target_from,
            "tuned_on": "valid",
            "n_valid": self.n_valid,
        }


def ed_recall_target(params: Params, config_name: str | None) -> tuple[float, str]:
    """The ED recall the threshold aims for: a safety config's own target, else the evaluate default."""
    if config_name is not None:
        target = params.config(config_name).target_ed_recall
        if target is not None:
            return target, f"configs.{config_name}.target_ed_recall"
    return params.evaluate.ed_threshold_target, "evaluate.ed_threshold_target"


def freeze_ed_threshold(valid: list[Example], probs: np.ndarray, target: float, target_from: str) -> EdThreshold:
    """Tune the threshold on the validation cases; without an ED case there it stays undefined."""
    labels = [example.label for example in valid]
    if "ED" not in labels:
        return EdThreshold(
            None, target, target_from, len(valid), "the validation split has no ED case to tune the threshold on"
        )
    return EdThreshold(tune_ed_threshold(probs, labels, target), target, target_from, len(valid))


Rule = Callable[[np.ndarray], list[str]]
"""A decision rule: (n, 3) label probabilities to one label per row."""


def decision_rules(params: EvaluateParams, threshold: EdThreshold) -> dict[str, Rule]:
    """Every applicable decision rule by name; ``ed_threshold`` only once a threshold is tuned."""
    rules: dict[str, Rule] = {
        "argmax": argmax_decision,
        "cost_aware": partial(cost_aware_decision, cost=params.cost_matrix),
    }
    if threshold.value is not None:
        rules["ed_threshold"] = partial(threshold_decision, threshold=threshold.value)
    return rules


def decide(probs: np.ndarray, params: EvaluateParams, threshold: EdThreshold) -> dict[str, list[str]]:
    """Every applicable decision rule's answers, so reports can show what each one changes."""
    return {name: rule(probs) for name, rule in decision_rules(params, threshold).items()}
