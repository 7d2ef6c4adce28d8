"""Evaluate a (possibly adapted) model on labelled cases: label scores to safety metrics."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.tuner.trainer import evaluate as mean_loss

from triage import metrics as m
from triage.batches import make_iterate_batches
from triage.config import EvaluateParams
from triage.lm import ChatFormat, TokenizedCase, label_log_probs
from triage.losses import plain_loss
from triage.schema import LABELS, Example

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def label_probabilities(model: nn.Module, fmt: ChatFormat, examples: list[Example]) -> np.ndarray:
    """(n, 3) probabilities of the label options, normalised over the three, dropout off."""
    model.eval()
    rows = []
    for example in examples:
        scores = label_log_probs(model, fmt, example.prompt)
        rows.append(mx.softmax(scores, axis=-1)[0])
    return np.array(mx.stack(rows), dtype=np.float64)


def completion_loss(model: nn.Module, cases: list[TokenizedCase], batch_size: int) -> float:
    """Mean cross-entropy per completion token over every case (the study's test loss)."""
    model.eval()
    size = min(batch_size, len(cases))
    return mean_loss(model, cases, size, num_batches=-1, loss=plain_loss,
                     iterate_batches=make_iterate_batches(mask_prompt=True, seed=0))


def decide(probs: np.ndarray, params: EvaluateParams) -> dict[str, list[str]]:
    """Both decision rules, so reports can show what the cost-aware rule changes."""
    return {"argmax": m.argmax_decision(probs), "cost_aware": m.cost_aware_decision(probs, params.cost_matrix)}


def headline(labels: list[str], preds: list[str], params: EvaluateParams) -> dict:
    """Scores of one decision rule, gates and bootstrap intervals, flat enough for dvc metrics."""
    scores = m.classification_metrics(labels, preds)
    gates = m.safety_gates(scores, params.gates.ed_recall_min, params.gates.ed_f2_min, params.gates.ed_fnr_max)
    intervals = {
        stat: m.bootstrap_interval(labels, preds, stat, BOOTSTRAP_RESAMPLES, 0.95, BOOTSTRAP_SEED)
        for stat in ("ed_recall", "ed_fnr")
    }
    return {
        "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"],
        "ed_recall": scores["ed_recall"], "ed_f2": scores["ed_f2"],
        "ed_fnr": scores["ed_fnr"], "ed_fn": scores["ed_fn"], "safe": gates["safe"],
        "gates": {name: {k: g[k] for k in ("state", "value", "threshold", "margin")}
                  for name, g in gates["gates"].items()},
        "ci95": {
            stat: {"low": iv["low"], "high": iv["high"]} for stat, iv in intervals.items()
        },
        "gates_hold_at_pessimistic_end": {
            "ed_recall": m.gate_holds_at_bound(intervals["ed_recall"], params.gates.ed_recall_min),
            "ed_fnr": m.gate_holds_at_bound(intervals["ed_fnr"], params.gates.ed_fnr_max),
        },
        "per_class": scores["per_class"],
        "n_unclassified": scores["n_unclassified"],
        "n": scores["n"],
    }


def evaluation_report(examples: list[Example], probs: np.ndarray, test_loss: float, params: EvaluateParams) -> dict:
    """The run's metrics JSON: headline keys on top, both decision rules and calibration nested."""
    labels = [e.label for e in examples]
    decisions = decide(probs, params)
    by_rule = {rule: headline(labels, preds, params) for rule, preds in decisions.items()}
    top = by_rule[params.decision]
    subgroups = {
        attr: m.subgroup_rates(labels, decisions[params.decision], [e.attrs.get(attr) for e in examples])
        for attr in sorted({key for e in examples for key in e.attrs if key in ("age_band", "sex")})
    }
    return {
        "decision": params.decision,
        **{key: top[key] for key in ("accuracy", "macro_f1", "ed_recall", "ed_f2", "ed_fnr", "ed_fn", "safe")},
        **{key: top[key] for key in ("gates", "ci95", "gates_hold_at_pessimistic_end")},
        "test_loss": test_loss,
        "perplexity": math.exp(test_loss),
        "n_cases": len(examples),
        "calibration": {"ece": m.expected_calibration_error(probs, labels),
                        "brier": m.brier_score(probs, labels)},
        **by_rule,
        "subgroups": subgroups,
    }


def prediction_rows(examples: list[Example], probs: np.ndarray, params: EvaluateParams) -> list[dict]:
    """One row per case for the confusion plot and for audit."""
    decisions = decide(probs, params)
    return [
        {"id": e.id, "label": e.label, "pred": decisions[params.decision][i],
         "argmax": decisions["argmax"][i], "cost_aware": decisions["cost_aware"][i],
         **{f"p_{label}": round(float(probs[i, j]), 6) for j, label in enumerate(LABELS)},
         **e.attrs}
        for i, e in enumerate(examples)
    ]
