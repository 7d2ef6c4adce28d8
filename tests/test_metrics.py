"""Tests for triage.metrics: sklearn cross-checks, hand-computed cases and edge cases."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    fbeta_score,
    precision_recall_fscore_support,
)

from triage.metrics import (
    argmax_decision,
    bootstrap_interval,
    brier_score,
    classification_metrics,
    cost_aware_decision,
    expected_calibration_error,
    flag_uncertain,
    gate_holds_at_bound,
    safety_gates,
    subgroup_rates,
    threshold_decision,
    tune_ed_threshold,
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


def test_bootstrap_reproducible_and_contains_estimate() -> None:
    labels, preds = _bootstrap_case()
    first = bootstrap_interval(labels, preds, "ed_recall", n_resamples=500, seed=3)
    assert first == bootstrap_interval(labels, preds, "ed_recall", n_resamples=500, seed=3)
    assert first != bootstrap_interval(labels, preds, "ed_recall", n_resamples=500, seed=4)
    assert first["estimate"] == pytest.approx(classification_metrics(labels, preds)["ed_recall"])
    assert first["low"] < first["estimate"] < first["high"]
    assert (first["n_resamples"], first["level"], first["n_valid"]) == (500, 0.95, 500)
    fnr = bootstrap_interval(labels, preds, "ed_fnr", n_resamples=500, seed=3)
    assert fnr["low"] < fnr["estimate"] < fnr["high"]
    # Same draws, complementary statistic: the FNR interval mirrors the recall one.
    assert fnr["low"] == pytest.approx(1 - first["high"]) and fnr["high"] == pytest.approx(1 - first["low"])


def test_bootstrap_agrees_with_naive_case_resampling() -> None:
    labels, preds = _bootstrap_case(n=300)
    ours = bootstrap_interval(labels, preds, "ed_recall", n_resamples=4000, level=0.9, seed=1)
    is_ed = np.array(labels) == "ED"
    hit = is_ed & (np.array(preds, dtype=object) == "ED")
    idx = np.random.default_rng(2).integers(0, len(labels), size=(4000, len(labels)))
    naive = np.quantile(hit[idx].sum(axis=1) / is_ed[idx].sum(axis=1), [0.05, 0.95])
    assert ours["low"] == pytest.approx(naive[0], abs=0.015)
    assert ours["high"] == pytest.approx(naive[1], abs=0.015)
    assert ours["high"] - ours["low"] < 0.25


def test_bootstrap_is_fast() -> None:
    labels, preds = _bootstrap_case(n=5000)
    start = time.perf_counter()
    bootstrap_interval(labels, preds, "ed_fnr", n_resamples=5000)
    assert time.perf_counter() - start < 2.0


def test_bootstrap_without_ed_cases_and_bad_statistic() -> None:
    interval = bootstrap_interval(["GP", "HOME"], ["GP", "GP"], "ed_recall", n_resamples=50)
    assert interval["low"] is None and interval["high"] is None and interval["n_valid"] == 0
    assert gate_holds_at_bound(interval, 0.95) is None
    with pytest.raises(ValueError):
        bootstrap_interval(["ED"], ["ED"], "accuracy")


def test_gate_holds_at_pessimistic_end() -> None:
    recall = {"statistic": "ed_recall", "low": 0.94, "high": 0.99}
    fnr = {"statistic": "ed_fnr", "low": 0.01, "high": 0.06}
    assert gate_holds_at_bound(recall, 0.95) is False
    assert gate_holds_at_bound(recall, 0.94) is True
    assert gate_holds_at_bound(fnr, 0.05) is False
    assert gate_holds_at_bound(fnr, 0.06) is True


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
    assert rates["a"] == {"n": 4, "n_ed": 2, "n_non_ed": 2, "ed_recall": 0.5, "over_triage_rate": 1.0}
    # b: HOME left unclassified is not over-triage.
    assert rates["b"] == {"n": 2, "n_ed": 1, "n_non_ed": 1, "ed_recall": 1.0, "over_triage_rate": 0.0}
    assert rates["c"] == {"n": 1, "n_ed": 0, "n_non_ed": 1, "ed_recall": None, "over_triage_rate": 0.0}
    only_ed = subgroup_rates(["ED"], ["GP"], ["x"])["x"]
    assert only_ed["over_triage_rate"] is None and only_ed["ed_recall"] == 0.0
    with pytest.raises(ValueError):
        subgroup_rates(labels, preds, groups[:-1])
