"""Tests for triage.evaluate.metrics: sklearn cross-checks, hand-computed cases and edge cases."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from scipy.stats import beta, binom
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    fbeta_score,
    precision_recall_fscore_support,
    recall_score,
    roc_auc_score,
)

from triage.evaluate.decisions import argmax_decision, cost_aware_decision, threshold_decision, tune_ed_threshold
from triage.evaluate.intervals import (
    binomial_interval,
    bootstrap_intervals,
    bootstrap_weights,
    cluster_ids,
    ed_recall_intervals,
    mcnemar_exact,
    paired_comparison,
    weighted_scores,
)
from triage.evaluate.metrics import (
    brier_score,
    classification_metrics,
    ed_discrimination,
    expected_calibration_error,
    flag_uncertain,
    gate_holds_at_bound,
    safety_gates,
    subgroup_rates,
    triage_rates,
    vote_summary,
)
from triage.schema import LABELS

STUDY_COST = {
    "ED": {"ED": 0, "GP": 100, "HOME": 100},
    "GP": {"ED": 2, "GP": 0, "HOME": 1},
    "HOME": {"ED": 2, "GP": 1, "HOME": 0},
}


def _none_to_nan(value: float | None) -> float:
    return math.nan if value is None else value


def _random_case(seed: int, n: int = 300) -> tuple[list[str], list[str | None]]:
    """Random labels and predictions; later seeds skew or drop classes and add unclassified."""
    rng = np.random.default_rng(seed)
    label_p = rng.dirichlet(np.ones(3)) if seed % 2 else np.array([1 / 3] * 3)
    if seed == 3:
        label_p = np.array([0.0, 0.5, 0.5])  # no ED cases at all
    labels = list(rng.choice(LABELS, size=n, p=label_p))
    pool = np.array(list(LABELS) + [None, "unsure", "home"], dtype=object)
    pred_p = np.array([0.3, 0.3, 0.3, 0.04, 0.03, 0.03])
    if seed == 4:
        pred_p = np.array([0.5, 0.45, 0.0, 0.05, 0.0, 0.0])  # HOME never predicted
    preds = list(rng.choice(pool, size=n, p=pred_p))
    return labels, preds


@pytest.mark.parametrize("seed", range(6))
def test_classification_metrics_match_sklearn(seed: int) -> None:
    labels, preds = _random_case(seed)
    mapped = [p if p in LABELS else "UNK" for p in preds]
    m = classification_metrics(labels, preds)

    assert m["accuracy"] == pytest.approx(accuracy_score(labels, mapped))
    kw = {"labels": list(LABELS), "zero_division": np.nan}
    prec, rec, f1, support = precision_recall_fscore_support(labels, mapped, **kw)
    f2 = fbeta_score(labels, mapped, beta=2, average=None, **kw)
    for k, label in enumerate(LABELS):
        got = m["per_class"][label]
        np.testing.assert_allclose(
            [_none_to_nan(got[key]) for key in ("precision", "recall", "f1", "f2")],
            [prec[k], rec[k], f1[k], f2[k]],
        )
        assert got["support"] == support[k]
    assert m["macro_f1"] == pytest.approx(f1_score(labels, mapped, average="macro", **kw))

    full = confusion_matrix(labels, mapped, labels=list(LABELS) + ["UNK"])
    assert m["confusion"] == full[:3, :3].tolist()
    assert m["unclassified"] == {label: int(full[k, 3]) for k, label in enumerate(LABELS)}
    assert m["ed_fn"] == int(full[0, 1:].sum())
    assert _none_to_nan(m["ed_recall"]) == pytest.approx(rec[0], nan_ok=True)
    assert _none_to_nan(m["ed_f2"]) == pytest.approx(f2[0], nan_ok=True)
    json.dumps(m, allow_nan=False)


def test_hand_computed_small_case() -> None:
    labels = ["ED", "ED", "ED", "GP", "GP", "HOME"]
    preds = ["ED", None, "GP", "GP", "ED", "HOME"]
    m = classification_metrics(labels, preds)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["confusion"] == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert m["unclassified"] == {"ED": 1, "GP": 0, "HOME": 0}
    assert m["n_unclassified"] == 1
    ed = m["per_class"]["ED"]
    assert ed["precision"] == pytest.approx(1 / 2)
    assert ed["recall"] == pytest.approx(1 / 3)
    assert ed["f1"] == pytest.approx(2 * 1 / (2 * 1 + 2 + 1))
    assert ed["f2"] == pytest.approx(5 * 1 / (5 * 1 + 4 * 2 + 1))
    assert m["per_class"]["GP"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "f2": 0.5, "support": 2}
    assert m["per_class"]["HOME"]["f1"] == 1.0
    assert m["macro_f1"] == pytest.approx((0.4 + 0.5 + 1.0) / 3)
    assert (m["ed_fn"], m["ed_support"]) == (2, 3)
    assert m["ed_fnr"] == pytest.approx(2 / 3)


def test_unclassified_counts_against_ed_and_never_as_home() -> None:
    labels = ["ED", "ED", "ED", "HOME"]
    m = classification_metrics(labels, [None, "home", "unsure", "HOME"])
    assert m["ed_recall"] == 0.0 and m["ed_fn"] == 3 and m["ed_fnr"] == 1.0
    assert m["unclassified"]["ED"] == 3
    assert [row[2] for row in m["confusion"]] == [0, 0, 1]
    assert m["per_class"]["HOME"]["precision"] == 1.0
    assert m["accuracy"] == pytest.approx(1 / 4)


def test_no_ed_cases() -> None:
    labels, preds = ["GP", "HOME", "GP"], ["GP", "HOME", "HOME"]
    m = classification_metrics(labels, preds)
    assert m["ed_recall"] is None and m["ed_fnr"] is None and m["ed_f2"] is None
    assert m["ed_fn"] == 0 and m["ed_support"] == 0
    assert m["per_class"]["ED"]["precision"] is None
    assert m["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro"))
    # Predicting ED when there is none makes ED F2 defined and 0, recall still undefined.
    m = classification_metrics(labels, ["ED", "HOME", "GP"])
    assert m["ed_f2"] == 0.0 and m["ed_recall"] is None


def test_all_predicted_ed() -> None:
    labels = ["ED", "GP", "HOME", "GP"]
    m = classification_metrics(labels, ["ED"] * 4)
    assert m["ed_recall"] == 1.0 and m["ed_fnr"] == 0.0 and m["ed_fn"] == 0
    assert m["per_class"]["ED"]["precision"] == pytest.approx(0.25)
    for label in ("GP", "HOME"):
        assert m["per_class"][label]["precision"] is None
        assert m["per_class"][label]["recall"] == 0.0
        assert m["per_class"][label]["f1"] == 0.0
    assert m["confusion"] == [[1, 0, 0], [2, 0, 0], [1, 0, 0]]


def test_empty_class_is_left_out_of_macro_f1() -> None:
    labels, preds = ["ED", "GP", "GP", "ED"], ["ED", "GP", "ED", "ED"]
    m = classification_metrics(labels, preds)
    home = m["per_class"]["HOME"]
    assert home == {"precision": None, "recall": None, "f1": None, "f2": None, "support": 0}
    f1_ed, f1_gp = 2 * 2 / (4 + 1), 2 * 1 / (2 + 1)
    assert m["macro_f1"] == pytest.approx((f1_ed + f1_gp) / 2)


@pytest.mark.parametrize(
    ("labels", "preds"),
    [([], []), (["ED"], ["ED", "GP"]), (["ED", "urgent"], ["ED", "ED"]), ([None], ["ED"])],
)
def test_bad_input_raises(labels: list, preds: list) -> None:
    with pytest.raises(ValueError):
        classification_metrics(labels, preds)


def _gate_metrics(n_ed: int, n_hit: int) -> dict:
    labels = ["ED"] * n_ed + ["GP"] * 10
    preds = ["ED"] * n_hit + ["GP"] * (n_ed - n_hit) + ["GP"] * 10
    return classification_metrics(labels, preds)


def test_gates_pass_at_exact_threshold() -> None:
    result = safety_gates(_gate_metrics(20, 19))  # recall 0.95, FNR 0.05, F2 95/99
    assert result["safe"] is True
    gates = result["gates"]
    assert {g["state"] for g in gates.values()} == {"pass"}
    assert gates["ed_recall"]["margin"] == pytest.approx(0.0)
    assert gates["ed_fnr"]["margin"] == pytest.approx(0.0)
    assert gates["ed_f2"]["margin"] == pytest.approx(95 / 99 - 0.90)
    assert gates["ed_fnr"]["direction"] == "<=" and gates["ed_recall"]["direction"] == ">="


def test_gates_fail_with_negative_margin() -> None:
    result = safety_gates(_gate_metrics(20, 18))  # recall 0.90, FNR 0.10
    gates = result["gates"]
    assert result["safe"] is False
    assert gates["ed_recall"]["state"] == "fail" and gates["ed_recall"]["passed"] is False
    assert gates["ed_recall"]["margin"] == pytest.approx(-0.05)
    assert gates["ed_fnr"]["state"] == "fail" and gates["ed_fnr"]["margin"] == pytest.approx(-0.05)
    # F2 = 5*18 / (5*18 + 4*2) = 0.918 still passes on its own.
    assert gates["ed_f2"]["state"] == "pass"
    relaxed = safety_gates(_gate_metrics(20, 18), ed_recall_min=0.9, ed_fnr_max=0.1)
    assert relaxed["safe"] is True


def test_gates_not_applicable_without_ed_cases() -> None:
    result = safety_gates(classification_metrics(["GP", "HOME"], ["GP", "HOME"]))
    assert result["safe"] is False
    for gate in result["gates"].values():
        assert gate["state"] == "n/a" and gate["passed"] is False
        assert gate["margin"] is None and gate["reason"]
    json.dumps(result, allow_nan=False)


def _bootstrap_case(n: int = 400, seed: int = 7) -> tuple[list[str], list[str | None]]:
    rng = np.random.default_rng(seed)
    labels = list(rng.choice(LABELS, size=n, p=[0.3, 0.4, 0.3]))
    preds = [lab if rng.random() < 0.85 else rng.choice(["GP", "HOME", None]) for lab in labels]
    return labels, preds


@pytest.mark.parametrize("k, n", [(12, 12), (36, 36), (7, 12), (0, 5), (40, 41)])
def test_binomial_interval_is_clopper_pearson(k: int, n: int) -> None:
    # The definition: beta quantiles (scipy.stats.beta), independent of binomtest's code path.
    interval = binomial_interval(k, n)
    low = 0.0 if k == 0 else beta.ppf(0.025, k, n - k + 1)
    high = 1.0 if k == n else beta.ppf(0.975, k + 1, n - k)
    assert (interval["low"], interval["high"]) == pytest.approx((low, high), abs=1e-9)


def test_twelve_of_twelve_is_not_certainty() -> None:
    labels = ["ED"] * 12 + ["GP"] * 20
    intervals = ed_recall_intervals(labels, labels)
    assert intervals["ed_recall"]["low"] <= 0.76 and intervals["ed_recall"]["high"] == 1.0
    assert intervals["ed_recall"]["low"] == pytest.approx(0.7354, abs=1e-4)
    assert intervals["ed_fnr"] == pytest.approx({"low": 0.0, "high": 1 - intervals["ed_recall"]["low"]})
    assert gate_holds_at_bound(intervals["ed_recall"], 0.95, at_least=True) is False
    assert gate_holds_at_bound(intervals["ed_fnr"], 0.05, at_least=False) is False
    big = ed_recall_intervals(["ED"] * 36, ["ED"] * 36)["ed_recall"]
    assert big["low"] == pytest.approx(0.9026, abs=1e-4)


def test_without_ed_cases_recall_intervals_are_not_applicable() -> None:
    intervals = ed_recall_intervals(["GP", "HOME"], ["GP", "ED"])
    assert intervals == {"ed_recall": {"low": None, "high": None}, "ed_fnr": {"low": None, "high": None}}
    assert gate_holds_at_bound(intervals["ed_recall"], 0.95, at_least=True) is None


def test_gate_holds_at_pessimistic_end() -> None:
    recall = {"low": 0.94, "high": 0.99}
    fnr = {"low": 0.01, "high": 0.06}
    assert gate_holds_at_bound(recall, 0.95, at_least=True) is False
    assert gate_holds_at_bound(recall, 0.94, at_least=True) is True
    assert gate_holds_at_bound(fnr, 0.05, at_least=False) is False
    assert gate_holds_at_bound(fnr, 0.06, at_least=False) is True


@pytest.mark.parametrize("seed", range(4))
def test_triage_rates_match_sklearn_confusion(seed: int) -> None:
    labels, preds = _random_case(seed)
    rates = triage_rates(labels, preds)
    mapped = [p if p in LABELS else "UNK" for p in preds]
    cm = confusion_matrix(labels, mapped, labels=[*LABELS, "UNK"])[:3, :3]  # rows true, columns predicted
    n = len(labels)
    assert rates["under_triage_rate"] == pytest.approx(np.triu(cm, 1).sum() / n)
    assert rates["over_triage_rate"] == pytest.approx(np.tril(cm, -1).sum() / n)
    assert rates["unsafe_rate"] == pytest.approx(cm[0, 2] / n)


def _scores_case(seed: int, n: int = 150) -> tuple[list[str], list[str | None], np.ndarray]:
    labels, preds = _random_case(seed, n)
    rng = np.random.default_rng(seed + 100)
    # Rounded scores tie often, which is where AUROC implementations differ.
    p_ed = np.round(np.clip(0.3 * (np.array(labels) == "ED") + rng.random(n) * 0.7, 0, 1), 1)
    return labels, preds, p_ed


@pytest.mark.parametrize("seed", [0, 1, 2, 5])
def test_ed_discrimination_matches_sklearn(seed: int) -> None:
    labels, _, p_ed = _scores_case(seed)
    result = ed_discrimination(labels, p_ed, [0.2, 0.4])
    is_ed = np.array(labels) == "ED"
    assert result["ed_auroc"] == pytest.approx(roc_auc_score(is_ed, p_ed))
    assert result["ed_ap"] == pytest.approx(average_precision_score(is_ed, p_ed))
    for key, budget in (("non_ed_to_ed_20", 0.2), ("non_ed_to_ed_40", 0.4)):
        # Brute force over every threshold: the best recall whose share of non-ED sent to ED fits the budget.
        fits = [
            np.mean(p_ed[is_ed] >= t)
            for t in np.unique(np.append(p_ed, np.inf))
            if np.mean(p_ed[~is_ed] >= t) <= budget
        ]
        assert result["ed_recall_at_budget"][key] == pytest.approx(max(fits))


def test_ed_discrimination_without_both_classes_is_not_applicable() -> None:
    result = ed_discrimination(["GP", "HOME"], [0.3, 0.1], [0.2])
    assert result == {"ed_auroc": None, "ed_ap": None, "ed_recall_at_budget": {"non_ed_to_ed_20": None}}


@pytest.mark.parametrize("seed", range(6))
def test_weighted_scores_match_sklearn_sample_weight(seed: int) -> None:
    labels, preds, p_ed = _scores_case(seed)
    weights = np.random.default_rng(seed).integers(0, 4, size=(6, len(labels))).astype(float)
    scores = weighted_scores(weights, labels, preds, p_ed)
    mapped = [p if p in LABELS else "UNK" for p in preds]
    is_ed = np.array(labels) == "ED"
    kw = {"labels": list(LABELS), "zero_division": np.nan}
    for row, w in enumerate(weights):
        assert scores["accuracy"][row] == pytest.approx(accuracy_score(labels, mapped, sample_weight=w))
        assert scores["macro_f1"][row] == pytest.approx(
            f1_score(labels, mapped, average="macro", sample_weight=w, **kw), nan_ok=True
        )
        assert scores["ed_f2"][row] == pytest.approx(
            fbeta_score(labels, mapped, beta=2, average=None, sample_weight=w, **kw)[0], nan_ok=True
        )
        if is_ed.any() and not is_ed.all():
            assert scores["ed_auroc"][row] == pytest.approx(roc_auc_score(is_ed, p_ed, sample_weight=w))
            assert scores["ed_recall"][row] == pytest.approx(
                recall_score(labels, mapped, labels=["ED"], average=None, sample_weight=w)[0]
            )
    # Unit weights are the plain metrics.
    plain = weighted_scores(np.ones((1, len(labels))), labels, preds, p_ed)
    assert plain["macro_f1"][0] == pytest.approx(
        _none_to_nan(classification_metrics(labels, preds)["macro_f1"]), nan_ok=True
    )


def test_cluster_bootstrap_draws_whole_groups() -> None:
    groups = ["a", "a", "a", "b", "b", "c", ""]
    clusters = cluster_ids(groups)
    assert len(set(clusters)) == 4  # three groups and a case without one, on its own
    weights = bootstrap_weights(clusters, n_resamples=200, seed=1)
    assert weights.shape == (200, 7)
    # Cases of one group always carry the same weight; the draws sum to the number of clusters.
    assert (weights[:, 0] == weights[:, 1]).all() and (weights[:, 3] == weights[:, 4]).all()
    assert not (weights[:, 0] == weights[:, 3]).all()
    np.testing.assert_array_equal(weights[:, [0, 3, 5, 6]].sum(axis=1), 4)
    np.testing.assert_array_equal(weights, bootstrap_weights(clusters, n_resamples=200, seed=1))


def test_cluster_bootstrap_is_wider_than_case_bootstrap_for_clustered_errors() -> None:
    # 20 presentations of 6 paraphrases each: a presentation is answered right or wrong as a whole.
    rng = np.random.default_rng(3)
    right = np.repeat(rng.random(20) < 0.6, 6)
    labels = ["GP"] * 120
    preds = ["GP" if r else "HOME" for r in right]
    groups = [f"g{i // 6}" for i in range(120)]
    width = {}
    for name, grouping in (("cluster", groups), ("case", [""] * 120)):
        weights = bootstrap_weights(cluster_ids(grouping))
        interval = bootstrap_intervals(weights, labels, preds, np.zeros(120))["accuracy"]
        width[name] = interval["high"] - interval["low"]
    assert width["cluster"] > 1.8 * width["case"]


def test_mcnemar_exact_is_the_binomial_test_on_discordant_pairs() -> None:
    a = np.array([True] * 10 + [False] * 2 + [True] * 5 + [False] * 3)
    b = np.array([False] * 10 + [True] * 2 + [True] * 5 + [False] * 3)
    # 10 cases only a gets right, 2 only b: p = 2 * P(X <= 2), X ~ Bin(12, 1/2).
    assert mcnemar_exact(a, b) == pytest.approx(2 * binom.cdf(2, 12, 0.5))
    assert mcnemar_exact(a, a) == 1.0


def test_paired_comparison_verdicts() -> None:
    labels, _, p_ed = _scores_case(1, n=200)
    groups = [f"g{i // 4}" for i in range(200)]
    perfect = (labels, np.where(np.array(labels) == "ED", 1.0, 0.0))
    flipped = ([{"ED": "HOME", "GP": "ED", "HOME": "GP"}[x] for x in labels], 1 - perfect[1])
    better = {row["metric"]: row for row in paired_comparison(labels, groups, perfect, flipped)}
    assert all(row["verdict"] == "better" and row["low"] > 0 for row in better.values())
    assert better["accuracy"]["diff"] == 1.0 and better["ed_auroc"]["diff"] == 1.0
    assert better["accuracy"]["p_value"] == pytest.approx(2 * 0.5**200)
    assert better["ed_auroc"]["p_value"] is None
    worse = {row["metric"]: row for row in paired_comparison(labels, groups, flipped, perfect)}
    assert all(row["verdict"] == "worse" and row["high"] < 0 for row in worse.values())
    same = paired_comparison(labels, groups, (labels, p_ed), (labels, p_ed))
    assert all(row["verdict"] == "no detectable difference" and row["diff"] == 0.0 for row in same)
    # A difference whose interval straddles 0 is no detectable difference.
    one_off = list(labels)
    one_off[0] = "GP" if labels[0] != "GP" else "HOME"
    close = {row["metric"]: row for row in paired_comparison(labels, groups, (labels, p_ed), (one_off, p_ed))}
    assert close["accuracy"]["low"] <= 0 <= close["accuracy"]["high"]
    assert close["accuracy"]["verdict"] == "no detectable difference"


def test_paired_interval_matches_resampling_the_groups_by_hand() -> None:
    labels, preds, p_ed = _scores_case(2, n=120)
    groups = [f"g{i // 5}" for i in range(120)]
    other = list(reversed(preds))
    ours = {row["metric"]: row for row in paired_comparison(labels, groups, (preds, p_ed), (other, p_ed))}
    # Independent reference: draw 24 group indices with replacement, concatenate their cases, use sklearn.
    rng = np.random.default_rng(11)
    members = [list(range(g * 5, g * 5 + 5)) for g in range(24)]
    mapped_a = np.array([p if p in LABELS else "UNK" for p in preds], dtype=object)
    mapped_b = np.array([p if p in LABELS else "UNK" for p in other], dtype=object)
    y = np.array(labels, dtype=object)
    diffs = []
    for _ in range(3000):
        idx = np.concatenate([members[g] for g in rng.integers(0, 24, 24)])
        diffs.append(accuracy_score(y[idx], mapped_a[idx]) - accuracy_score(y[idx], mapped_b[idx]))
    low, high = np.quantile(diffs, [0.025, 0.975])
    assert ours["accuracy"]["low"] == pytest.approx(low, abs=0.02)
    assert ours["accuracy"]["high"] == pytest.approx(high, abs=0.02)


CALIB_PROBS = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.65, 0.15], [0.1, 0.05, 0.85]])
CALIB_LABELS = ["ED", "GP", "GP", "HOME"]


def test_ece_hand_computed() -> None:
    # Bin [0.6, 0.7): 2 cases, accuracy 0.5, confidence 0.625; bin [0.8, 0.9): 2 cases, 1.0 vs 0.825.
    assert expected_calibration_error(CALIB_PROBS, CALIB_LABELS) == pytest.approx(0.5 * 0.125 + 0.5 * 0.175)
    # One bin: |accuracy 0.75 - mean confidence 0.725|.
    assert expected_calibration_error(CALIB_PROBS, CALIB_LABELS, n_bins=1) == pytest.approx(0.025)
    assert expected_calibration_error([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], ["ED", "HOME"]) == 0.0


def test_brier_hand_computed() -> None:
    expected = (0.06 + 0.86 + 0.185 + 0.035) / 4
    assert brier_score(CALIB_PROBS, CALIB_LABELS) == pytest.approx(expected)
    assert brier_score([[0.0, 1.0, 0.0]], ["GP"]) == 0.0
    assert brier_score([[0.0, 1.0, 0.0]], ["HOME"]) == pytest.approx(2.0)


@pytest.mark.parametrize("probs", [[[0.5, 0.5, 0.5]], [[0.5, 0.5]], [[1.2, -0.2, 0.0]], np.zeros((0, 3))])
def test_bad_probabilities_raise(probs: list) -> None:
    with pytest.raises(ValueError):
        argmax_decision(probs)


def test_argmax_and_cost_aware_tie_break_toward_urgent() -> None:
    assert argmax_decision([[0.4, 0.4, 0.2], [0.2, 0.4, 0.4], [0.1, 0.2, 0.7]]) == ["ED", "GP", "HOME"]
    # Expected costs for [0.05, 0.5, 0.45]: ED 1.9, GP 5.45, HOME 5.5.
    probs = [[0.05, 0.5, 0.45], [0.0, 0.5, 0.5], [0.0, 0.3, 0.7]]
    assert cost_aware_decision(probs, STUDY_COST) == ["ED", "GP", "HOME"]
    with pytest.raises(ValueError):
        cost_aware_decision(probs, {"ED": STUDY_COST["ED"], "GP": STUDY_COST["GP"]})


def test_cost_aware_with_zero_one_cost_is_argmax() -> None:
    probs = np.random.default_rng(5).dirichlet(np.ones(3), size=2000)
    zero_one = {t: {q: float(t != q) for q in LABELS} for t in LABELS}
    assert cost_aware_decision(probs, zero_one) == argmax_decision(probs)


def test_cost_aware_never_less_urgent_than_argmax() -> None:
    rng = np.random.default_rng(11)
    alphas = ([1, 1, 1], [0.3, 0.3, 0.3], [0.5, 3, 3])
    probs = np.vstack([rng.dirichlet(alpha, size=3000) for alpha in alphas])
    probs = np.vstack([probs, [[1 / 3] * 3, [0.0, 0.5, 0.5], [0.2, 0.4, 0.4]]])
    rank = {label: k for k, label in enumerate(LABELS)}
    costly = [rank[q] for q in cost_aware_decision(probs, STUDY_COST)]
    plain = [rank[q] for q in argmax_decision(probs)]
    assert all(c <= a for c, a in zip(costly, plain))
    assert sum(c < a for c, a in zip(costly, plain)) > 100  # the rule does move cases up


def test_tune_ed_threshold_hand_computed() -> None:
    probs = [[0.9, 0.1, 0.0], [0.7, 0.3, 0.0], [0.4, 0.6, 0.0], [0.2, 0.8, 0.0], [0.95, 0.05, 0.0]]
    labels = ["ED", "ED", "ED", "ED", "GP"]
    assert tune_ed_threshold(probs, labels, 0.75) == 0.4
    assert tune_ed_threshold(probs, labels, 0.5) == 0.7
    assert tune_ed_threshold(probs, labels, 1.0) == 0.2
    with pytest.raises(ValueError):
        tune_ed_threshold(probs, labels, 0.0)
    with pytest.raises(ValueError):
        tune_ed_threshold(probs[4:], labels[4:], 0.9)


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95, 0.99])
def test_tuned_threshold_reaches_target_and_is_largest(target: float) -> None:
    rng = np.random.default_rng(int(target * 100))
    labels = list(rng.choice(LABELS, size=600, p=[0.25, 0.4, 0.35]))
    boost = np.array([[3.0, 1.0, 1.0] if lab == "ED" else [1.0, 2.0, 2.0] for lab in labels])
    probs = np.vstack([rng.dirichlet(a) for a in boost])
    t = tune_ed_threshold(probs, labels, target)
    assert classification_metrics(labels, threshold_decision(probs, t))["ed_recall"] >= target
    above = np.nextafter(t, np.inf)
    assert classification_metrics(labels, threshold_decision(probs, above))["ed_recall"] < target


def test_threshold_decision() -> None:
    probs = [[0.3, 0.3, 0.4], [0.3, 0.3, 0.4], [0.2, 0.4, 0.4], [0.5, 0.3, 0.2]]
    thresholds = [0.25, 0.35, 0.5, 0.6]
    got = [threshold_decision([row], t)[0] for row, t in zip(probs, thresholds)]
    assert got == ["ED", "HOME", "GP", "GP"]
    assert threshold_decision([[0.3, 0.7, 0.0]], 0.3) == ["ED"]  # boundary is inclusive


def test_vote_summary() -> None:
    votes = [[0, 0, 0, 0, 0, 0], [2, 1, 0, 0, 1, 2], [2, 1, 2, 1, 2, 1], [1, 1, 1, 2, 1, 1]]
    s = vote_summary(np.array(votes))
    assert s["majority"] == ["ED", "ED", "GP", "GP"]
    assert s["counts"] == [[6, 0, 0], [2, 2, 2], [0, 3, 3], [0, 5, 1]]
    np.testing.assert_allclose(s["confidence"], [1.0, 1 / 3, 0.5, 5 / 6])
    expected_last = -(5 / 6 * math.log(5 / 6) + 1 / 6 * math.log(1 / 6))
    np.testing.assert_allclose(s["uncertainty"], [0.0, math.log(3), math.log(2), expected_last])
    assert s["uncertainty"][0] == 0.0
    json.dumps(s, allow_nan=False)


@pytest.mark.parametrize("votes", [[[0, 3]], [[0.0, 1.0]], [[-1, 0]], [0, 1, 2], np.zeros((0, 5), dtype=int)])
def test_bad_votes_raise(votes: list) -> None:
    with pytest.raises(ValueError):
        vote_summary(votes)


def test_flag_uncertain_is_strict() -> None:
    flagged = flag_uncertain([0.0, 0.3, 0.45, math.log(3)])
    assert flagged["flags"] == [False, False, True, True]
    assert (flagged["n_flagged"], flagged["rate"], flagged["threshold"]) == (2, 0.5, 0.3)
    assert flag_uncertain([0.0, 0.3, 0.45], threshold=0.2)["n_flagged"] == 2


def test_subgroup_rates() -> None:
    labels = ["ED", "ED", "GP", "HOME", "HOME", "GP", "ED", "GP"]
    preds = ["ED", None, "ED", "GP", None, "GP", "ED", "GP"]
    groups = ["a", "a", "a", "a", "b", None, "b", "c"]
    rates = subgroup_rates(labels, preds, groups)
    assert list(rates) == ["a", "b", "c"]
    assert rates["a"] == {"n": 4, "n_ed": 2, "n_non_ed": 2, "accuracy": 0.25, "ed_recall": 0.5, "over_triage_rate": 1.0}
    # b: HOME left unclassified is not over-triage, and not correct.
    assert rates["b"] == {"n": 2, "n_ed": 1, "n_non_ed": 1, "accuracy": 0.5, "ed_recall": 1.0, "over_triage_rate": 0.0}
    assert rates["c"] == {"n": 1, "n_ed": 0, "n_non_ed": 1, "accuracy": 1.0, "ed_recall": None, "over_triage_rate": 0.0}
    for name in rates:
        member = [i for i, g in enumerate(groups) if g == name]
        expected = accuracy_score([labels[i] for i in member], [str(preds[i]) for i in member])
        assert rates[name]["accuracy"] == pytest.approx(expected)
    only_ed = subgroup_rates(["ED"], ["GP"], ["x"])["x"]
    assert only_ed["over_triage_rate"] is None and only_ed["ed_recall"] == 0.0
    with pytest.raises(ValueError):
        subgroup_rates(labels, preds, groups[:-1])


def _few_groups_case(n_groups: int, per_group: int, a_wins: int, seed: int):
    """Labels in ``n_groups`` groups; a is right everywhere, b wrong in the first ``a_wins`` groups."""
    rng = np.random.default_rng(seed)
    labels = list(rng.choice(["ED", "GP", "HOME"], size=n_groups * per_group))
    groups = [f"g{i // per_group}" for i in range(len(labels))]
    wrong = {"ED": "GP", "GP": "HOME", "HOME": "ED"}
    b = [wrong[y] if i // per_group < a_wins else y for i, y in enumerate(labels)]
    p_a = [0.9 if y == "ED" else 0.1 for y in labels]
    return labels, groups, (labels, p_a), (b, p_a)


def test_few_groups_are_judged_by_an_exact_sign_flip_test_over_groups() -> None:
    labels, groups, a, b = _few_groups_case(n_groups=8, per_group=5, a_wins=3, seed=3)
    rows = {row["metric"]: row for row in paired_comparison(labels, groups, a, b)}
    accuracy = rows["accuracy"]
    assert accuracy["test"] == "group permutation" and accuracy["groups"] == 8 and accuracy["interval_approximate"]
    # Independent reference: enumerate the 2^8 swaps of whole groups by hand.
    diffs = [
        sum((labels[i] == a[0][i]) - (labels[i] == b[0][i]) for i in range(len(labels)) if groups[i] == f"g{g}")
        for g in range(8)
    ]
    observed = sum(diffs)
    extreme = sum(
        abs(sum(s * d for s, d in zip(signs, diffs))) >= abs(observed) for signs in itertools.product((-1, 1), repeat=8)
    )
    assert accuracy["p_groups"] == pytest.approx(extreme / 2**8)
    # 3 of 8 groups differ: p = 2 * 2^5 / 2^8 = 0.25 however many cases they hold, so no verdict.
    assert accuracy["p_groups"] == pytest.approx(0.25) and accuracy["verdict"] == "no detectable difference"


def test_a_bootstrap_that_excludes_zero_and_mcnemar_that_does_not_never_say_better_silently() -> None:
    # 40 cases in 40 groups: 7 cases only a gets right, 1 only b: McNemar p = 2 * P(X <= 1), X ~ Bin(8, 1/2).
    labels = ["GP"] * 40
    groups = [f"g{i}" for i in range(40)]
    a = (["GP"] * 7 + ["HOME"] + ["GP"] * 32, [0.1] * 40)
    b = (["HOME"] * 7 + ["GP"] + ["GP"] * 32, [0.1] * 40)
    accuracy = paired_comparison(labels, groups, a, b)[0]
    assert accuracy["test"] == "cluster bootstrap" and accuracy["low"] > 0
    assert accuracy["p_value"] == pytest.approx(binom.cdf(1, 8, 0.5) * 2)
    assert accuracy["verdict"] == "no detectable difference" and "tests disagree" in accuracy["note"]


def test_many_groups_keep_the_cluster_bootstrap() -> None:
    labels, groups, a, b = _few_groups_case(n_groups=40, per_group=3, a_wins=20, seed=4)
    accuracy = paired_comparison(labels, groups, a, b)[0]
    assert accuracy["test"] == "cluster bootstrap" and accuracy["p_groups"] is None
    assert accuracy["verdict"] == "better" and accuracy["note"] is None
