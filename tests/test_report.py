"""The compare stage's summary and report, on hand-made run results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from triage import figures
from triage.config import RunSelection
from triage.evaluate.intervals import paired_comparison
from triage.report import (
    collect_rows,
    comparison_pairs,
    failed_gates,
    headline_summary,
    learner_row,
    mc_uncertainties,
    memory_points,
    paired_rows,
    report_markdown,
    summary,
    uncertainty_histogram,
)
from triage.schema import LABELS

GATES = {"ed_recall": 0.95, "ed_f2": 0.90, "ed_fnr": 0.05}


def gate(value, threshold, at_least=True):
    passed = value is not None and (value >= threshold if at_least else value <= threshold)
    margin = None if value is None else (value - threshold if at_least else threshold - value)
    return {
        "state": "pass" if passed else ("n/a" if value is None else "fail"),
        "value": value,
        "threshold": threshold,
        "margin": margin,
    }


def headline(accuracy: float, ed_recall: float, constant: str | None = None, conditions: bool = False) -> dict:
    """One set's metrics as the evaluate code writes them; ``constant`` names the one label answered."""
    ed_f2 = ed_recall - 0.02
    answers = {label: (40 if label == constant else 0) if constant else 13 + (label == "ED") for label in LABELS}
    interval = {"low": accuracy - 0.1, "high": accuracy + 0.05}
    metrics = {
        "accuracy": accuracy,
        "macro_f1": accuracy - 0.05,
        "ed_recall": ed_recall,
        "ed_f2": ed_f2,
        "ed_fnr": 1 - ed_recall,
        "ed_fn": round((1 - ed_recall) * 40),
        "test_loss": 0.5,
        "ed_auroc": 0.8,
        "ed_ap": 0.6,
        "under_triage_rate": 0.1,
        "over_triage_rate": 0.2,
        "unsafe_rate": 0.01,
        "safe": ed_recall >= 0.95 and ed_f2 >= 0.90,
        "n_cases": 40,
        "answers": answers,
        "constant": constant is not None,
        "gates": {
            "ed_recall": gate(ed_recall, 0.95),
            "ed_f2": gate(ed_f2, 0.90),
            "ed_fnr": gate(1 - ed_recall, 0.05, at_least=False),
        },
        "ci95": {
            "method": "m",
            "accuracy": interval,
            "ed_recall": {"low": ed_recall - 0.2, "high": 1.0},
            "ed_auroc": {"low": 0.7, "high": 0.9},
        },
    }
    if conditions:  # the wording part a little better than the whole, the complaint part a little worse
        metrics["conditions"] = {
            "wording": headline(accuracy + 0.05, ed_recall, constant),
            "complaint": headline(accuracy - 0.05, ed_recall, constant),
        }
    return metrics


def evaluation_of(
    run: str, accuracy: float, ed_recall: float, valid: tuple[float, float] | None = None, constant: str | None = None
) -> dict:
    """A whole evaluation.json with both test conditions; ``valid`` (accuracy, ED recall) defaults to test's."""
    return {
        "run": run,
        **headline(accuracy, ed_recall, constant, conditions=True),
        "valid": headline(*(valid or (accuracy, ed_recall)), constant, conditions=True),
    }


def write_run(
    root: Path,
    run: str,
    kind: str,
    accuracy: float,
    ed_recall: float,
    memory: float,
    valid: tuple[float, float] | None = None,
    constant: str | None = None,
) -> None:
    """A run's evaluation.json and train.json; ``valid`` (accuracy, ED recall) defaults to the test numbers."""
    evaluation = evaluation_of(run, accuracy, ed_recall, valid, constant)
    training = {
        "kind": kind,
        "seconds": 10.0,
        "peak_memory_mb": memory,
        "tokens_per_s": 100.0,
        "trainable_params": 1000,
        "final_train_accuracy": 0.95 if kind == "standard" else 0.6,
    }
    (root / "runs" / run).mkdir(parents=True)
    (root / "runs" / run / "evaluation.json").write_text(json.dumps(evaluation))
    (root / "runs" / run / "train.json").write_text(json.dumps(training))


def study(tmp_path: Path) -> dict:
    write_run(tmp_path, "m-4bit-std", "standard", 0.80, 0.90, 300.0)
    write_run(tmp_path, "m-8bit-std", "standard", 0.82, 0.93, 500.0)
    write_run(tmp_path, "m-4bit-safe", "safety", 0.70, 0.99, 310.0)
    # Best on test by every measure, but not on validation: it must not be chosen.
    write_run(tmp_path, "m-8bit-lucky", "standard", 0.95, 1.0, 500.0, valid=(0.60, 0.80))
    (tmp_path / "models").mkdir()
    for bits, mb in (("4bit", 80.0), ("8bit", 140.0)):
        (tmp_path / "models" / f"m-{bits}.json").write_text(
            json.dumps({"disk_mb": mb, "bits_per_weight": 5.0 if bits == "4bit" else 9.0, "source_precision": "Q4_1"})
        )
    selection = RunSelection(models=["m"], bits=["4bit", "8bit"], configs=["std", "safe", "lucky"])
    baselines = {"m-4bit": learner_row(evaluation_of("m-4bit-zero_shot", 0.40, 0.50)) | {"test_loss": 5.25}}
    rows, missing = collect_rows(selection, tmp_path / "runs", tmp_path / "models", baselines)
    return summary(rows, missing, baselines, [])


def test_missing_runs_are_listed_not_dropped(tmp_path):
    result = study(tmp_path)
    assert result["missing"] == ["m-4bit-lucky", "m-8bit-safe"]
    assert "m-8bit-safe" in report_markdown(result, GATES)


def test_best_and_best_safe_are_chosen_on_validation(tmp_path):
    result = study(tmp_path)
    assert result["best"]["run"] == "m-4bit-safe" and result["best_safe"]["run"] == "m-4bit-safe"
    assert result["best"]["selected_on"] == result["best_safe"]["selected_on"] == "valid"
    assert result["n_safe"] == 2 and result["n_safe_on_valid"] == 1  # m-8bit-lucky is safe on test only


def test_report_sections_and_numbers(tmp_path):
    text = report_markdown(study(tmp_path), GATES)
    for title in (
        "Leaderboard",
        "4-bit vs 8-bit",
        "Standard vs safety-enhanced",
        "Zero-shot baseline",
        "source precision",
    ):
        assert title in text
    leaderboard = text.split("## Leaderboard")[1].split("##")[0]
    order = ("m-4bit-safe", "m-8bit-std", "m-4bit-std", "m-8bit-lucky")
    assert [leaderboard.index(run) for run in order] == sorted(leaderboard.index(run) for run in order)
    assert "0.800 [0.70, 0.85]" in leaderboard  # test accuracy with its interval
    assert "0.800 vs 0.820 (-0.020)" in text
    assert "+0.400" in text  # 4-bit standard run: 0.80 fine-tuned vs 0.40 zero-shot
    baseline_row = next(line for line in text.split("## Zero-shot baseline")[1].splitlines() if "m-4bit-std" in line)
    assert "5.25" in baseline_row and baseline_row.rstrip(" |").endswith("0.5")  # test loss: zero-shot, fine-tuned


def test_failed_gates_say_by_how_much(tmp_path):
    row = study(tmp_path)["runs"]["m-4bit-std"]
    assert (
        failed_gates(row)
        == "ed_recall 0.900 (short by 0.050); ed_f2 0.880 (short by 0.020); ed_fnr 0.100 (short by 0.050)"
    )


def test_memory_points_one_per_run(tmp_path):
    points = memory_points(list(study(tmp_path)["runs"].values()))
    assert [p["run"] for p in points] == ["m-4bit-safe", "m-4bit-std", "m-8bit-lucky", "m-8bit-std"]
    assert points[0] == {"run": "m-4bit-safe", "peak_memory_mb": 310.0, "ed_recall": 0.99}


def test_uncertainty_histogram_counts_every_case_in_its_bin():
    # 0 (unanimous), two cases in 0.3-0.4, and ln 3 (a three-way tie) in the closed last bin
    bins = uncertainty_histogram([0.0, 0.31, 0.35, 0.69, math.log(3)])
    assert [b["uncertainty"] for b in bins][:2] == ["0.0-0.1", "0.1-0.2"] and bins[-1]["uncertainty"] == "1.0-1.1"
    assert {b["uncertainty"]: b["cases"] for b in bins if b["cases"]} == {
        "0.0-0.1": 1,
        "0.3-0.4": 2,
        "0.6-0.7": 1,
        "1.0-1.1": 1,
    }
    assert sum(b["cases"] for b in uncertainty_histogram([])) == 0


def test_mc_uncertainties_read_from_predictions(tmp_path):
    with_mc, without_mc = tmp_path / "mc.jsonl", tmp_path / "plain.jsonl"
    with_mc.write_text('{"id": "a", "mc_uncertainty": 0.5}\n{"id": "b", "mc_uncertainty": 0.0}\n')
    without_mc.write_text('{"id": "a", "pred": "GP"}\n')
    assert mc_uncertainties(with_mc) == [0.5, 0.0]
    assert mc_uncertainties(without_mc) == [] and mc_uncertainties(tmp_path / "absent.jsonl") == []


def write_predictions(
    path: Path,
    labels: list[str],
    preds: list[str],
    p_ed: list[float],
    groups: list[str],
    conditions: list[str] | None = None,
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {"id": f"c{i}", "group": g, "label": y, "pred": p, "p_ED": s, **({"condition": c} if c else {})}
        for i, (y, p, s, g, c) in enumerate(zip(labels, preds, p_ed, groups, conditions or [None] * len(labels)))
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in reversed(rows)))  # order must not matter
    return path


def test_comparison_pairs_fine_tuned_vs_zero_shot_and_4_vs_8_bit():
    rows = [
        {"run": f"m-{bits}-{config}", "model": "m", "bits": bits, "config": config}
        for bits in ("4bit", "8bit")
        for config in ("std", "safe")
    ] + [{"run": "n-4bit-std", "model": "n", "bits": "4bit", "config": "std"}]
    baselines = {"m-4bit": {}, "m-8bit": {}, "n-4bit": {}}
    assert comparison_pairs(rows, baselines) == [
        ("m-4bit-safe", "m-4bit-zero_shot"),
        ("m-4bit-std", "m-4bit-zero_shot"),
        ("m-8bit-safe", "m-8bit-zero_shot"),
        ("m-8bit-std", "m-8bit-zero_shot"),
        ("n-4bit-std", "n-4bit-zero_shot"),
        ("m-4bit-safe", "m-8bit-safe"),
        ("m-4bit-std", "m-8bit-std"),
        ("m-4bit-zero_shot", "m-8bit-zero_shot"),
    ]


def test_every_fine_tuned_run_is_paired_with_the_classical_floor_and_the_report_shows_it(tmp_path):
    rows = [{"run": f"m-4bit-{config}", "model": "m", "bits": "4bit", "config": config} for config in ("std", "safe")]
    assert comparison_pairs(rows, {}, ["tfidf-logreg"]) == [
        ("m-4bit-safe", "tfidf-logreg"),
        ("m-4bit-std", "tfidf-logreg"),
    ]
    result = study(tmp_path)
    floor = evaluation_of("tfidf-logreg", 0.55, 0.6, valid=(0.5, 0.6))
    with_floor = summary(
        list(result["runs"].values()), result["missing"], result["baselines"], [], [learner_row(floor)]
    )
    assert with_floor["classical"]["tfidf-logreg"]["accuracy"] == 0.55
    assert with_floor["best"]["run"] == result["best"]["run"]  # a floor is never a candidate for best
    report = report_markdown(with_floor, GATES)
    assert "## The floors" in report and "| tfidf-logreg" in report and "0.550 [0.45, 0.60]" in report


def references() -> list[dict]:
    # Always ED finds every ED case, but its ED F2 is 5p/(4p+1) = 0.68 at an ED share p of 0.3.
    return [
        learner_row(evaluation_of("always-ED", 0.3, 0.70, constant="ED")),
        learner_row(evaluation_of("majority", 0.45, 0.0, constant="GP")),
    ]


def test_a_constant_run_or_one_a_constant_rule_matches_is_never_chosen(tmp_path):
    write_run(tmp_path, "m-4bit-all_ed", "safety", 0.30, 1.0, 300.0, constant="ED")  # first on ED F2, safe, not fitted
    write_run(tmp_path, "m-4bit-weak", "standard", 0.44, 0.96, 300.0)  # safe, but the majority rule's accuracy
    write_run(tmp_path, "m-4bit-good", "standard", 0.70, 0.80, 300.0)
    (tmp_path / "models").mkdir()
    selection = RunSelection(models=["m"], bits=["4bit"], configs=["all_ed", "weak", "good"])
    rows, missing = collect_rows(selection, tmp_path / "runs", tmp_path / "models", {})
    result = summary(rows, missing, {}, [], [], references())
    assert result["best"]["run"] == "m-4bit-good" and result["best_safe"] is None
    excluded = result["selection"]["excluded"]
    assert excluded["m-4bit-all_ed"] == "answers one label to every validation case"
    assert excluded["m-4bit-weak"].startswith("majority matches it on validation accuracy")
    assert result["selection"]["condition"] == "wording"
    text = report_markdown(result, GATES)
    assert "constant (40/0/0)" in text and "Not eligible:" in text and "Chosen: `m-4bit-good`" in text
    leaderboard = text.split("## Leaderboard")[1].split("##")[0]
    assert "0.600 (not fitted)" in leaderboard and "| 0.950 " in leaderboard
    alone = summary([r for r in rows if r["run"] != "m-4bit-good"], missing, {}, [], [], references())
    assert alone["best"] is None and "No run is eligible" in report_markdown(alone, GATES)


def test_every_row_holds_both_conditions_in_the_study_contract(tmp_path):
    result = study(tmp_path)
    with_all = summary(
        list(result["runs"].values()),
        [],
        {"m-4bit": learner_row(evaluation_of("m-4bit-zero_shot", 0.4, 0.5))},
        [],
        [learner_row(evaluation_of("tfidf-logreg", 0.55, 0.6))],
        references(),
    )
    assert set(with_all["references"]) == {"always-ED", "majority"}
    for block in ("runs", "baselines", "classical", "references"):
        for row in with_all[block].values():
            for condition in ("wording", "complaint"):
                numbers = row["conditions"][condition]
                for key in ("accuracy", "ed_recall", "ed_auroc"):
                    assert numbers[key] is not None and set(numbers["ci95"][key]) == {"low", "high"}, (block, key)
    text = report_markdown(with_all, GATES)
    side_by_side = text.split("## Test conditions side by side")[1].split("##")[0]
    assert "wording accuracy" in side_by_side and "complaint accuracy" in side_by_side
    assert "| always-ED" in side_by_side and "constant (40/0/0)" in side_by_side
    compact = headline_summary(with_all)
    assert compact["best_test"]["wording"]["accuracy"] == with_all["best"]["conditions"]["wording"]["accuracy"]


def test_paired_rows_read_the_predictions_and_say_which_differences_are_real(tmp_path):
    rng = np.random.default_rng(0)
    labels = list(rng.choice(["ED", "GP", "HOME"], size=120))
    groups = [f"g{i // 6}" for i in range(120)]
    good_p = [0.9 if y == "ED" else 0.1 for y in labels]
    bad = list(rng.choice(["ED", "GP", "HOME"], size=120))
    bad_p = list(rng.random(120))
    contenders = {
        "run": write_predictions(tmp_path / "run.jsonl", labels, labels, good_p, groups),
        "base": write_predictions(tmp_path / "base.jsonl", labels, bad, bad_p, groups),
    }
    rows = paired_rows([("run", "base"), ("run", "absent")], contenders)
    assert [(r["a"], r["b"], r["metric"]) for r in rows] == [
        ("run", "base", m) for m in ("accuracy", "ed_recall", "ed_auroc")
    ]
    assert all(r["verdict"] == "better" for r in rows)
    expected = paired_comparison(labels, groups, (labels, good_p), (bad, bad_p))
    assert [{k: r[k] for k in expected[0]} for r in rows] == expected
    text = report_markdown(
        {"n_runs": 0, "n_safe": 0, "n_safe_on_valid": 0, "runs": {}, "baselines": {}, "missing": [], "paired": rows},
        GATES,
    )
    assert "## Paired comparisons" in text and text.count("| better") == 3


def test_paired_rows_refuse_runs_scored_on_different_cases(tmp_path):
    a = write_predictions(tmp_path / "a.jsonl", ["ED", "GP"], ["ED", "GP"], [0.9, 0.1], ["", ""])
    b = write_predictions(tmp_path / "b.jsonl", ["ED"], ["ED"], [0.9], [""])
    with pytest.raises(ValueError, match="different cases"):
        paired_rows([("a", "b")], {"a": a, "b": b})


def prediction_rows(pairs: list[tuple[str, str]], p_ed: list[float] | None = None) -> list[dict]:
    return [
        {"label": label, "pred": pred, "p_ED": (p_ed or [0.5] * len(pairs))[i]} for i, (label, pred) in enumerate(pairs)
    ]


def test_confusion_figure_counts_each_cell_as_sklearn_does():
    from sklearn.metrics import confusion_matrix

    rows = prediction_rows([("ED", "ED"), ("ED", "GP"), ("GP", "GP"), ("HOME", "ED"), ("HOME", "HOME"), ("GP", "GP")])
    spec = figures.confusion_spec({"run-a": rows, "run-a-zero_shot": rows[:2]})
    assert spec["facet"]["sort"] == ["run-a", "run-a-zero_shot"]
    cells = {(c["label"], c["pred"]): c["cases"] for c in spec["data"]["values"] if c["run"] == "run-a"}
    expected = confusion_matrix([r["label"] for r in rows], [r["pred"] for r in rows], labels=list(LABELS))
    assert [[cells[(t, p)] for p in LABELS] for t in LABELS] == expected.tolist()


def test_roc_points_run_from_nothing_to_every_ed_case_and_skip_a_split_without_one():
    rows = prediction_rows([("ED", "ED"), ("GP", "GP"), ("ED", "GP"), ("HOME", "HOME")], [0.9, 0.6, 0.4, 0.1])
    points = figures.roc_points("r", rows)
    assert (points[0]["over_triage"], points[0]["ed_recall"]) == (0.0, 0.0)
    assert (points[-1]["over_triage"], points[-1]["ed_recall"]) == (1.0, 1.0)
    assert {"over_triage": 0.5, "ed_recall": 1.0, "run": "r"} in points  # threshold 0.4: both ED, one of two others
    assert figures.roc_points("r", prediction_rows([("GP", "GP")])) == []


def test_study_figures_are_png_and_svg_files_and_only_those_with_data(tmp_path):
    rows = prediction_rows([("ED", "ED"), ("GP", "HOME"), ("HOME", "HOME")], [0.8, 0.3, 0.1])
    paired = [
        {
            "a": "r",
            "b": "r-zero_shot",
            "metric": "accuracy",
            "diff": 0.2,
            "low": -0.1,
            "high": 0.5,
            "verdict": "no detectable difference",
        }
    ]
    made = figures.study_figures(
        tmp_path,
        {"r": rows},
        [{"run": "r", "peak_memory_mb": 900.0, "ed_recall": 1.0}],
        [{"run": "r", "step": 0, "loss": 3.0, "split": "validation"}],
        {},
        paired,
    )
    assert "MC-dropout uncertainty" not in made and len(made) == 5
    for name in made.values():
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / name.replace(".png", ".svg")).read_text().lstrip().startswith("<svg")
    report = report_markdown(summary([], [], {}, [], []), GATES, {title: f"figures/{n}" for title, n in made.items()})
    assert "![Paired differences (forest plot)](figures/paired_forest.png)" in report


def test_roc_and_forest_figures_put_the_test_conditions_side_by_side():
    rows = [
        row | {"condition": condition}
        for condition in ("wording", "complaint")
        for row in prediction_rows([("ED", "ED"), ("GP", "GP"), ("ED", "GP"), ("HOME", "HOME")], [0.9, 0.6, 0.4, 0.1])
    ]
    spec = figures.roc_spec({"r": rows})
    assert spec["facet"]["column"]["field"] == "condition"
    assert {p["condition"] for p in spec["data"]["values"]} == {"wording", "complaint"}
    paired = [
        {
            "a": "r",
            "b": "f",
            "metric": "accuracy",
            "diff": 0.1,
            "low": 0.0,
            "high": 0.2,
            "condition": c,
            "verdict": "no detectable difference",
        }
        for c in ("wording", "complaint")
    ]
    forest = figures.forest_spec(paired)
    assert forest["facet"]["column"]["field"] == "condition" and len(forest["data"]["values"]) == 2
