"""Train the classical floor, TF-IDF + logistic regression, and evaluate it like every run.

    dvc repro classical

It learns from the train split only, then goes through the evaluate code:
the ED threshold tuned on the validation split, the test split and the extra
sets scored with the same rules, metrics and intervals, as run tfidf-logreg.
"""

import argparse
from pathlib import Path

import triage.runtime

triage.runtime.setup()  # before any import that may load mlx (triage/runtime/__init__.py)

from triage.classical import RUN_NAME, fit_tfidf_logreg, label_probabilities
from triage.config import load_params
from triage.evaluate.evaluation import ScoredSet, evaluate_sets, headline_file
from triage.io import write_csv, write_json, write_jsonl
from triage.schema import Example, read_examples
from triage.stage import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True, help="directory with train, valid and test .jsonl")
    parser.add_argument("--metrics", type=Path, required=True, help="compact eval.json: the dozen numbers DVC shows")
    parser.add_argument("--details", type=Path, required=True, help="evaluation.json: every rule, interval and gate")
    parser.add_argument("--predictions", type=Path, required=True)
    parser.add_argument("--confusion", type=Path, required=True)
    args = parser.parse_args()

    params = load_params()
    train_path = args.data / "train.jsonl"
    pipeline = fit_tfidf_logreg(read_examples(train_path), params.classical, str(train_path))

    def score(examples: list[Example], source: str) -> ScoredSet:
        return ScoredSet(examples, label_probabilities(pipeline, examples), loss=None)

    target = (params.evaluate.ed_threshold_target, "evaluate.ed_threshold_target")
    metrics, predictions, _, _ = evaluate_sets(score, args.data, params.evaluate, target)
    write_jsonl(args.predictions, predictions)
    write_csv(args.confusion, predictions, ("id", "label", "pred"))
    write_json(
        args.details,
        {
            "run": RUN_NAME,
            "adapter": False,
            "mc_dropout": {"applicable": False, "reason": "not a neural network: no dropout to sample"},
            **metrics,
        },
    )
    write_json(args.metrics, headline_file(metrics))
    print(
        f"[classical] {RUN_NAME}: accuracy {metrics['accuracy']:.3f}, ED recall {metrics['ed_recall']}, "
        f"ED AUROC {metrics['ed_auroc']:.3f} (valid accuracy {metrics['valid']['accuracy']:.3f}) -> {args.metrics}"
    )


if __name__ == "__main__":
    run_stage(main, "classical")
