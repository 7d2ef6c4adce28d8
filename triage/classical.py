"""The classical floor every fine-tuned run must beat: TF-IDF features into a logistic regression.

It reads the same prepared splits as the language models and writes label
probabilities in the same order (:data:`triage.schema.LABELS`), so the evaluate
code scores it with the same rules, metrics and intervals, and the report
compares it with every run, paired on the same test cases.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from triage.config import ClassicalParams
from triage.schema import LABELS, DataError, Example

RUN_NAME = "tfidf-logreg"


def fit_tfidf_logreg(train: Sequence[Example], params: ClassicalParams, source: str) -> Pipeline:
    """Fit the vectoriser and the classifier on the training split's prompts and labels (read from ``source``)."""
    missing = sorted(set(LABELS) - {example.label for example in train})
    if missing:
        raise DataError(source, None, "label", f"no {', '.join(missing)} case: the classifier cannot learn it")
    pipeline = Pipeline(
        [
            ("tfidf", TfidfVectorizer(ngram_range=(1, params.max_ngram), min_df=params.min_df, sublinear_tf=True)),
            (
                "logreg",
                LogisticRegression(C=params.inverse_regularisation, class_weight=params.class_weight, max_iter=5000),
            ),
        ]
    )
    return pipeline.fit([example.prompt for example in train], [example.label for example in train])


def label_probabilities(pipeline: Pipeline, examples: Sequence[Example]) -> np.ndarray:
    """(n, 3) probabilities with columns in ``LABELS`` order, whatever order scikit-learn keeps them in."""
    probs = pipeline.predict_proba([example.prompt for example in examples])
    columns = [list(pipeline.classes_).index(label) for label in LABELS]
    return probs[:, columns]
