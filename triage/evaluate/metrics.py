"""Triage metrics: classification scores, ED safety gates, threshold-free ED
discrimination, calibration and MC-dropout vote statistics. Their intervals and
paired tests are in :mod:`triage.evaluate.intervals`, the decision rules that
turn probabilities into labels in :mod:`triage.evaluate.decisions`.

The conventions of :mod:`triage.scores`, where the label encoding, the
probability checks, accuracy and ED discrimination live, hold here too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from triage.schema import LABELS
from triage.scores import ED, N_CLASSES, UNCLASSIFIED, ProbMatrix, check_probs, encode_labels, encode_pair, ratio

# Re-exported: evaluation reads every metric from this module.
from triage.scores import classification_metrics as classification_metrics
from triage.scores import ed_discrimination as ed_discrimination

HEADLINE = (
    "accuracy",
    "macro_f1",
    "ed_recall",
    "ed_f2",
    "ed_fnr",
    "ed_fn",
    "safe",
    "under_triage_rate",
    "over_triage_rate",
    "unsafe_rate",
)
"""What every decision rule reports for a set of cases."""
DISCRIMINATION = ("ed_auroc", "ed_ap", "ed_recall_at_budget")
"""Threshold-free: how well p(ED) ranks the ED cases above the rest."""
RUN_HEADLINE = (*HEADLINE, "test_loss", "ed_auroc", "ed_ap")
"""The top-level numbers of a run's eval.json that reports and summaries carry."""


def _gate(value: float | None, threshold: float, at_least: bool) -> dict:
    gate: dict = {"value": value, "threshold": threshold, "direction": ">=" if at_least else "<="}
    if value is None:
        return gate | {
            "state": "n/a",
            "passed": False,
            "margin": None,
            "reason": "metric undefined (no ED cases in the labels)",
        }
    margin = value - threshold if at_least else threshold - value
    return gate | {"state": "pass" if margin >= 0 else "fail", "passed": margin >= 0, "margin": margin, "reason": None}


def safety_gates(
    metrics: Mapping, ed_recall_min: float = 0.95, ed_f2_min: float = 0.90, ed_fnr_max: float = 0.05
) -> dict:
    """Check the three hard ED gates on a ``classification_metrics`` result.

    Returns ``{"safe": bool, "gates": {name: gate}}`` for names ``ed_recall``,
    ``ed_f2``, ``ed_fnr``. Each gate holds ``value``, ``threshold``,
    ``direction`` (``">="`` or ``"<="``), ``state`` (``"pass"``, ``"fail"`` or
    ``"n/a"``), ``passed`` (bool), ``margin`` and ``reason``. The margin is
    signed: how far the value is on the passing side of the threshold, so a
    negative margin is the shortfall. A gate whose metric is ``None`` is
    ``"n/a"`` with a reason, is not passed, and makes ``safe`` False.
    """
    gates = {
        "ed_recall": _gate(metrics["ed_recall"], ed_recall_min, at_least=True),
        "ed_f2": _gate(metrics["ed_f2"], ed_f2_min, at_least=True),
        "ed_fnr": _gate(metrics["ed_fnr"], ed_fnr_max, at_least=False),
    }
    return {"safe": all(gate["passed"] for gate in gates.values()), "gates": gates}


def gate_holds_at_bound(interval: Mapping, threshold: float, at_least: bool) -> bool | None:
    """Whether a gate still holds at the interval's pessimistic end (``None`` when it is undefined).

    A ``>=`` gate needs ``low >= threshold``, a ``<=`` gate ``high <= threshold``.
    """
    bound = interval["low"] if at_least else interval["high"]
    if bound is None:
        return None
    return bool(bound >= threshold) if at_least else bool(bound <= threshold)


def triage_rates(labels: Sequence[str], preds: Sequence[str | None]) -> dict:
    """The triage literature's error rates, each a share of all cases.

    ``under_triage_rate``: decision less urgent than the truth (ED->GP/HOME,
    GP->HOME); ``over_triage_rate``: more urgent; ``unsafe_rate``: ED sent
    HOME. Unclassified predictions are neither (they stay in the denominator).
    """
    y, p = encode_pair(labels, preds)
    classified = p != UNCLASSIFIED
    return {
        "under_triage_rate": float(np.mean(classified & (p > y))),
        "over_triage_rate": float(np.mean(p < y)),
        "unsafe_rate": float(np.mean((y == ED) & (p == LABELS.index("HOME")))),
    }


def check_probs_labels(probs: ProbMatrix, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    arr = check_probs(probs)
    y = encode_labels(labels)
    if y.size != arr.shape[0]:
        raise ValueError(f"{arr.shape[0]} probability rows but {y.size} labels")
    return arr, y


def expected_calibration_error(probs: ProbMatrix, labels: Sequence[str], n_bins: int = 10) -> float:
    """Top-label ECE: sum over bins of (bin share of cases) * |accuracy - mean confidence|.

    Confidence is the largest probability in a row and the prediction its
    argmax (ties toward the more urgent label). Bins are equal-width and
    left-closed, ``[k/n_bins, (k+1)/n_bins)``, with 1.0 put in the last bin.
    """
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    arr, y = check_probs_labels(probs, labels)
    confidence = arr.max(axis=1)
    correct = (arr.argmax(axis=1) == y).astype(np.float64)
    bins = np.minimum((confidence * n_bins).astype(np.int64), n_bins - 1)
    size = np.bincount(bins, minlength=n_bins)
    gap = np.abs(np.bincount(bins, correct, n_bins) - np.bincount(bins, confidence, n_bins))
    # Summing |sum(correct) - sum(conf)| per bin equals size * |acc - conf|, so
    # empty bins contribute 0 without a division.
    return float(gap.sum() / size.sum())


def brier_score(probs: ProbMatrix, labels: Sequence[str]) -> float:
    """Multi-class Brier score: mean over cases of sum_k (p_k - onehot_k)^2, in [0, 2]."""
    arr, y = check_probs_labels(probs, labels)
    onehot = np.eye(N_CLASSES)[y]
    return float(np.mean(np.sum((arr - onehot) ** 2, axis=1)))


def vote_summary(votes: np.ndarray | Sequence[Sequence[int]]) -> dict:
    """Summarise MC-dropout votes, an int array (n_cases, n_samples) of label indices.

    Returns lists, one entry per case: ``majority`` (label; ties toward the
    more urgent), ``confidence`` (majority share of the votes), ``uncertainty``
    (entropy of the vote distribution in nats, i.e. natural log: 0 when
    unanimous, ln 3 for an even three-way split) and ``counts`` (votes per
    label in ``LABELS`` order).
    """
    arr = np.asarray(votes)
    if arr.ndim != 2 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"votes must be a non-empty 2-D integer array, got {arr.dtype} {arr.shape}")
    if arr.min() < 0 or arr.max() >= N_CLASSES:
        raise ValueError(f"vote indices must lie in [0, {N_CLASSES - 1}]")
    counts = (arr[:, :, None] == np.arange(N_CLASSES)).sum(axis=1)
    share = counts / arr.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = 0.0 - np.sum(np.where(share > 0, share * np.log(share), 0.0), axis=1)  # 0.0 - x: no -0.0
    return {
        "majority": [LABELS[k] for k in counts.argmax(axis=1)],
        "confidence": share.max(axis=1).tolist(),
        "uncertainty": entropy.tolist(),
        "counts": counts.tolist(),
    }


def flag_uncertain(uncertainty: Sequence[float], threshold: float = 0.3) -> dict:
    """Flag cases whose uncertainty is strictly above ``threshold``.

    Returns ``{flags: list[bool], n_flagged, rate, threshold}``.
    """
    values = np.asarray(uncertainty, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no cases to flag")
    flags = values > threshold
    return {"flags": flags.tolist(), "n_flagged": int(flags.sum()), "rate": float(flags.mean()), "threshold": threshold}


def subgroup_rates(labels: Sequence[str], preds: Sequence[str | None], groups: Sequence[str | None]) -> dict[str, dict]:
    """Accuracy, ED recall and over-triage rate per subgroup, groups in sorted order.

    Per group: ``n``, ``n_ed``, ``n_non_ed``, ``accuracy`` (unclassified counts as wrong), ``ed_recall`` (unclassified
    counts as a miss; ``None`` without ED cases) and ``over_triage_rate``: the
    share of non-ED cases predicted as a more urgent class than their label
    (unclassified ones stay in the denominator but are not over-triage;
    ``None`` without non-ED cases). Cases whose group is ``None`` are skipped.
    """
    y, p = encode_pair(labels, preds)
    if len(groups) != y.size:
        raise ValueError(f"{y.size} labels but {len(groups)} groups")
    group_arr = np.array(groups, dtype=object)
    # UNCLASSIFIED is the largest code, so "p < y" can never count it as over-triage.
    over = p < y
    out: dict[str, dict] = {}
    for name in sorted({g for g in groups if g is not None}):
        member = group_arr == name
        is_ed = member & (y == ED)
        non_ed = member & (y != ED)
        out[name] = {
            "n": int(member.sum()),
            "n_ed": int(is_ed.sum()),
            "n_non_ed": int(non_ed.sum()),
            "accuracy": float(np.mean(p[member] == y[member])),
            "ed_recall": ratio(np.sum(is_ed & (p == ED)), is_ed.sum()),
            "over_triage_rate": ratio(np.sum(non_ed & over), non_ed.sum()),
        }
    return out
