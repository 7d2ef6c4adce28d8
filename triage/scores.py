"""How label scores are read, for training's validation curves and for evaluation alike: the label
encoding, the probability checks, the argmax answer, classification metrics and ED discrimination.

Conventions shared by every function here:

* Label order is ``LABELS`` (most to least urgent); probability columns,
  confusion rows/columns and vote indices all follow it.
* A prediction that is not one of ``LABELS`` (``None``, a parse failure, any
  other string) is *unclassified*: it is wrong for accuracy, counts as a missed
  case for the recall of its true class, and is never read as HOME.
* A ratio whose denominator is zero is ``None`` (JSON null), never 0. This is
  scikit-learn's behaviour with ``zero_division=np.nan``; in particular
  F-scores use the count form ``(1+b²)tp / ((1+b²)tp + b²fn + fp)``, which is
  defined (possibly 0) whenever the class occurs in the labels or predictions.
* Ties between classes are always broken toward the more urgent label.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from triage.schema import LABELS

ED = LABELS.index("ED")
N_CLASSES = len(LABELS)
UNCLASSIFIED = N_CLASSES
"""Code given to unclassified predictions by the encoders below."""

ProbMatrix = np.ndarray | Sequence[Sequence[float]]
"""(n_cases, 3) class probabilities, columns in ``LABELS`` order, rows summing to 1."""


def encode_labels(labels: Sequence[str]) -> np.ndarray:
    if len(labels) == 0:
        raise ValueError("no cases: metrics are undefined for empty input")
    unknown = sorted({str(label) for label in labels if label not in LABELS})
    if unknown:
        raise ValueError(f"true labels must be in {LABELS}, got {unknown}")
    return np.array([LABELS.index(label) for label in labels], dtype=np.int64)


def encode_pair(labels: Sequence[str], preds: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    if len(labels) != len(preds):
        raise ValueError(f"{len(labels)} labels but {len(preds)} predictions")
    y = encode_labels(labels)
    p = np.array([LABELS.index(pred) if pred in LABELS else UNCLASSIFIED for pred in preds], dtype=np.int64)
    return y, p


def ratio(num: float, den: float) -> float | None:
    """``num / den``, or None when ``den`` is 0 (never 0: see the conventions above)."""
    return float(num / den) if den else None


def _fbeta(tp: int, fp: int, fn: int, beta: float) -> float | None:
    b2 = beta * beta
    return ratio((1 + b2) * tp, (1 + b2) * tp + b2 * fn + fp)


def classification_metrics(labels: Sequence[str], preds: Sequence[str | None]) -> dict:
    """Accuracy, per-class and macro scores, confusion matrix and ED safety figures.

    Returns a JSON-serialisable dict with keys:

    * ``n``, ``accuracy`` (unclassified predictions count as wrong), ``n_unclassified``;
    * ``macro_f1``: mean F1 over the classes whose F1 is defined, i.e. a class
      absent from both labels and predictions is left out instead of scored 0;
    * ``per_class``: ``{label: {precision, recall, f1, f2, support}}``;
      precision is ``None`` when the class is never predicted, recall when it
      has no true cases;
    * ``labels``: the row/column order; ``confusion``: 3x3 counts, rows = true
      label, columns = predicted label; ``unclassified``: ``{label: count}`` of
      unclassified predictions per true label (the confusion's fourth column);
    * ``ed_recall``, ``ed_f2``, ``ed_fnr`` (``ed_fn / support``, so exactly
      ``1 - ed_recall`` without rounding error), ``ed_fn`` (true-ED cases not
      predicted ED, unclassified ones included), ``ed_support``.

    Raises ValueError on empty input, a length mismatch or an unknown true label.
    """
    y, p = encode_pair(labels, preds)
    full = np.bincount(y * (N_CLASSES + 1) + p, minlength=N_CLASSES * (N_CLASSES + 1))
    full = full.reshape(N_CLASSES, N_CLASSES + 1)
    confusion = full[:, :N_CLASSES]
    tp = np.diag(confusion)
    support = full.sum(axis=1)
    predicted = confusion.sum(axis=0)

    per_class: dict[str, dict] = {}
    for k, label in enumerate(LABELS):
        fp, fn = int(predicted[k] - tp[k]), int(support[k] - tp[k])
        per_class[label] = {
            "precision": ratio(tp[k], predicted[k]),
            "recall": ratio(tp[k], support[k]),
            "f1": _fbeta(int(tp[k]), fp, fn, 1.0),
            "f2": _fbeta(int(tp[k]), fp, fn, 2.0),
            "support": int(support[k]),
        }
    f1s = [scores["f1"] for scores in per_class.values() if scores["f1"] is not None]
    ed_fn = int(support[ED] - tp[ED])
    return {
        "n": int(y.size),
        "accuracy": float(tp.sum() / y.size),
        "n_unclassified": int(full[:, UNCLASSIFIED].sum()),
        "macro_f1": float(np.mean(f1s)) if f1s else None,
        "per_class": per_class,
        "labels": list(LABELS),
        "confusion": confusion.tolist(),
        "unclassified": {label: int(full[k, UNCLASSIFIED]) for k, label in enumerate(LABELS)},
        "ed_recall": per_class[LABELS[ED]]["recall"],
        "ed_f2": per_class[LABELS[ED]]["f2"],
        "ed_fnr": ratio(ed_fn, support[ED]),
        "ed_fn": ed_fn,
        "ed_support": int(support[ED]),
    }


def ed_discrimination(labels: Sequence[str], p_ed: Sequence[float], budgets: Sequence[float]) -> dict:
    """Threshold-free ED-vs-rest scores of p(ED), from scikit-learn.

    ``ed_auroc`` (ROC AUC) and ``ed_ap`` (average precision), and
    ``ed_recall_at_budget``: for each budget b, the best ED recall of a
    threshold on p(ED) that sends at most a share b of the non-ED cases to ED.
    Keys are ``non_ed_to_ed_<percent>``. All ``None`` unless both ED and
    non-ED cases are present.
    """
    y = encode_labels(labels) == ED
    scores = np.asarray(p_ed, dtype=np.float64)
    keys = [f"non_ed_to_ed_{round(b * 100)}" for b in budgets]
    if y.all() or not y.any():
        return {"ed_auroc": None, "ed_ap": None, "ed_recall_at_budget": dict.fromkeys(keys)}
    fpr, tpr, _ = roc_curve(y, scores)
    # Each ROC point is a threshold; the curve starts at (0, 0), so a point within every budget exists.
    return {
        "ed_auroc": float(roc_auc_score(y, scores)),
        "ed_ap": float(average_precision_score(y, scores)),
        "ed_recall_at_budget": {key: float(tpr[fpr <= b].max()) for key, b in zip(keys, budgets)},
    }


def check_probs(probs: ProbMatrix) -> np.ndarray:
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != N_CLASSES or arr.shape[0] == 0:
        raise ValueError(f"probs must be a non-empty (n_cases, {N_CLASSES}) matrix, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or not np.allclose(arr.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError("probs must be finite, non-negative and have rows summing to 1")
    return arr


def argmax_decision(probs: ProbMatrix) -> list[str]:
    """Most probable label per row; ties go to the more urgent label."""
    return [LABELS[k] for k in check_probs(probs).argmax(axis=1)]
