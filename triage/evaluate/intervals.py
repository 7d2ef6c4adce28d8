"""Intervals and paired tests for the metrics.

Exact binomial bounds, the cluster bootstrap over presentation groups, and
paired comparisons of two runs on the same cases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import binomtest

from triage.evaluate.metrics import ED, N_CLASSES, encode_labels, encode_pair


def binomial_interval(successes: int, trials: int, level: float = 0.95) -> dict:
    """Exact (Clopper-Pearson) interval of a proportion, from scipy; ``None`` bounds without trials.

    Exact rather than a bootstrap because a bootstrap of k out of k resamples
    only k-out-of-k sets and reports [1, 1]: 12 of 12 ED cases found is
    compatible with a recall of 0.74 (Clopper-Pearson 95% lower bound).
    """
    if trials == 0:
        return {"low": None, "high": None}
    interval = binomtest(successes, trials).proportion_ci(level, method="exact")
    return {"low": float(interval.low), "high": float(interval.high)}


def ed_recall_intervals(labels: Sequence[str], preds: Sequence[str | None], level: float = 0.95) -> dict:
    """Exact intervals for ED recall and the ED false-negative rate (its complement)."""
    y, p = encode_pair(labels, preds)
    trials = int(np.sum(y == ED))
    recall = binomial_interval(int(np.sum((y == ED) & (p == ED))), trials, level)
    fnr = {"low": None, "high": None} if trials == 0 else {"low": 1 - recall["high"], "high": 1 - recall["low"]}
    return {"ed_recall": recall, "ed_fnr": fnr}


BOOTSTRAP_RESAMPLES = 2000


BOOTSTRAP_SEED = 0


def cluster_ids(groups: Sequence[str]) -> np.ndarray:
    """One integer per case naming its resampling unit: its presentation group, or itself without one."""
    keys = [group if group else f"\0case{i}" for i, group in enumerate(groups)]
    _, ids = np.unique(np.array(keys, dtype=object), return_inverse=True)
    return ids.astype(np.int64)


def bootstrap_weights(
    clusters: np.ndarray, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> np.ndarray:
    """(n_resamples, n_cases) case weights of a seeded cluster bootstrap.

    Each resample draws as many clusters as there are, with replacement; a
    case's weight is how often its cluster was drawn. Paraphrases of one
    presentation are not independent, so they are drawn together.
    """
    n_clusters = int(clusters.max()) + 1
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n_clusters, np.full(n_clusters, 1 / n_clusters), size=n_resamples)
    return draws[:, clusters].astype(np.float64)


def _weighted_fbeta(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, beta: float) -> np.ndarray:
    b2 = beta * beta
    den = (1 + b2) * tp + b2 * fn + fp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, (1 + b2) * tp / den, np.nan)


def _weighted_auroc(weights: np.ndarray, positive: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Weighted Mann-Whitney AUC per row of ``weights`` (ties count half); NaN without both classes."""
    _, level = np.unique(scores, return_inverse=True)
    at_level = np.eye(level.max() + 1)[level]  # (n, levels)
    pos = (weights * positive) @ at_level
    neg = (weights * ~positive) @ at_level
    below = np.cumsum(neg, axis=1) - neg
    with np.errstate(divide="ignore", invalid="ignore"):
        return (pos * (below + neg / 2)).sum(axis=1) / (pos.sum(axis=1) * neg.sum(axis=1))


def weighted_scores(
    weights: np.ndarray, labels: Sequence[str], preds: Sequence[str | None], p_ed: Sequence[float]
) -> dict[str, np.ndarray]:
    """Accuracy, macro-F1, ED F2, ED recall and ED AUROC for every row of case weights at once; NaN where undefined.

    The same definitions as ``classification_metrics`` and scikit-learn with
    ``sample_weight`` (tested equal), but as matrix products: scikit-learn
    takes ~4 ms per call here, and an interval needs thousands of resamples.
    """
    y, p = encode_pair(labels, preds)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    cells = w @ np.eye(N_CLASSES * (N_CLASSES + 1))[y * (N_CLASSES + 1) + p]
    full = cells.reshape(-1, N_CLASSES, N_CLASSES + 1)
    tp = np.diagonal(full[:, :, :N_CLASSES], axis1=1, axis2=2)
    support, predicted = full.sum(axis=2), full[:, :, :N_CLASSES].sum(axis=1)
    fp, fn = predicted - tp, support - tp
    f1 = _weighted_fbeta(tp, fp, fn, 1.0)
    defined = ~np.isnan(f1)  # macro-F1 leaves out a class absent from labels and predictions
    with np.errstate(divide="ignore", invalid="ignore"):
        macro_f1 = np.where(defined, f1, 0.0).sum(axis=1) / defined.sum(axis=1)
        recall = tp[:, ED] / support[:, ED]
    return {
        "accuracy": tp.sum(axis=1) / w.sum(axis=1),
        "macro_f1": macro_f1,
        "ed_f2": _weighted_fbeta(tp[:, ED], fp[:, ED], fn[:, ED], 2.0),
        "ed_recall": recall,
        "ed_auroc": _weighted_auroc(w, y == ED, np.asarray(p_ed, dtype=np.float64)),
    }


def percentile_interval(values: np.ndarray, level: float = 0.95) -> dict:
    """Percentile interval of the defined (non-NaN) resample values; ``None`` bounds when none is."""
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        return {"low": None, "high": None}
    low, high = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return {"low": float(low), "high": float(high)}


def bootstrap_intervals(
    weights: np.ndarray, labels: Sequence[str], preds: Sequence[str | None], p_ed: Sequence[float], level: float = 0.95
) -> dict[str, dict]:
    """Percentile intervals of every ``weighted_scores`` statistic over the resamples in ``weights``."""
    scores = weighted_scores(weights, labels, preds, p_ed)
    return {name: percentile_interval(values, level) for name, values in scores.items()}


PAIRED_STATISTICS = ("accuracy", "ed_recall", "ed_auroc")


VERDICTS = ("better", "worse", "no detectable difference")


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Two-sided exact McNemar p-value: a binomial test on the discordant pairs (scipy)."""
    a_only = int(np.sum(correct_a & ~correct_b))
    discordant = a_only + int(np.sum(~correct_a & correct_b))
    return 1.0 if discordant == 0 else float(binomtest(a_only, discordant, 0.5).pvalue)


def verdict(low: float | None, high: float | None) -> str:
    """``better`` or ``worse`` (for a over b) only when the interval of a - b excludes 0."""
    if low is not None and low > 0:
        return VERDICTS[0]
    if high is not None and high < 0:
        return VERDICTS[1]
    return VERDICTS[2]


MIN_BOOTSTRAP_GROUPS = 30
"""Below this many groups a percentile bootstrap over them is too narrow; a group permutation test decides."""
PERMUTATIONS = 4000
PERMUTATION_SEED = 0
SIGNIFICANCE = 0.05


def _sign_flips(n_groups: int, rng: np.random.Generator) -> np.ndarray:
    """(m, n_groups) of +-1: every flip when there are at most PERMUTATIONS of them, else random ones."""
    if 2**n_groups <= PERMUTATIONS:
        codes = np.arange(2**n_groups)[:, None] >> np.arange(n_groups)[None, :] & 1
        return 1 - 2 * codes
    return rng.choice(np.array([-1, 1]), size=(PERMUTATIONS, n_groups))


def _flip_p_value(observed: float, permuted: np.ndarray, exact: bool) -> float:
    """Two-sided: the share of sign flips at least as extreme (the identity counted once when sampling)."""
    extreme = np.sum(np.abs(permuted) >= abs(observed) - 1e-12)
    return float(extreme / len(permuted)) if exact else float((extreme + 1) / (len(permuted) + 1))


def _auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    return float(_weighted_auroc(np.ones((1, len(scores))), positive, scores)[0])


def group_permutation_p(clusters: np.ndarray, labels: Sequence[str], a: tuple, b: tuple) -> dict[str, float | None]:
    """Two-sided p-values of a paired sign-flip test over groups, per ``PAIRED_STATISTICS``.

    Under "a and b are exchangeable" each group's pair of answers may be swapped
    as a whole; a group's cases move together, so the test holds with few
    groups where a bootstrap over them does not.
    """
    y = encode_labels(labels)
    n_groups = int(clusters.max()) + 1
    flips = _sign_flips(n_groups, np.random.default_rng(PERMUTATION_SEED))
    exact = len(flips) == 2**n_groups
    correct = [encode_pair(labels, run[0])[1] == y for run in (a, b)]
    out: dict[str, float | None] = {}
    for name, cases in (("accuracy", np.ones_like(y, dtype=bool)), ("ed_recall", y == ED)):
        per_group = np.bincount(
            clusters[cases], (correct[0] ^ correct[1])[cases] * np.where(correct[0], 1, -1)[cases], minlength=n_groups
        )
        out[name] = None if not cases.any() else _flip_p_value(per_group.sum(), flips @ per_group, exact)
    positive = y == ED
    if positive.all() or not positive.any():
        out["ed_auroc"] = None
        return out
    score_a, score_b = (np.asarray(run[1], dtype=np.float64) for run in (a, b))
    swapped = flips[:, clusters] < 0
    permuted = np.array(
        [
            _auroc(positive, np.where(s, score_b, score_a)) - _auroc(positive, np.where(s, score_a, score_b))
            for s in swapped
        ]
    )
    out["ed_auroc"] = _flip_p_value(_auroc(positive, score_a) - _auroc(positive, score_b), permuted, exact)
    return out


def _decide(
    diff: float | None, interval: dict, p_groups: float | None, p_mcnemar: float | None, few_groups: bool
) -> tuple[str, str | None]:
    """The verdict and, when the tests disagree, why it stays "no detectable difference"."""
    if few_groups:
        primary = (
            VERDICTS[2]
            if p_groups is None or p_groups >= SIGNIFICANCE or not diff
            else VERDICTS[0]
            if diff > 0
            else VERDICTS[1]
        )
        primary_text = f"group permutation p = {p_groups:.3g}" if p_groups is not None else "no group test"
    else:
        primary = verdict(interval["low"], interval["high"])
        primary_text = "the bootstrap interval " + ("excludes 0" if primary != VERDICTS[2] else "includes 0")
    if p_mcnemar is None:
        return primary, None
    mcnemar_says = p_mcnemar < SIGNIFICANCE
    if (primary != VERDICTS[2]) == mcnemar_says:
        return primary, None
    return VERDICTS[2], f"tests disagree: {primary_text}, McNemar p = {p_mcnemar:.3g}; both must find it"


def paired_comparison(
    labels: Sequence[str],
    groups: Sequence[str],
    a: tuple[Sequence[str], Sequence[float]],
    b: tuple[Sequence[str], Sequence[float]],
    level: float = 0.95,
) -> list[dict]:
    """a minus b on the same cases, for each of ``PAIRED_STATISTICS``.

    ``a`` and ``b`` are (decisions, p(ED)) per case, in the order of
    ``labels``. Each entry has ``metric``, ``diff``, ``low``/``high`` (paired
    cluster bootstrap: both runs are scored on the same resampled groups),
    ``p_value`` (exact McNemar on correctness: every case for accuracy, the ED
    cases for ED recall; ``None`` for AUROC), ``groups``, ``test`` and
    ``verdict``. With fewer than ``MIN_BOOTSTRAP_GROUPS`` groups the bootstrap
    interval is too narrow: a sign-flip permutation test over groups
    (``p_groups``) decides instead, and the interval is marked approximate.
    "better" or "worse" needs the deciding test and McNemar's to agree; where
    they do not, the verdict is "no detectable difference" and ``note`` says why.
    """
    clusters = cluster_ids(groups)
    n_groups = int(clusters.max()) + 1
    few = n_groups < MIN_BOOTSTRAP_GROUPS
    weights = bootstrap_weights(clusters)
    every = np.ones((1, len(labels)))
    y = encode_labels(labels)
    point_a, point_b = (weighted_scores(every, labels, *run) for run in (a, b))
    boot_a, boot_b = (weighted_scores(weights, labels, *run) for run in (a, b))
    correct_a, correct_b = (encode_pair(labels, run[0])[1] == y for run in (a, b))
    cases = {"accuracy": np.ones_like(y, dtype=bool), "ed_recall": y == ED}
    p_groups = group_permutation_p(clusters, labels, a, b) if few else {}
    out = []
    for name in PAIRED_STATISTICS:
        diff = float(point_a[name][0] - point_b[name][0])
        diff = None if math.isnan(diff) else diff
        interval = percentile_interval(boot_a[name] - boot_b[name], level)
        p_value = mcnemar_exact(correct_a[cases[name]], correct_b[cases[name]]) if name in cases else None
        decided, note = _decide(diff, interval, p_groups.get(name), p_value, few)
        out.append(
            {
                "metric": name,
                "diff": diff,
                **interval,
                "p_value": p_value,
                "groups": n_groups,
                "test": "group permutation" if few else "cluster bootstrap",
                "p_groups": p_groups.get(name),
                "interval_approximate": few,
                "verdict": decided,
                "note": note,
            }
        )
    return out
