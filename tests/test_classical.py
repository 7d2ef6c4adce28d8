"""The classical floor: TF-IDF + logistic regression, evaluated through the same code as every run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

from triage.classical import fit_tfidf_logreg, label_probabilities
from triage.config import ClassicalParams
from triage.evaluate.evaluation import headline_file
from triage.schema import DataError, Example

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ClassicalParams(max_ngram=2, min_df=1, inverse_regularisation=10.0, class_weight="balanced")
WORDS = {
    "ED": ["crushing chest pain", "cannot breathe", "face drooping"],
    "GP": ["rash for a week", "ear ache since monday", "lump that is growing"],
    "HOME": ["mild cold", "small bruise", "paper cut"],
}


def cases(n_per_label: int, offset: int = 0) -> list[Example]:
    """Messages whose label is told by their words, each label's cases in its own presentation groups."""
    out = []
    for label, phrases in WORDS.items():
        for i in range(n_per_label):
            phrase = phrases[(i + offset) % len(phrases)]
            out.append(
                Example(
                    id=f"{label}{i + offset}",
                    prompt=f"Patient message: my son has {phrase}.",
                    completion=label,
                    label=label,
                    group=f"{label}-{(i + offset) % 3}",
                )
            )
    return out


def test_labels_told_by_their_words_are_learned_with_columns_in_label_order():
    pipeline = fit_tfidf_logreg(cases(12), PARAMS, "train.jsonl")
    test = cases(6, offset=1)
    probs = label_probabilities(pipeline, test)
    assert probs.shape == (len(test), 3) and np.allclose(probs.sum(axis=1), 1.0)
    labels = [e.label for e in test]
    assert accuracy_score(labels, [("ED", "GP", "HOME")[i] for i in probs.argmax(axis=1)]) == 1.0
    assert roc_auc_score([y == "ED" for y in labels], probs[:, 0]) == 1.0
    # Columns follow LABELS even where scikit-learn keeps another order.
    pipeline.named_steps["logreg"].classes_ = pipeline.named_steps["logreg"].classes_[::-1]
    assert np.allclose(label_probabilities(pipeline, test), probs[:, ::-1])


def test_a_training_split_without_a_label_is_refused_naming_the_file():
    with pytest.raises(DataError, match=r"train.jsonl: field 'label': no HOME case"):
        fit_tfidf_logreg([e for e in cases(5) if e.label != "HOME"], PARAMS, "train.jsonl")


def test_the_stage_writes_the_metrics_every_run_writes(tmp_path: Path):
    data = tmp_path / "prepared"
    data.mkdir()
    for name, examples in (("train", cases(12)), ("valid", cases(4, 1)), ("test", cases(5, 2))):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(e.to_json()) + "\n" for e in examples))
    out = tmp_path / "classical"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "stages/classical.py"),
            "--data",
            str(data),
            "--metrics",
            str(out / "eval.json"),
            "--details",
            str(out / "evaluation.json"),
            "--predictions",
            str(out / "predictions.jsonl"),
            "--confusion",
            str(out / "confusion.csv"),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    compact, metrics = (json.loads((out / name).read_text()) for name in ("eval.json", "evaluation.json"))
    assert compact == headline_file(metrics) and "peak_memory_mb" not in compact
    assert metrics["run"] == "tfidf-logreg" and metrics["decision"] == "argmax"
    assert metrics["accuracy"] == 1.0 and metrics["ed_auroc"] == 1.0 and metrics["valid"]["accuracy"] == 1.0
    assert metrics["ci95"]["ed_recall"]["low"] < 1.0  # 5 of 5 is not certainty
    assert metrics["test_loss"] is None and metrics["mc_dropout"]["applicable"] is False
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == [e.id for e in cases(5, 2)] and all("p_ED" in row for row in rows)
