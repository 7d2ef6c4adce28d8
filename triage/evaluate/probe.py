"""The second floor: a linear probe on what the frozen base model already knows.

A logistic regression (scikit-learn) reads each case's frozen features
(:mod:`triage.model.features`) and is fitted on the training split; its
regularisation is chosen on validation from ``probe.inverse_regularisation``.
Fine-tuning earns its cost only where it beats this floor and the bag of words.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from triage.config import ProbeParams
from triage.evaluate.evaluation import CONDITION_ATTR, ScoredSet
from triage.schema import LABELS, DataError, Example

Features = Callable[[Sequence[Example]], np.ndarray]
"""A set of cases to their frozen features, one row per case."""


def fit_probe(
    train: Sequence[Example],
    valid: Sequence[Example],
    features: Features,
    params: ProbeParams,
    selection_condition: str,
    source: str,
) -> tuple[Pipeline, dict]:
    """The probe with the best validation accuracy (on ``selection_condition``'s cases where they exist)."""
    missing = sorted(set(LABELS) - {example.label for example in train})
    if missing:
        raise DataError(source, None, "label", f"no {', '.join(missing)} case: the probe cannot learn it")
    x_train, x_valid = features(train), features(valid)
    chosen = [i for i, e in enumerate(valid) if e.attrs.get(CONDITION_ATTR) == selection_condition] or list(
        range(len(valid))
    )
    y_train = [e.label for e in train]
    y_valid = np.array([valid[i].label for i in chosen])
    fitted, scores = {}, {}
    for c in params.inverse_regularisation:
        probe = make_pipeline(
            StandardScaler(), LogisticRegression(C=c, class_weight=params.class_weight, max_iter=5000)
        )
        fitted[c] = probe.fit(x_train, y_train)
        scores[c] = float(np.mean(probe.predict(x_valid[chosen]) == y_valid))
    best = max(params.inverse_regularisation, key=lambda c: (scores[c], -c))
    return fitted[best], {
        "inverse_regularisation": best,
        "valid_accuracy_by_c": {str(c): s for c, s in scores.items()},
        "chosen_on": selection_condition if len(chosen) < len(valid) else "all",
    }


def probe_scorer(probe: Pipeline, features: Features) -> Callable[[list[Example], str], ScoredSet]:
    """The evaluate code's scorer: label probabilities in ``LABELS`` order."""
    columns = [list(probe.classes_).index(label) for label in LABELS]

    def score(examples: list[Example], source: str) -> ScoredSet:
        return ScoredSet(examples, probe.predict_proba(features(examples))[:, columns], loss=None)

    return score
