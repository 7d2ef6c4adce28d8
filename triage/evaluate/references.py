"""Reference rules every learner is measured against, scored like any learner.

Two constant rules read nothing: "always ED" (every emergency found, every
other case sent to ED) and "majority" (always the training split's most
common label). A learner that a constant rule matches has learned nothing a
reviewer can use. Where the cases carry the triage nurses' own decision
(``attrs["nurse_label"]``, KTAS), "nurses" is the human reference on the same
cases; it is never a model input.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from triage.evaluate.evaluation import ScoredSet, Scorer
from triage.schema import LABELS, DataError, Example

ALWAYS_ED, MAJORITY, NURSES = "always-ED", "majority", "nurses"
NURSE_ATTR = "nurse_label"


def one_hot(labels: Sequence[str]) -> np.ndarray:
    """(n, 3) probabilities putting all mass on each case's label: p(ED) is 1 or 0, so ties rank ED."""
    return np.eye(len(LABELS))[[LABELS.index(label) for label in labels]].reshape(len(labels), len(LABELS))


def majority_label(train: Sequence[Example]) -> str:
    """The training split's most common label; a tie goes to the more urgent one."""
    counts = Counter(example.label for example in train)
    return max(LABELS, key=lambda label: (counts[label], -LABELS.index(label)))


def constant_scorer(label: str) -> Scorer:
    return lambda examples, source: ScoredSet(examples, one_hot([label] * len(examples)), loss=None)


def nurse_scorer(examples: list[Example], source: str) -> ScoredSet:
    """The nurses' own triage of each case, from its attributes."""
    for line, example in enumerate(examples, start=1):
        if example.attrs.get(NURSE_ATTR) not in LABELS:
            raise DataError(source, line, f"attrs.{NURSE_ATTR}", f"case {example.id} has no nurse label in {LABELS}")
    return ScoredSet(examples, one_hot([e.attrs[NURSE_ATTR] for e in examples]), loss=None)


def reference_scorers(train: Sequence[Example], test: Sequence[Example]) -> dict[str, Callable]:
    """The constant rules, and the nurses where every test case carries their decision."""
    scorers = {ALWAYS_ED: constant_scorer("ED"), MAJORITY: constant_scorer(majority_label(train))}
    if test and all(NURSE_ATTR in example.attrs for example in test):
        scorers[NURSES] = nurse_scorer
    return scorers
