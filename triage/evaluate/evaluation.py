"""Evaluate any scorer of labelled cases, language model or not: label probabilities to safety metrics.

One evaluation scores the validation split first: it freezes the ED threshold
and gives the metrics that runs are ranked and chosen on (never the test
split's). Then it scores the test split and every extra set with the same
three decision rules, threshold and gates. The language model's scorer and its
MC-dropout votes are in :mod:`triage.evaluate.language_model`, the classical
floor's in :mod:`triage.classical`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from triage.config import EvaluateParams, ExtraSet
from triage.data.importers import read_chat_jsonl, read_prompt_completion_jsonl, read_table
from triage.data.ktas import read_ktas_csv
from triage.evaluate import intervals
from triage.evaluate import metrics as m
from triage.evaluate.decisions import EdThreshold, decide, freeze_ed_threshold
from triage.evaluate.metrics import HEADLINE
from triage.schema import LABELS, DataError, Example, read_examples

SUBGROUP_ATTRS = ("age_band", "sex", "vitals")  # vitals: KTAS cases, abnormal or not (triage/data/ktas.py)
CONDITION_ATTR = "condition"
"""Built-in cases carry the test condition they belong to (triage.data.conditions); each is scored apart too."""


@dataclass(frozen=True)
class ScoredSet:
    """One labelled set after scoring: its cases, label probabilities (dropout off) and loss.

    ``label_mass`` is each case's probability of answering with any of the three
    labels before they are renormalised: a model that puts its mass on other
    tokens still gets a decision, and this shows how little it rests on.
    """

    examples: list[Example]
    probs: np.ndarray
    loss: float | None  # mean completion cross-entropy; None for a model that does not generate text
    label_mass: np.ndarray | None = None

    @property
    def labels(self) -> list[str]:
        return [example.label for example in self.examples]

    @property
    def groups(self) -> list[str]:
        return [example.group for example in self.examples]

    def subset(self, indices: list[int]) -> ScoredSet:
        """Some of the cases; the loss is the whole set's mean, so a subset has none."""
        mass = None if self.label_mass is None else self.label_mass[indices]
        return ScoredSet([self.examples[i] for i in indices], self.probs[indices], None, mass)


def read_extra_set(spec: ExtraSet) -> list[Example]:
    """The cases of one `evaluate.extra_sets` entry, through the importers, cut to ``limit``."""
    encoding = spec.encoding or ("cp1254" if spec.format == "ktas" else "utf-8")
    if spec.format in ("csv", "jsonl"):
        examples = read_table(
            spec.path,
            spec.format,
            spec.text_field,
            spec.label_field,
            spec.label_map,
            spec.id_field,
            spec.attr_fields or (),
            encoding,
            spec.delimiter or ",",
        )
    else:
        reader = {"prompt_completion": read_prompt_completion_jsonl, "chat": read_chat_jsonl, "ktas": read_ktas_csv}[
            spec.format
        ]
        examples = reader(spec.path, encoding)
    return examples[: spec.limit]


CI_METHOD = (
    "ed_recall, ed_fnr: exact Clopper-Pearson; accuracy, macro_f1, ed_f2, ed_auroc: percentile "
    f"bootstrap, {intervals.BOOTSTRAP_RESAMPLES} seeded resamples of presentation groups (of cases without one)"
)


def rule_metrics(scored: ScoredSet, preds: list[str], params: EvaluateParams, weights: np.ndarray) -> dict:
    """Scores of one decision rule, its gates and 95% intervals, flat enough for dvc metrics.

    ``weights`` are the set's cluster-bootstrap resamples, shared by every rule.
    """
    labels, gates_params = scored.labels, params.gates
    scores = m.classification_metrics(labels, preds)
    gates = m.safety_gates(scores, gates_params.ed_recall_min, gates_params.ed_f2_min, gates_params.ed_fnr_max)
    boot = intervals.bootstrap_intervals(weights, labels, preds, scored.probs[:, m.ED])
    bounds = {**intervals.ed_recall_intervals(labels, preds), **{k: boot[k] for k in ("accuracy", "macro_f1", "ed_f2")}}
    return {
        **{key: scores[key] for key in HEADLINE if key in scores},
        "safe": gates["safe"],
        **m.triage_rates(labels, preds),
        "gates": {
            name: {k: g[k] for k in ("state", "value", "threshold", "margin")} for name, g in gates["gates"].items()
        },
        "ci95": {"method": CI_METHOD, **bounds},
        "gates_hold_at_pessimistic_end": {
            "ed_recall": m.gate_holds_at_bound(bounds["ed_recall"], gates_params.ed_recall_min, at_least=True),
            "ed_f2": m.gate_holds_at_bound(bounds["ed_f2"], gates_params.ed_f2_min, at_least=True),
            "ed_fnr": m.gate_holds_at_bound(bounds["ed_fnr"], gates_params.ed_fnr_max, at_least=False),
        },
        "per_class": scores["per_class"],
        "n_unclassified": scores["n_unclassified"],
        "n": scores["n"],
    }


def label_mass_summary(mass: np.ndarray | None) -> dict:
    """Mean and 10th percentile of the raw probability of answering with one of the labels."""
    if mass is None:
        return {"mean": None, "p10": None}
    return {"mean": float(np.mean(mass)), "p10": float(np.quantile(mass, 0.1))}


def answer_counts(preds: list[str | None]) -> dict[str, int]:
    """How often each label was answered; ``constant`` runs answer one label to every case."""
    return {label: sum(p == label for p in preds) for label in (*LABELS, None) if label or None in preds}


def by_condition(scored: ScoredSet, params: EvaluateParams, threshold: EdThreshold) -> dict[str, dict]:
    """``set_metrics`` of each test condition the cases name (none for data without conditions)."""
    names = sorted({e.attrs[CONDITION_ATTR] for e in scored.examples if CONDITION_ATTR in e.attrs})
    return {
        name: set_metrics(
            scored.subset([i for i, e in enumerate(scored.examples) if e.attrs.get(CONDITION_ATTR) == name]),
            params,
            threshold,
        )
        for name in names
    }


def set_metrics(scored: ScoredSet, params: EvaluateParams, threshold: EdThreshold) -> dict:
    """Metrics of one scored set: the headline rule's keys on top, every rule, calibration, subgroups."""
    labels = scored.labels
    decisions = decide(scored.probs, params, threshold)
    clusters = intervals.cluster_ids(scored.groups)
    weights = intervals.bootstrap_weights(clusters)
    by_rule = {rule: rule_metrics(scored, preds, params, weights) for rule, preds in decisions.items()}
    by_rule.setdefault("ed_threshold", {"applicable": False, "reason": threshold.reason})
    by_rule["ed_threshold"] |= threshold.describe()
    top = by_rule[params.decision]
    discrimination = m.ed_discrimination(labels, scored.probs[:, m.ED], params.over_triage_budgets)
    auroc_interval = intervals.bootstrap_intervals(weights, labels, decisions[params.decision], scored.probs[:, m.ED])
    attrs = sorted({key for e in scored.examples for key in e.attrs if key in SUBGROUP_ATTRS})
    answers = answer_counts(decisions[params.decision])
    return {
        "decision": params.decision,
        **{key: top[key] for key in (*HEADLINE, "gates")},
        "answers": answers,
        "constant": sum(n > 0 for n in answers.values()) == 1,
        **discrimination,
        "ci95": {**top["ci95"], "ed_auroc": auroc_interval["ed_auroc"]},
        "ci95_clusters": int(clusters.max()) + 1,
        "gates_hold_at_pessimistic_end": top["gates_hold_at_pessimistic_end"],
        "test_loss": scored.loss,
        "perplexity": None if scored.loss is None else math.exp(scored.loss),
        "n_cases": len(labels),
        "label_mass": label_mass_summary(scored.label_mass),
        "calibration": {
            "ece": m.expected_calibration_error(scored.probs, labels),
            "brier": m.brier_score(scored.probs, labels),
        },
        **by_rule,
        "subgroups": {
            attr: m.subgroup_rates(labels, decisions[params.decision], [e.attrs.get(attr) for e in scored.examples])
            for attr in attrs
        },
    }


def prediction_rows(scored: ScoredSet, params: EvaluateParams, threshold: EdThreshold) -> list[dict]:
    """One row per case for the confusion plot and for audit."""
    decisions = decide(scored.probs, params, threshold)
    return [
        {
            "id": e.id,
            "group": e.group,
            "label": e.label,
            "pred": decisions[params.decision][i],
            **{rule: preds[i] for rule, preds in decisions.items()},
            **{f"p_{label}": round(float(scored.probs[i, j]), 6) for j, label in enumerate(LABELS)},
            **e.attrs,
        }
        for i, e in enumerate(scored.examples)
    ]


@dataclass(frozen=True)
class Evaluation:
    """What the evaluate stage writes: the metrics JSON, the predictions rows and the review rows."""

    metrics: dict
    predictions: list[dict]
    review: list[dict]


Scorer = Callable[[list[Example], str], ScoredSet]
"""Scores one labelled set: (its cases, the file they came from, for errors) to label probabilities."""


def evaluate_sets(
    score: Scorer,
    data_dir: Path,
    params: EvaluateParams,
    target: tuple[float, str],
) -> tuple[dict, list[dict], ScoredSet, EdThreshold]:
    """Score ``valid.jsonl`` (freezing the ED threshold there), then ``test.jsonl`` and the extra sets.

    Any model goes through here, a language model or the classical baseline,
    so every run's numbers come from the same rules, metrics and intervals.
    The validation split's metrics go under ``valid``: runs are ranked and
    chosen on them, so the test split's numbers stay an unbiased report.
    Returns the metrics, the test split's prediction rows, the scored test
    split and the frozen threshold.
    """
    valid_path = data_dir / "valid.jsonl"
    valid = score(read_examples(valid_path), str(valid_path))
    threshold = freeze_ed_threshold(valid.examples, valid.probs, *target)
    if params.decision == "ed_threshold" and threshold.value is None:
        raise DataError(valid_path, None, "label", "no ED case: evaluate.decision ed_threshold needs one to tune on")

    test_path = data_dir / "test.jsonl"
    test = score(read_examples(test_path), str(test_path))
    metrics = set_metrics(test, params, threshold) | {"conditions": by_condition(test, params, threshold)}
    metrics["valid"] = set_metrics(valid, params, threshold) | {"conditions": by_condition(valid, params, threshold)}
    metrics["extra_sets"] = {
        spec.name: {
            "path": spec.path,
            "format": spec.format,
            **set_metrics(score(read_extra_set(spec), spec.path), params, threshold),
        }
        for spec in params.extra_sets
    }
    return metrics, prediction_rows(test, params, threshold), test, threshold


HEADLINE_FILE = (
    "accuracy",
    "macro_f1",
    "ed_recall",
    "ed_f2",
    "ed_fnr",
    "ed_auroc",
    "under_triage_rate",
    "over_triage_rate",
    "test_loss",
)
"""The numbers of an evaluation's compact ``eval.json``, the file ``dvc metrics`` and ``dvc exp show`` read."""


CONDITION_HEADLINE = ("accuracy", "ed_recall", "ed_auroc")
"""What eval.json shows of each test condition, so `dvc metrics diff` puts them side by side."""


def headline_file(evaluation: dict, peak_memory_mb: float | None = None) -> dict:
    """A dozen numbers of one evaluation for DVC: the headline rule's test metrics, the ED recall's
    lower bound, ``safe`` as 0/1, each test condition's accuracy, ED recall and ED AUROC, and the
    training's peak memory. The whole evaluation (every rule, interval, gate and subgroup) is the
    ``evaluation.json`` beside it."""
    compact = {
        "decision": evaluation["decision"],
        **{key: evaluation[key] for key in HEADLINE_FILE},
        "ci95": {"ed_recall": {"low": evaluation["ci95"]["ed_recall"]["low"]}},
        "safe": int(evaluation["safe"]),
    }
    compact |= {
        name: {key: condition[key] for key in CONDITION_HEADLINE}
        for name, condition in evaluation.get("conditions", {}).items()
    }
    return compact | ({"peak_memory_mb": peak_memory_mb} if peak_memory_mb is not None else {})
